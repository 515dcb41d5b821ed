"""The cloud controller as a sans-IO core: decoded messages and `now` in, effects out.

`Controller` knows every device, node and transfer; it validates each
request, places uploads, shares each node's credit and watches liveness and
stalls as deadlines. It never touches a socket, a thread or the clock: the
driver (`roles/broker.py`) feeds it and executes what it returns
(`bus.effects`). The catalog is asked through `Submit` effects to the
"catalog" pool, and answers come back as `completed()`, so no SQLite commit
runs on the loop. Handlers are found through a dispatch table per side,
built once and checked against `schemas.MESSAGES`; every state change goes
through `transfers.py`'s table. Node-side handlers live in `nodeside.py`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass

from loguru import logger

from bus.deadlines import Deadlines
from bus.effects import Forward, Send, Submit
from bus.errors import RequestError
from roles.controller import status as status_doc
from roles.controller.credit import CreditScheduler
from roles.controller.history import History
from roles.controller.nodeside import NodeSide
from roles.controller.placement import Placement
from roles.controller.registry import Registry
from roles.controller.transfers import AGENT, CATALOG, WATCHED_STATES, Transfer, advance, finish
from roles.geometry import ImageGeometry
from schemas import error_message, make

REGISTER = {"agent": "HELLO", "node": "READY"}
# (side, message type) -> handler name; tests/test_unit_dispatch.py checks it against schemas.MESSAGES
DISPATCH = {
    "agent": {"HELLO": "on_hello", "HEARTBEAT": "agent_HEARTBEAT", "BYE": "agent_BYE", "PING": "agent_PING",
              "LIST": "agent_LIST", "OFFER": "agent_OFFER", "RESTORE": "agent_RESTORE", "QUERY": "agent_QUERY",
              "CHUNK": "agent_CHUNK", "COMMIT": "agent_COMMIT", "CREDIT": "agent_CREDIT", "ABORT": "agent_ABORT",
              "ERROR": "agent_ERROR"},
    "node": {"READY": "on_ready", "HEARTBEAT": "node_HEARTBEAT", "BYE": "node_BYE", "OPENED": "node_OPENED",
             "MISSING": "node_MISSING", "STORED": "node_STORED", "COMMITTED": "node_COMMITTED",
             "IMAGE": "node_IMAGE", "BLOCK": "node_BLOCK", "ERROR": "node_ERROR"},
    "status": {"STATUS": "status_STATUS", "LIST": "status_LIST"},
}


@dataclass(frozen=True)
class ControllerStatistics:
    agents: int
    devices_known: int
    nodes: int
    transfers: int
    parked: int
    finished: int
    deadlines: int
    errors: int


class Controller(NodeSide):
    def __init__(self, config, store, index, *, identify=lambda frames: None, process_figures=dict):
        """`store`: the CatalogStore whose methods run on the catalog pool; `index`: its CatalogIndex.
        `identify(frames)`: the key name a connection authenticated with (None if insecure).
        `process_figures()`: the driver's own counters for status (rss_bytes, dropped_messages)."""
        self.config = config
        self.store = store
        self.identify = identify
        self.process_figures = process_figures
        self.registry = Registry(config.heartbeat_interval_ms / 1000, config.heartbeat_liveness)
        self.credit = CreditScheduler()
        self.placement = Placement(index)
        self.history = History(config.finished_transfers_kept)
        self.transfers: dict[str, Transfer] = {}
        self.uploads_by_key: dict[tuple, Transfer] = {}  # (device, dataset, snapshot) -> upload in progress
        self.stalls = Deadlines()
        self.stall_s = config.stall_timeout_ms / 1000
        self.errors_by_code: Counter = Counter()
        self.committed_frames: dict[str, list] = {}  # COMMITTED waiting for its catalog row
        self.handlers = {side: {t: getattr(self, name) for t, name in table.items()}
                         for side, table in DISPATCH.items()}
        self.now = 0.0
        self.out: list = []

    # --- the core interface -------------------------------------------------------------

    def received(self, peer, msg, frames, now: float) -> list:
        self.now, self.out = now, []
        side, routing = peer
        session = self.registry.session(side, routing) if side != "status" else None
        if session is not None:
            session.last_heard = now
        try:
            if side != "status" and session is None and msg.t != REGISTER[side]:
                raise RequestError(f"say {REGISTER[side]} first", "not_registered")
            handler = self.handlers[side].get(msg.t)
            if handler is None:
                raise RequestError(f"{msg.t} is not accepted from {side}s", "unknown_type")
            handler(session if session is not None else peer, msg, frames)
        except RequestError as exc:
            self.reply_error(peer, exc, ref=msg.t, transfer_id=msg.get("transfer_id"), req=msg.get("req"))
        return self.out

    def malformed(self, peer, exc, now: float) -> list:
        """Frames that failed `schemas.decode`: answered with ERROR, nothing changes."""
        self.now, self.out = now, []
        self.reply_error(peer, exc)
        return self.out

    def completed(self, key, result, error, now: float) -> list:
        self.now, self.out = now, []
        kind = key[0]
        if kind == "offer":
            self.offer_checked(key[1], result, error)
        elif kind == "restore":
            self.restore_found(key[1], result, error)
        elif kind == "record":
            self.recorded(key[1], error)
        elif kind == "list":
            self.listed(key[1], result, error)
        return self.out

    def on_time(self, now: float) -> list:
        self.now, self.out = now, []
        beats, dead = self.registry.due(now)
        if beats:
            beat = make("HEARTBEAT")
            for session in beats:
                self.out.append(Send(session.peer, beat))
        for session in dead:
            if session.side == "agent":
                self.drop_agent(session, "silent past heartbeat liveness")
            else:
                self.registry.drop_node(session.routing)
                self.node_lost(session, "silent past heartbeat liveness")
        for tid in self.stalls.pop_due(now):
            self.watch_stall(tid)
        return self.out

    def next_deadline(self) -> float | None:
        due = [d for d in (self.registry.next_due(), self.stalls.next_due()) if d is not None]
        return min(due) if due else None

    def statistics(self) -> ControllerStatistics:
        return ControllerStatistics(len(self.registry.agents), len(self.registry.known_devices),
                                    len(self.registry.nodes), len(self.transfers), len(self.history.parked),
                                    len(self.history.finished),
                                    len(self.registry.deadlines) + len(self.stalls),
                                    sum(self.errors_by_code.values()))

    # --- sending ------------------------------------------------------------------------------

    def send(self, to, message) -> None:
        """`to`: a session (its last_sent moves: any traffic is a heartbeat) or a peer tuple."""
        if hasattr(to, "peer"):
            to.last_sent = self.now
            to = to.peer
        self.out.append(Send(to, message))

    def forward(self, to, frames, t: str) -> None:
        to.last_sent = self.now
        self.out.append(Forward(to.peer, list(frames), t))

    def to_agent(self, t: Transfer, message=None, frames=None, name: str = "") -> None:
        session = self.registry.agents.get(t.agent_routing)
        target = session if session is not None else ("agent", t.agent_routing)
        if message is not None:
            self.send(target, message)
        elif session is not None:
            self.forward(session, frames, name)
        else:
            self.out.append(Forward(target, list(frames), name))

    def count_error(self, code: str) -> None:
        self.errors_by_code[code] += 1

    def reply_error(self, to, exc, ref: str | None = None, **extra) -> None:
        self.count_error(exc.code)
        self.send(to, error_message(exc, ref=ref, **extra))

    # --- agents --------------------------------------------------------------------------------

    def on_hello(self, who, msg, frames) -> None:
        peer = who if isinstance(who, tuple) else who.peer
        # Under CURVE the device is the one its key names; a claim to be
        # another device is refused, never believed.
        if not self.config.insecure and msg["device_id"] != self.identify(frames):
            raise RequestError("device_id does not match the key this connection authenticated with", "forbidden")
        if not isinstance(who, tuple) and who.device_id != msg["device_id"]:
            raise RequestError("a connection speaks for one device only", "forbidden")
        session = self.registry.register_agent(peer[1], msg["device_id"], self.now)
        self.send(session, make("WELCOME", heartbeat_interval_ms=self.config.heartbeat_interval_ms))
        logger.info("agent {} connected", msg["device_id"])

    def agent_HEARTBEAT(self, session, msg, frames) -> None:
        pass

    def agent_ERROR(self, session, msg, frames) -> None:
        logger.warning("agent {} reports {}: {}", session.device_id, msg["code"], msg["reason"])

    def agent_PING(self, session, msg, frames) -> None:
        self.send(session, make("PONG", seq=msg["seq"], sent_us=msg["sent_us"]))

    def agent_BYE(self, session, msg, frames) -> None:
        self.drop_agent(session, "agent said BYE")

    def require_own(self, session, msg) -> None:
        claimed = msg.get("device_id")
        if claimed is not None and claimed != session.device_id:
            raise RequestError(f"device {session.device_id} may not act for another device", "forbidden")

    def agent_LIST(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        self.out.append(Submit("catalog", ("list", session.peer), self.store.list, (session.device_id,)))

    def agent_OFFER(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        if ImageGeometry(msg["image_size"], msg["chunk_size"]).chunk_count != msg["chunk_count"]:
            raise RequestError("chunk_count does not match image_size and chunk_size", "bad_field")
        device, dataset, snapshot = session.device_id, msg["dataset"], msg["snapshot"]
        # The device offers it again (it restarted, or lost its connection
        # before we noticed): the older upload of it is obsolete, whichever
        # connection it came from, and must not hold chunks the new one needs.
        stale = self.uploads_by_key.get((device, dataset, snapshot))
        if stale is not None:
            self.finish(stale, "aborted", "offered again")
        window = max(self.config.transfer_window, 2 * msg["chunk_size"] + 65536)
        t = Transfer(f"t-{uuid.uuid4().hex[:16]}", "upload", device, dataset, snapshot, "", session.routing,
                     msg["req"], image_size=msg["image_size"], chunk_size=msg["chunk_size"],
                     chunk_count=msg["chunk_count"], window=window, started_at=self.now, last_progress=self.now)
        t.ledger.window = window
        try:
            t.node_id = self.placement.choose(device, dataset, self.registry.nodes_by_id)
        except RequestError as exc:
            t.refusal = exc
            t.node_id = self.placement.node_for(device, dataset) or ""
        self.add_transfer(t, session)
        if t.refusal is None:
            node = self.registry.nodes_by_id[t.node_id]
            node.reserved_bytes += t.image_size
            self.placement.hold(device, dataset, t.node_id)
        self.out.append(Submit("catalog", ("offer", t.transfer_id), self.store.check_offer,
                               (device, dataset, snapshot, None if t.refusal else t.node_id)))

    def offer_checked(self, tid: str, existing, error) -> None:
        t = self.transfers.get(tid)
        if t is None or t.state != "checking":
            return  # aborted or offered again meanwhile
        if error is not None:
            self.catalog_failed(t, "OFFER", error)
            return
        if existing is not None:  # snapshots are immutable once named (DESIGN.md)
            self.history.unpark(t.key, self.now)
            self.finish(t, "aborted", "already committed", record=False)
            self.to_agent(t, make("ACCEPT", req=t.req, transfer_id="committed", node_id=existing["node_id"],
                                  committed=True))
            return
        node = self.registry.nodes_by_id.get(t.node_id) if t.refusal is None else None
        if node is None:
            exc = t.refusal or RequestError(f"node {t.node_id} left while the offer was checked", "node_unavailable")
            self.finish(t, "aborted", "refused", record=False)
            self.park_offer(t, f"{exc.code}: {exc.reason}")
            self.count_error(exc.code)
            self.to_agent(t, error_message(exc, ref="OFFER", req=t.req))
            return
        advance(t, CATALOG, "checked")
        self.placement.placed(t.device_id, t.dataset, t.node_id)
        self.history.unpark(t.key, self.now)
        node.transfers.add(t.transfer_id)
        self.stalls.schedule(t.transfer_id, self.now + self.stall_s)
        self.send(node, make("OPEN", transfer_id=t.transfer_id, device_id=t.device_id, dataset=t.dataset,
                             snapshot=t.snapshot, image_size=t.image_size, chunk_size=t.chunk_size,
                             chunk_count=t.chunk_count))

    def park_offer(self, t: Transfer, reason: str) -> None:
        parked = Transfer(f"p-{uuid.uuid4().hex[:16]}", "upload", t.device_id, t.dataset, t.snapshot, t.node_id,
                          t.agent_routing, t.req, image_size=t.image_size, started_at=self.now)
        self.history.park(parked, reason)

    def agent_RESTORE(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        t = Transfer(f"r-{uuid.uuid4().hex[:16]}", "restore", session.device_id, msg["dataset"], msg["snapshot"],
                     "", session.routing, msg["req"], window=msg["window"], started_at=self.now)
        self.add_transfer(t, session)
        self.out.append(Submit("catalog", ("restore", t.transfer_id), self.store.lookup, t.key))

    def restore_found(self, tid: str, entry, error) -> None:
        t = self.transfers.get(tid)
        if t is None or t.state != "checking":
            return
        if error is not None:
            self.catalog_failed(t, "RESTORE", error)
            return
        node = self.registry.nodes_by_id.get(entry["node_id"]) if entry else None
        if node is None:
            exc = (RequestError(f"{t.dataset}/{t.snapshot} is not in the catalog", "not_found") if entry is None else
                   RequestError(f"node {entry['node_id']} holding {t.dataset} is not available", "node_unavailable"))
            self.finish(t, "failed", exc.reason, record=False)
            self.count_error(exc.code)
            self.to_agent(t, error_message(exc, ref="RESTORE", req=t.req))
            return
        advance(t, CATALOG, "found")
        t.node_id, t.image_size, t.chunk_count = node.node_id, entry["size"], entry["chunk_count"]
        node.transfers.add(t.transfer_id)
        self.send(node, make("READ", transfer_id=t.transfer_id, device_id=t.device_id, dataset=t.dataset,
                             snapshot=t.snapshot, window=t.window))
        self.to_agent(t, make("ACCEPT", req=t.req, transfer_id=t.transfer_id, node_id=node.node_id, committed=False))

    def catalog_failed(self, t: Transfer, ref: str, error: BaseException) -> None:
        logger.error("catalog failed for {} {}/{}/{}: {}", t.transfer_id, *t.key, error)
        exc = RequestError("the catalog could not answer; try again", "internal")
        self.finish(t, "failed", f"catalog: {error}")
        self.count_error(exc.code)
        self.to_agent(t, error_message(exc, ref=ref, req=t.req))

    def owned(self, session, msg) -> Transfer:
        """The sender's own transfer, moved by the table (a violation ends it in error)."""
        t = self.transfers.get(msg["transfer_id"])
        # Someone else's transfer and no transfer look the same: nothing leaks.
        if t is None or t.device_id != session.device_id or t.agent_routing != session.routing:
            raise RequestError(f"no transfer {msg['transfer_id']} of yours", "unknown_transfer")
        try:
            advance(t, AGENT, msg.t, session.device_id)
        except RequestError as exc:
            self.finish(t, "error", exc.reason)
            raise
        return t

    def node_of(self, t: Transfer):
        node = self.registry.nodes_by_id.get(t.node_id)
        if node is None:
            raise RequestError(f"node {t.node_id} is not available", "node_unavailable")
        return node

    def agent_QUERY(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        self.forward(self.node_of(t), frames, msg.t)

    def agent_CHUNK(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        node = self.node_of(t)
        wire_len = len(msg.payload[0])
        t.ledger.spend(msg["hash"], wire_len, msg["raw_len"], msg.get("offset"), msg.get("total"))
        t.bytes_sent += wire_len
        self.forward(node, frames, msg.t)

    def agent_COMMIT(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        node = self.node_of(t)
        t.last_progress = self.now
        self.credit.release(node.node_id, t.ledger.release_holding())
        self.serve_waiting(node)
        self.forward(node, frames, msg.t)

    def agent_CREDIT(self, session, msg, frames) -> None:
        if msg["transfer_id"] not in self.transfers and self.history.ended_restore(msg["transfer_id"],
                                                                                   session.device_id):
            return  # credit for blocks of a restore already complete: nothing left to grant it for
        t = self.owned(session, msg)
        self.forward(self.node_of(t), frames, msg.t)

    def agent_ABORT(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        self.finish(t, "aborted", "agent aborted")

    # --- status socket ----------------------------------------------------------------------------

    def status_STATUS(self, peer, msg, frames) -> None:
        self.send(peer, make("STATUS_REPLY", status=self.status()))

    def status_LIST(self, peer, msg, frames) -> None:
        self.out.append(Submit("catalog", ("list", peer), self.store.list, (msg.get("device_id"),)))

    def listed(self, peer, rows, error) -> None:
        if error is not None:
            logger.error("catalog list failed: {}", error)
            self.reply_error(peer, RequestError("the catalog could not answer; try again", "internal"), ref="LIST")
            return
        session = self.registry.session(*peer) if peer[0] != "status" else None
        self.send(session if session is not None else peer, make("LIST_REPLY", snapshots=rows))

    def status(self) -> dict:
        return status_doc.document(self, self.process_figures())

    # --- lifecycle ------------------------------------------------------------------------------------

    def add_transfer(self, t: Transfer, session) -> None:
        self.transfers[t.transfer_id] = t
        if t.kind == "upload":
            self.uploads_by_key[t.key] = t
        session.transfers.add(t.transfer_id)

    def finish(self, t: Transfer, state: str, reason: str = "", record: bool = True) -> None:
        """End a transfer: release its credit, reservation and placement hold; keep it for status."""
        if t.finished:
            return
        node = self.registry.nodes_by_id.get(t.node_id)
        told_node = t.state not in ("checking",)
        if state in ("aborted", "parked", "error") and node is not None and told_node:
            self.send(node, make("ABORT", transfer_id=t.transfer_id))
        released = t.ledger.release_all()
        was = t.state
        finish(t, state, reason, self.now)
        self.transfers.pop(t.transfer_id, None)
        self.stalls.cancel(t.transfer_id)
        if self.uploads_by_key.get(t.key) is t:
            del self.uploads_by_key[t.key]
        if record:
            self.history.ended(t)
        agent = self.registry.agents.get(t.agent_routing)
        if agent is not None:
            agent.transfers.discard(t.transfer_id)
        if t.kind == "upload" and t.refusal is None:
            self.placement.release(t.device_id, t.dataset)
        if node is not None:
            node.transfers.discard(t.transfer_id)
            self.credit.forget(node.node_id, t.transfer_id)
            self.credit.release(node.node_id, released)
            if t.kind == "upload" and t.refusal is None:
                node.reserved_bytes = max(0, node.reserved_bytes - t.image_size)
            self.serve_waiting(node)
        if state in ("failed", "aborted", "parked", "error") and record:
            logger.warning("transfer {} {}/{}/{} {} (was {}): {}", t.transfer_id, t.device_id, t.dataset,
                           t.snapshot, state, was, reason)

    def drop_agent(self, session, reason: str) -> None:
        self.registry.drop_agent(session.routing)
        for tid in list(session.transfers):
            t = self.transfers.get(tid)
            if t is not None:
                self.finish(t, "aborted", reason)
        logger.info("agent {} gone: {}", session.device_id, reason)

    def interrupt(self, t: Transfer, exc: RequestError) -> None:
        """Tell the agent, and park an upload (or fail a restore)."""
        self.count_error(exc.code)
        self.to_agent(t, error_message(exc, ref="OFFER" if t.kind == "upload" else "RESTORE",
                                       transfer_id=t.transfer_id, req=t.req))
        self.finish(t, "parked" if t.kind == "upload" else "failed", f"{exc.code}: {exc.reason}")

    def watch_stall(self, tid: str) -> None:
        """The watchdog: an upload with no acknowledged progress is parked, and
        the agent offers it again (silent hangs are how replication dies)."""
        t = self.transfers.get(tid)
        if t is None or t.kind != "upload":
            return
        if t.state not in WATCHED_STATES:
            if not t.finished:
                self.stalls.schedule(tid, self.now + self.stall_s)
            return
        quiet = self.now - t.last_progress
        if quiet >= self.stall_s:
            self.interrupt(t, RequestError(f"no acknowledged progress for {self.stall_s:.0f}s", "stalled"))
        else:
            self.stalls.schedule(tid, t.last_progress + self.stall_s)

    # --- credit -----------------------------------------------------------------------------------------

    def grant_credit(self, node, t: Transfer) -> None:
        if t.kind != "upload" or t.state != "active":
            return
        granted = self.credit.grant(node.node_id, t.transfer_id, t.ledger, t.chunk_size)
        if granted:
            self.to_agent(t, make("CREDIT", transfer_id=t.transfer_id, bytes=granted))

    def serve_waiting(self, node) -> None:
        def live(tid):
            t = self.transfers.get(tid)
            return t if t is not None and t.kind == "upload" and t.state == "active" else None

        for t, granted in self.credit.serve_waiting(node.node_id, live):
            self.to_agent(t, make("CREDIT", transfer_id=t.transfer_id, bytes=granted))
