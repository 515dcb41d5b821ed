"""The storage node's logic, sans IO: decoded messages and `now` in, effects out.

Theory of operation (ROLES.md, "The core interface"): the driver
(roles/storage.py) owns the DEALER link, the clock and two pools; this core
owns every decision. It reads no clock and touches no disk on the loop
thread: a chunk file's presence (a stat), the filesystem's space, manifest
loads and chunk reads are `Submit`ted to the "store" pool and come back as
`completed()`. Ownership (roles/storenode/ownership.py) is not thread-safe,
so it is asked on the loop only, from memory; the pool checks only that the
chunk files it names are still on disk (a scrub may have quarantined one).
The whole-image hash runs on the one "image" thread (imagehash.py), fed
by device in bounded turns (imageturns.py), so one device's zeros never hold
another's commit.

A QUERY slice is answered in the order slices came, whatever order the pool
answers in: each waits in its session's `pending_queries` until those before
it are applied (UploadSession.record_slice requires the manifest in order).
A COMMIT that comes while slices are pending waits behind them.

Timers are Deadlines: each session's idle check (lazy: a message only moves
`last_activity`), the space refresh and garbage collection (gc.py; a QUERY
slice's names are pinned for it before any of them is stat'ed).
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger

from bus.deadlines import Deadlines
from bus.effects import Send, Submit
from bus.errors import RequestError
from bus.effects import LOST
from roles.storenode.assembly import PieceAssembler
from roles.storenode.background import Verifier
from roles.storenode.brokers import BrokerRoutes, broker_sides
from roles.storenode.commits import CommitPath, describe, storage_code
from roles.storenode.copyout import CopySender
from roles.storenode.gc import GarbageCollector
from roles.storenode.gcpins import Pins
from roles.storenode.imagehash import ImageHashes
from roles.storenode.imageturns import ImageTurns
from roles.storenode.restores import BROKER, RestorePump
from roles.storenode.transitions import UPLOAD_TRANSITIONS as UPLOAD, advance
from roles.storenode.uploads import DeviceInFlight, UploadSession
from schemas import error_message, make

SOFTWARE = "speedsync-storage/0.1"
# Sessions no broker has touched this long are orphans (the broker restarted,
# or parked them and the node missed the ABORT): forget them.
SESSION_IDLE_S = 600.0
# Open upload sessions one device may hold on this node (the broker's device_uploads_max is the
# first line; this one holds even for a broker that is wrong or several brokers together).
DEVICE_SESSIONS_MAX = 64
# what the broker sends or passes on to a node -> handler; tests/test_unit_dispatch.py checks it against schemas
DISPATCH = {"broker": {t: f"on_{t}" for t in ("HEARTBEAT", "ERROR", "OPEN", "QUERY", "CHUNK", "COMMIT", "ABORT",
                                             "READ", "CREDIT", "PRUNE", "VERIFY", "COPY", "OPENED", "MISSING",
                                             "STORED")}}
STORE_KINDS = frozenset({"query", "chunk", "check", "manifest", "block", "space", "reap", "gc", "prune", "verify",
                         "verify-save", "copy-manifest", "copy-read"})
IMAGE_KINDS = frozenset({"hash", "commit", "drop"})


@dataclass(frozen=True)
class StorageStatistics:
    uploads: int
    reads: int
    store_pending: int
    names_in_flight: int
    commits_waiting: int
    chunks_stored: int
    commits: int
    blocks_sent: int
    errors_sent: int
    free_bytes: int
    used_bytes: int
    chunks_on_disk: int = 0  # chunk files: those at start plus those written since
    stored_bytes: int = 0  # payload bytes written to new chunk files (as they travelled)
    gc_runs: int = 0
    gc_freed_bytes: int = 0  # chunk file bytes garbage collection deleted
    gc_deleted_chunks: int = 0


def absent_chunks(chunks, names: tuple) -> frozenset:
    """On a store thread: which of these chunk files are not on disk."""
    return frozenset(name for name in names if not chunks.has(name))


class StorageCore(CommitPath):
    def __init__(self, node_id: str, window: int, chunks, manifests, owners, *, heartbeat_interval_s: float,
                 space: tuple[int, int], now: float, idle_s: float = SESSION_IDLE_S, chunks_on_disk: int = 0,
                 read_hook=None, gc_interval_s: float | None = None, gc_slice_hook=None,
                 verifier: Verifier | None = None, brokers: int = 1):
        """`brokers`: how many brokers the node is attached to (brokers.py: one link each, the window
        shared between them)."""
        self.node_id = node_id
        self.window = window
        self.routes = BrokerRoutes(broker_sides(brokers))
        self.chunks = chunks
        self.manifests = manifests
        self.owners = owners
        self.interval_s = heartbeat_interval_s
        self._idle_s = idle_s
        self.space = space  # (free, used), refreshed on the store pool
        self.uploads: dict[str, UploadSession] = {}
        self.in_flight = DeviceInFlight()
        self.sessions_per_device: dict[str, int] = {}  # open upload sessions by device
        self.assembler = PieceAssembler(window)  # a device's chunk bytes in pieces: at most the window
        self.hashes = ImageHashes(chunks, manifests)  # its methods run on the image thread only
        self.image_turns = ImageTurns(self.hashes)  # what the image thread runs next, device by device
        self.pump = RestorePump(chunks, read_hook)
        self.copies = CopySender(chunks, manifests, read_hook)  # a drain's copies from this node (copyout.py)
        # background verification and devices' VERIFY (background.py); without one, requests only
        self.verifier = verifier or Verifier(chunks, manifests, chunks.root.parent, read_limit=50_000_000,
                                             interval_s=None, now=now)
        self.deadlines = Deadlines()
        self.deadlines.schedule("space", now + heartbeat_interval_s)
        self.pins = Pins()
        self.gc = GarbageCollector(chunks, manifests, owners, self.pins, gc_slice_hook)
        self._gc_interval_s = gc_interval_s
        if gc_interval_s:
            self.deadlines.schedule("gc", now + gc_interval_s)
        self.store_pending = 0
        self._space_pending = False
        self._query_seq = 0
        self.errors_sent = 0
        self.chunks_stored = 0
        self.commits = 0
        self.chunks_on_disk, self.stored_bytes = chunks_on_disk, 0
        self._handlers = {t: getattr(self, name) for t, name in DISPATCH["broker"].items()}
        self._completions = {"query": self._queried, "chunk": self._chunk_stored, "manifest": self._manifest_loaded,
                             "block": self._block_read, "space": self._space_read, "check": self._commit_checked,
                             "commit": self._committed, "hash": self._ignore, "drop": self._ignore,
                             "reap": self._ignore, "gc": self._gc_done, "prune": self._pruned,
                             "verify": self._verify_slice_done, "verify-save": self._ignore,
                             "copy-manifest": self._copy_manifest_loaded, "copy-read": self._copy_chunk_read}

    # --- the link ------------------------------------------------------------------

    def register_message(self, now: float):
        free, used = self.space
        logger.info("node {} registering", self.node_id)
        self.verifier.changed = True  # a broker that (re)registers us is told the verification figures
        return make("READY", node_id=self.node_id, window=self.routes.share(self.window), free_bytes=free,
                    used_bytes=used,
                    software=SOFTWARE, **self._store_figures())

    def heartbeat_message(self, now: float):
        free, used = self.space
        return make("HEARTBEAT", free_bytes=free, used_bytes=used, load=self.load, **self._store_figures())

    def _store_figures(self) -> dict:
        gc = self.gc
        return {"chunks": max(0, self.chunks_on_disk - gc.deleted_chunks), "gc_runs": gc.runs,
                "gc_freed_bytes": gc.freed_bytes}

    def on_link(self, event: str, now: float) -> list:
        if event == LOST:
            logger.warning("broker silent; reconnecting")
        return []

    @property
    def load(self) -> int:
        return len(self.uploads) + len(self.pump) + len(self.copies) + self.store_pending

    # --- the Core protocol ---------------------------------------------------------

    def received(self, peer, msg, frames, now: float) -> list:
        out: list = []
        self.routes.heard(peer)
        self.routes.opened(msg)
        handler = self._handlers.get(msg.t)
        if handler is None:
            self._error(out, RequestError(f"{msg.t} is not for a storage node", "unknown_type"), msg.t,
                        transfer_id=msg.get("transfer_id"))
            return out
        try:
            handler(msg, now, out)
        except RequestError as exc:
            extra = {"hash": msg["hash"]} if msg.t == "CHUNK" else {}
            self._error(out, exc, msg.t, transfer_id=msg.get("transfer_id"), **extra)
        return self._counted(out)

    def _counted(self, out: list) -> list:
        out.extend(self.image_turns.submits())
        self.store_pending += sum(1 for e in out if type(e) is Submit and e.pool == "store")
        return self.routes.route(out)

    def malformed(self, peer, exc, now: float) -> list:
        logger.warning("bad message from broker: {}", exc)
        out: list = []
        self.routes.heard(peer)
        self._error(out, exc, None)
        return self.routes.route(out)

    def completed(self, key, result, error, now: float) -> list:
        kind = key[0]
        if kind in STORE_KINDS:
            self.store_pending -= 1
        elif kind in IMAGE_KINDS:
            self.image_turns.done()
        out: list = []
        done = self._completions.get(kind)
        if done is not None:
            done(key, result, error, now, out)
        return self._counted(out)

    def on_time(self, now: float) -> list:
        out: list = []
        for key in self.deadlines.pop_due(now):
            if key == "space":
                self.deadlines.schedule("space", now + self.interval_s)
                if not self._space_pending:
                    self._space_pending = True
                    self._store(out, ("space",), self.chunks.space)
                    # the write-shaped copies of chunks already stored, in a batch on no STORED's path
                    self._store(out, ("reap",), self.chunks.reap)
                    self.routes.forget_except(set(self.uploads) | self.pump.transfer_ids() | set(self.copies.sessions))
                self._report_verification(out)
            elif key == "unpin":
                if self.pins.drain():
                    self.deadlines.schedule("unpin", now)  # the next batch after what else is due
            elif key == "gc":
                self.deadlines.schedule("gc", now + self._gc_interval_s)
                out.extend(self.gc.start())
            elif key[0] == "idle":
                self._expire_upload(key[1], now, out)
            elif key[0] in ("read-idle", "copy-idle"):
                self._expire_idle(self.pump if key[0] == "read-idle" else self.copies, key, now)
        out.extend(self.verifier.on_time(now))
        return self._counted(out)

    def _expire_idle(self, sessions, key: tuple, now: float) -> None:
        """A restore or a copy (`sessions`: the pump or the copy sender) the broker left idle past
        the idle time is forgotten; one still in use is looked at again when it could be."""
        since = sessions.idle_since(key[1])
        if since is None:
            return
        if since + self._idle_s <= now:
            sessions.abort(key[1])
        else:
            self.deadlines.schedule(key, since + self._idle_s)

    def next_deadline(self) -> float | None:
        due = [d for d in (self.deadlines.next_due(), self.verifier.next_due()) if d is not None]
        return min(due) if due else None

    def statistics(self) -> StorageStatistics:
        names, waiting = self.in_flight.statistics()
        figures = self._store_figures()
        return StorageStatistics(len(self.uploads), len(self.pump), self.store_pending, names, waiting,
                                 self.chunks_stored, self.commits, self.pump.blocks_sent, self.errors_sent,
                                 *self.space, figures["chunks"], self.stored_bytes, self.gc.runs,
                                 self.gc.freed_bytes, self.gc.deleted_chunks)

    def close(self) -> None:
        self.owners.close()

    # --- helpers -------------------------------------------------------------------

    def _error(self, out: list, exc, ref: str | None, **extra) -> None:
        self.errors_sent += 1
        out.append(Send(BROKER, error_message(exc, ref=ref, **extra)))

    def _store(self, out: list, key: tuple, fn, *args) -> None:
        out.append(Submit("store", key, fn, args))

    def _upload(self, tid: str, now: float) -> UploadSession:
        session = self.uploads.get(tid)
        if session is None:
            raise RequestError(f"no open transfer {tid}", "unknown_transfer")
        session.last_activity = now
        return session

    def _owns(self, device: str):
        owns = self.owners.owns
        return lambda name: owns(device, name)

    # --- handlers (one per message type) -------------------------------------------

    def on_HEARTBEAT(self, msg, now: float, out: list) -> None:
        pass

    def on_ERROR(self, msg, now: float, out: list) -> None:
        logger.warning("broker says {}: {}", msg["code"], msg["reason"])
        if msg.get("transfer_id") and self.copies.abort(msg["transfer_id"]):
            return  # a drain's copy from here failed; the broker tries it again
        if msg["code"] == "not_registered":
            # the broker restarted: the transfers it gave us are gone with it (another broker's stay)
            gone = self.routes.current
            for tid in list(self.uploads):
                if self.routes.owner(tid) in (gone, None):
                    self._close_upload(tid, out)
            for tid in self.pump.transfer_ids():
                if self.routes.owner(tid) in (gone, None):
                    self.pump.abort(tid)
            for tid in list(self.copies.sessions):
                if self.routes.owner(tid) in (gone, None):
                    self.copies.abort(tid)
            self.verifier.forget_requests()
            out.append(Send(BROKER, self.register_message(now)))

    def on_OPEN(self, msg, now: float, out: list) -> None:
        tid = msg["transfer_id"]
        if tid not in self.uploads:
            self.owners.load(msg["device_id"])  # read now, off the later paths; RequestError(storage_error)
            device = msg["device_id"]
            if self.sessions_per_device.get(device, 0) >= DEVICE_SESSIONS_MAX:
                raise RequestError(f"device {device} holds {DEVICE_SESSIONS_MAX} upload sessions on this node",
                                   "over_budget")
            self.sessions_per_device[device] = self.sessions_per_device.get(device, 0) + 1
            self.uploads[tid] = UploadSession(
                tid, msg["device_id"], msg["dataset"], msg["snapshot"], msg["image_size"], msg["chunk_size"],
                msg["chunk_count"], last_activity=now)
            self.deadlines.schedule(("idle", tid), now + self._idle_s)
        out.append(Send(BROKER, make("OPENED", transfer_id=tid)))

    def on_QUERY(self, msg, now: float, out: list) -> None:
        session = self._upload(msg["transfer_id"], now)
        try:
            advance(session, UPLOAD, "QUERY", "broker")
            if session.deferred_commit is not None:
                raise RequestError("QUERY after COMMIT", "bad_state")
        except RequestError:
            self._violated(session, out)
            raise
        start, names = msg["start"], msg["hashes"]
        self.pins.pin(session.transfer_id, session.device_id, names)  # before any stat: gcpins.py
        owns = self._owns(session.device_id)
        # only a name this device owns can be held; whether its file is still there is a stat: the pool's
        to_stat = tuple({name for name in names if name is not None and owns(name)})
        if not to_stat and not session.pending_queries:
            self._apply_slice(session, start, names, frozenset(), out)
            return
        self._query_seq += 1
        entry = [self._query_seq, start, names, None if to_stat else frozenset()]
        session.pending_queries.append(entry)
        if to_stat:
            self._store(out, ("query", session.transfer_id, self._query_seq), absent_chunks, self.chunks, to_stat)

    def _apply_slice(self, session: UploadSession, start: int, names: list, absent: frozenset, out: list) -> None:
        device, owns = session.device_id, self._owns(session.device_id)
        try:
            missing = session.record_slice(start, names, lambda name: owns(name) and name not in absent,
                                           lambda name: self.in_flight.contains(device, name))
        except RequestError:
            self._violated(session, out)
            raise
        for index in missing:
            self.in_flight.ask(device, names[index - start])
        out.append(Send(BROKER, make("MISSING", transfer_id=session.transfer_id, start=start, count=len(names),
                                     missing=missing)))
        self._advance_image(session, out)

    def _queried(self, key, result, error, now: float, out: list) -> None:
        session = self.uploads.get(key[1])
        if session is None:
            return
        for entry in session.pending_queries:
            if entry[0] == key[2]:
                entry[3] = result if error is None else None
                break
        if error is not None:
            logger.error("checking chunks for {} failed: {}", key[1], error)
            session.pending_queries.clear()
            self._violated(session, out)
            self._error(out, RequestError(f"store failed: {describe(error)}", "storage_error"), "QUERY",
                        transfer_id=key[1])
            return
        while session.pending_queries and session.pending_queries[0][3] is not None:
            _, start, names, absent = session.pending_queries.popleft()
            if session.state != "open":
                session.pending_queries.clear()  # failed meanwhile: the error is sent already
                return
            try:
                self._apply_slice(session, start, names, absent, out)
            except RequestError as exc:
                session.pending_queries.clear()
                self._error(out, exc, "QUERY", transfer_id=session.transfer_id)
                return
        if not session.pending_queries and session.deferred_commit is not None:
            msg, session.deferred_commit = session.deferred_commit, None
            try:
                self._commit(session, msg, out)
            except RequestError as exc:
                self._error(out, exc, "COMMIT", transfer_id=session.transfer_id)

    def _advance_image(self, session: UploadSession, out: list) -> None:
        pieces = session.hashable_pieces(self._owns(session.device_id))
        if pieces:
            self.image_turns.feed(session.device_id, session.transfer_id, pieces)  # submitted in its turn

    def on_CHUNK(self, msg, now: float, out: list) -> None:
        session = self._upload(msg["transfer_id"], now)
        name, raw_len = msg["hash"], msg["raw_len"]
        try:
            advance(session, UPLOAD, "CHUNK", "broker")
        except RequestError:
            self._violated(session, out)
            raise
        # A chunk refused (not asked for, a bad piece) is refused alone: the
        # broker returns its credit and the transfer goes on (ERROR ref CHUNK).
        session.expected_len(name, raw_len)
        payload = self.assembler.add(session.transfer_id, session.device_id, name, msg.get("offset"),
                                     msg.get("total"), msg.payload[0])
        if payload is None:
            return  # more pieces to come
        self._store(out, ("chunk", session.transfer_id, name, raw_len, len(payload)), self.chunks.store, name,
                    raw_len, msg["codec"], payload)

    def _chunk_stored(self, key, result, error, now: float, out: list) -> None:
        _, tid, name, raw_len, wire_len = key
        if error is not None:
            if not isinstance(error, RequestError):
                logger.error("storing chunk {} failed: {}", name.hex()[:16], error)
                error = RequestError(f"store failed: {describe(error)}", storage_code(error))
            self._error(out, error, "CHUNK", transfer_id=tid, hash=name)
            return
        result, written = result
        session = self.uploads.get(tid)
        if session is not None:
            try:
                self.owners.add(session.device_id, name)
            except (OSError, RequestError) as exc:  # the chunk is on disk; the upload parks, the node serves on
                logger.error("ownership log of {} failed: {}", session.device_id, exc)
                reason = exc.reason if isinstance(exc, RequestError) else f"ownership log: {describe(exc)}"
                code = "storage_error" if isinstance(exc, RequestError) else storage_code(exc)
                self._error(out, RequestError(reason, code), "CHUNK", transfer_id=tid, hash=name)
                return
        self.chunks_stored += 1
        if written:
            self.chunks_on_disk += 1
            self.stored_bytes += written
            out.extend(self.verifier.chunk_written(name))
        if session is not None:
            was_awaited = name in session.awaiting
            session.stored(name, result)
            if was_awaited:
                self.in_flight.release(session.device_id, [name])
            self._advance_image(session, out)
        out.append(Send(BROKER, make("STORED", transfer_id=tid, hash=name, raw_len=raw_len, wire_len=wire_len)))
        if session is not None:
            self._recheck_waiting_commits(session.device_id, out)

    def on_COMMIT(self, msg, now: float, out: list) -> None:
        session = self._upload(msg["transfer_id"], now)
        if session.pending_queries and session.state == "open" and session.deferred_commit is None:
            session.deferred_commit = msg  # answered once the slices before it are
            return
        self._commit(session, msg, out)

    def on_ABORT(self, msg, now: float, out: list) -> None:
        self._close_upload(msg["transfer_id"], out)
        self.pump.abort(msg["transfer_id"])
        self.copies.abort(msg["transfer_id"])

    def on_READ(self, msg, now: float, out: list) -> None:
        tid = msg["transfer_id"]
        self.verifier.refuse_read(msg["device_id"], msg["dataset"], msg["snapshot"])  # RequestError(damaged)
        self.pump.opening(tid, msg["window"])
        self._store(out, ("manifest", tid), self.manifests.load, msg["device_id"], msg["dataset"], msg["snapshot"])

    def on_PRUNE(self, msg, now: float, out: list) -> None:
        key = (msg["device_id"], msg["dataset"], msg["snapshot"])
        self._store(out, ("prune", *key), self.manifests.remove, *key)

    def _pruned(self, key, result, error, now: float, out: list) -> None:
        _, device, dataset, snapshot = key
        if error is not None:  # not confirmed: the broker sends PRUNE again at its next run
            logger.error("removing the manifest of {}/{}/{} failed: {}", device, dataset, snapshot, error)
            return
        if result:
            logger.info("pruned {}/{}/{}: its chunks go at the next garbage collection", device, dataset, snapshot)
        out.append(Send(BROKER, make("PRUNED", device_id=device, dataset=dataset, snapshot=snapshot)))

    def on_CREDIT(self, msg, now: float, out: list) -> None:
        copied = self.copies.credit(msg["transfer_id"], msg["bytes"], now)
        out.extend(copied if copied is not None else self.pump.credit(msg["transfer_id"], msg["bytes"], now))

    # --- a drain's copies from this node (copyout.py) ----------------------------------

    def on_COPY(self, msg, now: float, out: list) -> None:
        self.verifier.refuse_read(msg["device_id"], msg["dataset"], msg["snapshot"])  # RequestError(damaged)
        out.extend(self.copies.begin(msg, now))
        self.deadlines.schedule(("copy-idle", msg["transfer_id"]), now + self._idle_s)

    def on_OPENED(self, msg, now: float, out: list) -> None:
        out.extend(self.copies.opened(msg["transfer_id"], now))

    def on_MISSING(self, msg, now: float, out: list) -> None:
        out.extend(self.copies.missing(msg, now))

    def on_STORED(self, msg, now: float, out: list) -> None:
        out.extend(self.copies.stored(msg["transfer_id"], now))

    def _copy_manifest_loaded(self, key, result, error, now: float, out: list) -> None:
        out.extend(self.copies.manifest_loaded(key[1], result, error, now))

    def _copy_chunk_read(self, key, result, error, now: float, out: list) -> None:
        out.extend(self.copies.chunk_read(key[1], key[2], result, error, now))

    # --- restores ------------------------------------------------------------------

    def _manifest_loaded(self, key, result, error, now: float, out: list) -> None:
        tid = key[1]
        if error is not None:
            if self.pump.failed_to_open(tid):
                if not isinstance(error, RequestError):
                    error = RequestError(f"manifest read failed: {describe(error)}", "storage_error")
                self._error(out, error, "READ", transfer_id=tid)
            return
        out.extend(self.pump.opened(tid, result, now))
        if self.pump.idle_since(tid) is not None:
            self.deadlines.schedule(("read-idle", tid), now + self._idle_s)

    def _block_read(self, key, result, error, now: float, out: list) -> None:
        effects = self.pump.block_read(key[1], key[2], result, error, now)
        self.errors_sent += sum(1 for e in effects if isinstance(e, Send) and e.message.t == "ERROR")
        out.extend(effects)

    def _space_read(self, key, result, error, now: float, out: list) -> None:
        self._space_pending = False
        if error is None:
            self.space = result
        else:
            logger.warning("statvfs failed: {}", error)

    def _gc_done(self, key, result, error, now: float, out: list) -> None:
        out.extend(self.gc.completed(key, result, error))

    def _ignore(self, key, result, error, now: float, out: list) -> None:
        pass  # image-thread bookkeeping; a hash error is kept by the actor and raised at commit

    # --- verification (background.py) ----------------------------------------------

    def on_VERIFY(self, msg, now: float, out: list) -> None:
        try:
            for name in ("verify_id", "device_id"):
                if msg.get(name) is None:
                    raise RequestError(f"VERIFY to a node needs {name}", "bad_field")
            self.verifier.request(msg["verify_id"], msg["device_id"], msg["dataset"], msg["snapshot"],
                                  msg["image_blake3"])
        except RequestError as exc:  # answered with the request's id, so the broker can tell its device
            self._error(out, exc, "VERIFY", transfer_id=msg.get("verify_id"))

    def _verify_slice_done(self, key, result, error, now: float, out: list) -> None:
        effects, answers = self.verifier.completed(key, result, error, now)
        out.extend(effects)
        for request_id, match, reason in answers:
            if request_id not in ("recheck", "forgotten"):
                out.append(Send(BROKER, make("VERIFIED", verify_id=request_id, match=match, reason=reason)))

    def _report_verification(self, out: list) -> None:
        """On the space timer, when something changed: at most one report a heartbeat interval."""
        if self.verifier.changed:
            self.verifier.changed = False
            out.append(Send(BROKER, make("VERIFY_REPORT", report=self.verifier.report())))
