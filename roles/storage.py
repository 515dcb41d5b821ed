"""Storage worker process: one DEALER to the broker, one poll loop, a store pool.

It verifies and stores chunks (durable before STORED), answers manifest
slices with what the device lacks, commits verified manifests, and streams
restores under the agent's credit. Logic lives in `roles/storenode/`.
"""

from __future__ import annotations

import dataclasses
import os

import blake3
import zmq
from loguru import logger

from bus.errors import RemoteProtocolError, RequestError
from bus.heartbeat import Backoff, Liveness
from bus.pipeline import TaskPool
from bus.sockets import Outbox, make_dealer, recv_frames
from roles.config import StorageConfig
from roles.process import MAX_POLL_MS, StopFlag, client_security, now
from roles.storenode.assembly import PieceAssembler
from roles.storenode.chunkstore import ChunkStore
from roles.durable import remove_temp_files
from roles.storenode.faults import DiskFaults
from roles.storenode.manifests import ManifestStore
from roles.storenode.ownership import DeviceChunks
from roles.storenode.sessions import ReadSession, UploadSession
from roles.storenode.verify import hash_pieces
from schemas import decode, encode, error_message, make

SOFTWARE = "speedsync-storage/0.1"
# Sessions no broker has touched this long are orphans (the broker restarted,
# or parked them and the node missed the ABORT): forget them.
SESSION_IDLE_S = 600.0
# Bytes of restore data sent per loop turn before polling again.
PUMP_BUDGET = 8 * 1024 * 1024


class StorageNode:
    def __init__(self, config: StorageConfig):
        self.config = config
        removed = remove_temp_files(config.data_dir) if _exists(config.data_dir) else 0
        if removed:
            logger.info("removed {} temporary files left by an interrupted write", removed)
        self.faults = DiskFaults(write_rate=config.fault_write_rate, fail_at_write=config.fault_fail_at_write,
                                 capacity=config.fault_disk_capacity)
        self.chunks = ChunkStore(config.data_dir, write_hook=self.faults.before_write if self.faults.active else None)
        self.manifests = ManifestStore(config.data_dir, write_hook=self.chunks.write_hook)
        self.owners = DeviceChunks(config.data_dir, committed_chunks=self._committed_chunks)
        self.pool = TaskPool(config.store_threads, name="store")
        self.image_pool = TaskPool(1, name="image")  # whole-image hashes, strictly in order
        self.uploads: dict[str, UploadSession] = {}
        self.assembler = PieceAssembler()
        # device -> {chunk name: uploads asked to send it}: one device's
        # concurrent uploads never send the same chunk twice.
        self.device_in_flight: dict[str, dict] = {}
        self.commits_waiting: set = set()
        self.reads: dict[str, ReadSession] = {}
        self.ctx = zmq.Context()
        self.secure = client_security(config)
        self.sock = None
        self.outbox = None
        self.interval_s = config.heartbeat_interval_ms / 1000
        self.liveness = None
        self.backoff = Backoff()
        self.errors_sent = 0
        self.next_sweep = 0.0

    def holds(self, device_id: str, name: bytes) -> bool:
        """This device stored the chunk, and it is still on disk (a scrub may
        have quarantined it since: then it is missing, and the next upload
        of it heals every snapshot that names it)."""
        return self.owners.owns(device_id, name) and self.chunks.has(name)

    def _committed_chunks(self, device_id: str):
        for manifest in self.manifests.all_for_device(device_id):
            yield from manifest.chunks

    # --- connection -------------------------------------------------------

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = make_dealer(self.ctx, self.config.broker, secure=self.secure)
        self.outbox = Outbox(self.sock, encode)
        self.liveness = Liveness(self.interval_s, self.config.heartbeat_liveness, now())
        self._send_ready()

    def _send_ready(self) -> None:
        free, used = self.chunks.space()
        self.send(make("READY", node_id=self.config.node_id, window=self.config.window,
                       free_bytes=free, used_bytes=used, software=SOFTWARE))
        logger.info("node {} registering with {}", self.config.node_id, self.config.broker)

    def send(self, message) -> None:
        self.outbox.send(message)
        self.liveness.sent(now())

    def send_error(self, exc, ref: str | None, **extra) -> None:
        self.errors_sent += 1
        self.send(error_message(exc, ref=ref, **extra))

    # --- loop -------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        self.connect()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.pool.fileno, zmq.POLLIN)
        poller.register(self.image_pool.fileno, zmq.POLLIN)
        try:
            while not stop.stopping:
                timeout_ms = min(MAX_POLL_MS, int(self.liveness.next_deadline(now()) * 1000) + 1)
                events = dict(poller.poll(timeout_ms))
                if self.sock in events:
                    self._drain_socket()
                for pool in (self.pool, self.image_pool):
                    if pool.fileno in events:
                        for key, result, error in pool.done():
                            self._on_task_done(key, result, error)
                self._pump_reads()
                t = now()
                if self.liveness.is_dead(t):
                    logger.warning("broker silent for {} intervals; reconnecting", self.config.heartbeat_liveness)
                    poller.unregister(self.sock)
                    self.connect()
                    # the next attempt waits a liveness period plus a growing back-off
                    self.liveness.heard(t + self.backoff.next_delay())
                    poller.register(self.sock, zmq.POLLIN)
                elif self.liveness.heartbeat_due(t):
                    free, used = self.chunks.space()
                    self.send(make("HEARTBEAT", free_bytes=free, used_bytes=used, load=self.load))
                self.owners.flush()
                self._sweep_idle_sessions(t)
        finally:
            self.owners.close()
            self.pool.close()
            self.image_pool.close()
            if self.sock is not None:
                self.sock.close(linger=0)
            self.ctx.term()

    def _sweep_idle_sessions(self, t: float) -> None:
        if t < self.next_sweep:
            return
        self.next_sweep = t + 1.0
        for tid, session in list(self.uploads.items()):
            if t - session.last_activity > SESSION_IDLE_S and not session.committing:
                logger.info("forgetting idle upload {}", tid)
                self._close_upload(tid)
        for tid, session in list(self.reads.items()):
            if t - session.last_activity > SESSION_IDLE_S:
                self.reads.pop(tid, None)

    @property
    def load(self) -> int:
        return len(self.uploads) + len(self.reads) + self.pool.pending

    def _drain_socket(self) -> None:
        for _ in range(256):
            try:
                frames = recv_frames(self.sock)
            except zmq.Again:
                return
            self.liveness.heard(now())
            self.backoff.reset()
            try:
                msg = decode(frames)
            except RemoteProtocolError as exc:
                logger.warning("bad message from broker: {}", exc)
                self.send_error(exc, ref=None)
                continue
            handler = getattr(self, f"on_{msg.t}", None)
            if handler is None:
                self.send_error(RequestError(f"{msg.t} is not for a storage node", "unknown_type"), ref=msg.t,
                                transfer_id=msg.get("transfer_id"))
                continue
            try:
                handler(msg)
            except RequestError as exc:
                self.send_error(exc, ref=msg.t, transfer_id=msg.get("transfer_id"))

    # --- handlers (one per message type) -----------------------------------

    def on_HEARTBEAT(self, msg) -> None:
        pass

    def on_ERROR(self, msg) -> None:
        logger.warning("broker says {}: {}", msg["code"], msg["reason"])
        if msg["code"] == "not_registered":
            # the broker restarted: the transfers it gave us are gone with it
            for tid in list(self.uploads):
                self._close_upload(tid)
            self.reads.clear()
            self._send_ready()

    def on_OPEN(self, msg) -> None:
        tid = msg["transfer_id"]
        if tid not in self.uploads:
            self.uploads[tid] = UploadSession(
                tid, msg["device_id"], msg["dataset"], msg["snapshot"], msg["image_size"], msg["chunk_size"],
                msg["chunk_count"], last_activity=now(), hasher=blake3.blake3())
        self.send(make("OPENED", transfer_id=tid))

    def _upload(self, tid: str) -> UploadSession:
        session = self.uploads.get(tid)
        if session is None:
            raise RequestError(f"no open transfer {tid}", "unknown_transfer")
        session.last_activity = now()
        return session

    def on_QUERY(self, msg) -> None:
        session = self._upload(msg["transfer_id"])
        device = session.device_id
        in_flight = self.device_in_flight.setdefault(device, {})
        missing = session.record_slice(msg["start"], msg["hashes"], lambda name: self.holds(device, name),
                                       in_flight.__contains__)
        for index in missing:
            name = msg["hashes"][index - msg["start"]]
            in_flight[name] = in_flight.get(name, 0) + 1
        self.send(make("MISSING", transfer_id=session.transfer_id, start=msg["start"],
                       count=len(msg["hashes"]), missing=missing))
        self._advance_image(session)

    def _advance_image(self, session: UploadSession) -> None:
        device = session.device_id
        pieces = session.hashable_pieces(lambda name: self.holds(device, name))
        if pieces:
            self.image_pool.submit(("hash", session.transfer_id), _hash_step, session, self.chunks, pieces)

    def on_CHUNK(self, msg) -> None:
        session = self._upload(msg["transfer_id"])
        name, raw_len = msg["hash"], msg["raw_len"]
        try:
            session.expected_len(name, raw_len)
            payload = self.assembler.add(session.transfer_id, name, msg.get("offset"), msg.get("total"),
                                         msg.payload[0])
        except RequestError as exc:
            self.send_error(exc, ref="CHUNK", transfer_id=session.transfer_id, hash=name)
            return
        if payload is None:
            return  # more pieces to come
        wire_len = len(payload)
        self.pool.submit(("chunk", session.transfer_id, name, raw_len, wire_len),
                         self.chunks.put, name, raw_len, msg["codec"], payload)

    def on_COMMIT(self, msg) -> None:
        session = self._upload(msg["transfer_id"])
        session.require_complete()
        session.committing = True
        session.image_blake3 = msg["image_blake3"]
        self._try_commit(session)

    def _try_commit(self, session: UploadSession) -> None:
        """Commit now, or wait for chunks another upload of the device is sending."""
        device = session.device_id
        waiting_on = session.unresolved_depends(lambda name: self.holds(device, name))
        if waiting_on:
            in_flight = self.device_in_flight.get(device, {})
            if all(name in in_flight for name in waiting_on):
                self.commits_waiting.add(session.transfer_id)
                return
            self.commits_waiting.discard(session.transfer_id)
            self._close_upload(session.transfer_id)
            raise RequestError("chunks another transfer was to send never arrived; offer again", "commit_failed")
        self.commits_waiting.discard(session.transfer_id)
        manifest = session.manifest()
        if self.manifests.exists(manifest.device_id, manifest.dataset, manifest.snapshot):
            existing = self.manifests.load(manifest.device_id, manifest.dataset, manifest.snapshot)
            if manifest.image_blake3 is not None and existing.image_blake3 != manifest.image_blake3:
                self._close_upload(session.transfer_id)
                raise RequestError(f"{manifest.dataset}/{manifest.snapshot} is stored with other content", "conflict")
        for name in manifest.chunks:
            if name is not None and not self.holds(manifest.device_id, name):
                session.committing = False
                raise RequestError("the manifest names chunks this device has not stored", "commit_failed")
        self._advance_image(session)
        if not session.fully_hashed:  # cannot happen when every chunk is owned; never commit unhashed
            raise RequestError("image hash incomplete at commit", "commit_failed")
        self.image_pool.submit(("commit", session.transfer_id), self._finish_image, session, manifest)

    def _finish_image(self, session: UploadSession, manifest):
        """On the image thread, after every piece: check the blake3, save the manifest."""
        if session.hash_error is not None:
            raise session.hash_error
        digest = session.hasher.digest()
        if manifest.image_blake3 is not None and digest != manifest.image_blake3:
            raise RequestError("the chunks do not rebuild an image with the offered blake3", "commit_failed")
        manifest = dataclasses.replace(manifest, image_blake3=digest)
        self.manifests.save(manifest)
        return manifest

    def on_ABORT(self, msg) -> None:
        self._close_upload(msg["transfer_id"])
        self.reads.pop(msg["transfer_id"], None)

    def _close_upload(self, tid: str) -> UploadSession | None:
        """Forget an upload, and that it was to send what it still awaits."""
        session = self.uploads.pop(tid, None)
        self.assembler.forget(tid)
        if session is not None:
            self._release_in_flight(session.device_id, session.awaiting)
            self._recheck_waiting_commits(session.device_id)
        return session

    def _release_in_flight(self, device: str, names) -> None:
        in_flight = self.device_in_flight.get(device, {})
        for name in names:
            count = in_flight.get(name, 0) - 1
            if count > 0:
                in_flight[name] = count
            else:
                in_flight.pop(name, None)

    def _recheck_waiting_commits(self, device: str) -> None:
        for tid in list(self.commits_waiting):
            session = self.uploads.get(tid)
            if session is None:
                self.commits_waiting.discard(tid)
            elif session.device_id == device:
                try:
                    self._try_commit(session)
                except RequestError as exc:
                    self.send_error(exc, ref="COMMIT", transfer_id=tid)

    def on_READ(self, msg) -> None:
        manifest = self.manifests.load(msg["device_id"], msg["dataset"], msg["snapshot"])
        session = ReadSession(msg["transfer_id"], manifest, credit=msg["window"], last_activity=now())
        self.reads[session.transfer_id] = session
        self.send(make("IMAGE", transfer_id=session.transfer_id, image_size=manifest.image_size,
                       chunk_size=manifest.chunk_size, chunk_count=manifest.chunk_count,
                       image_blake3=manifest.image_blake3))

    def on_CREDIT(self, msg) -> None:
        session = self.reads.get(msg["transfer_id"])
        if session is None:
            return  # the restore has sent everything: late credit is not an error
        session.credit += msg["bytes"]
        session.last_activity = now()

    # --- completions --------------------------------------------------------

    def _on_task_done(self, key, result, error) -> None:
        kind, tid = key[0], key[1]
        if kind == "hash":
            return  # errors are kept on the session and raised at commit
        if kind == "chunk":
            _, _, name, raw_len, wire_len = key
            session = self.uploads.get(tid)
            if error is not None:
                if not isinstance(error, RequestError):
                    logger.error("storing chunk {} failed: {}", name.hex()[:16], error)
                    error = RequestError(f"store failed: {_describe(error)}", "storage_error")
                self.send_error(error, ref="CHUNK", transfer_id=tid, hash=name)
                return
            if session is not None:
                self.owners.add(session.device_id, name)
                session.stored(name, result)
                self._release_in_flight(session.device_id, [name])
                self._advance_image(session)
            self.send(make("STORED", transfer_id=tid, hash=name, raw_len=raw_len, wire_len=wire_len))
            if session is not None and self.commits_waiting:
                self._recheck_waiting_commits(session.device_id)
        elif kind == "commit":
            session = self._close_upload(tid)
            if session is None:
                return
            if error is not None:
                if not isinstance(error, RequestError):
                    logger.error("commit of {} failed: {}", tid, error)
                    code = "storage_error" if isinstance(error, OSError) else "commit_failed"
                    error = RequestError(f"commit failed: {_describe(error)}", code)
                self.send_error(error, ref="COMMIT", transfer_id=tid)
                return
            m = result
            logger.info("committed {}/{}/{} ({} chunks)", m.device_id, m.dataset, m.snapshot, m.chunk_count)
            self.send(make("COMMITTED", transfer_id=tid, device_id=m.device_id, dataset=m.dataset,
                           snapshot=m.snapshot, image_size=m.image_size, chunk_count=m.chunk_count,
                           image_blake3=m.image_blake3))

    def _pump_reads(self) -> None:
        budget = PUMP_BUDGET
        for tid in list(self.reads):
            session = self.reads[tid]
            while not session.finished and budget > 0:
                index = session.next_index
                name = session.manifest.chunks[index]
                raw_len = session.manifest.chunk_len(index)
                if name is None:
                    self.send(make("BLOCK", transfer_id=tid, index=index, hash=None, raw_len=raw_len, codec="raw"))
                    session.next_index += 1
                    continue
                try:
                    codec, stored_len, payload = self.chunks.read_stored(name)
                except RequestError as exc:
                    self.send_error(RequestError(f"chunk {index}: {exc.reason}", exc.code), ref="READ",
                                    transfer_id=tid)
                    del self.reads[tid]
                    break
                if len(payload) > session.credit:
                    break
                session.credit -= len(payload)
                budget -= len(payload)
                self.send(make("BLOCK", payload=[payload], transfer_id=tid, index=index, hash=name,
                               raw_len=stored_len, codec=codec))
                session.next_index += 1
            if session.finished:
                self.reads.pop(tid, None)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{error.__class__.__name__}: {error}"


def _hash_step(session: UploadSession, store, pieces) -> None:
    if session.hash_error is None:
        try:
            hash_pieces(session.hasher, store, pieces)
        except RequestError as exc:
            session.hash_error = exc


def _exists(path: str) -> bool:
    return os.path.isdir(path)


def run_storage(config: StorageConfig) -> int:
    stop = StopFlag().install()
    node = StorageNode(config)
    node.run(stop)
    return 0
