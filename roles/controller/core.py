"""The cloud controller as a sans-IO core: decoded messages and `now` in, effects out.

`Controller` knows every device, node and transfer; it validates each
request, places uploads, shares each node's credit and watches liveness and
stalls as deadlines. It never touches a socket, a thread or the clock: the
driver (`roles/broker.py`) feeds it and executes what it returns
(`bus.effects`). The catalog is asked through `Submit` effects to the
"catalog" pool, and answers come back as `completed()`, so no SQLite commit
runs on the loop. Handlers are found through a dispatch table per side,
built once and checked against `schemas.MESSAGES`; every state change goes
through `transfers.py`'s table. The handlers of each side live in
`agentside.py` and `nodeside.py`, group commit and what a failing catalog
does in `catalogside.py`; live enrolment and revocation (which
connections a removed key leaves refused) in `enrolment.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from loguru import logger

from bus.deadlines import Deadlines
from bus.effects import Forward, Send
from bus.errors import RequestError
from roles.controller import status as status_doc
from roles.controller.budgets import DeviceBudgets
from roles.controller.credit import CreditScheduler
from roles.controller.drain import DrainSide
from roles.controller.history import History
from roles.controller.lastcommit import LastCommits
from roles.controller.agentside import AgentSide
from roles.controller.catalogside import CatalogSide
from roles.controller.cataloghealth import CatalogHealth
from roles.controller.enrolment import Enrolment
from roles.controller.nodeside import NodeSide
from roles.controller.nospace import NoSpaceWaits
from roles.controller.placement import Placement
from roles.controller.pruneside import PruneSide, PruneState
from roles.controller.quota import DeviceQuotas
from roles.controller.registry import Registry
from roles.controller.restores import RestoreCredit
from roles.controller.transfers import WATCHED_STATES, Transfer, count_in, finish
from roles.controller.verifying import VerifySide
from schemas import error_message, make

REGISTER = {"agent": "HELLO", "node": "READY"}
# (side, message type) -> handler name; tests/test_unit_dispatch.py checks it against schemas.MESSAGES
DISPATCH = {
    "agent": {"HELLO": "on_hello", "HEARTBEAT": "agent_HEARTBEAT", "BYE": "agent_BYE", "PING": "agent_PING",
              "LIST": "agent_LIST", "OFFER": "agent_OFFER", "RESTORE": "agent_RESTORE", "QUERY": "agent_QUERY",
              "CHUNK": "agent_CHUNK", "COMMIT": "agent_COMMIT", "CREDIT": "agent_CREDIT", "ABORT": "agent_ABORT",
              "ERROR": "agent_ERROR", "VERIFY": "agent_VERIFY"},
    "node": {"READY": "on_ready", "HEARTBEAT": "node_HEARTBEAT", "BYE": "node_BYE", "OPENED": "node_OPENED",
             "MISSING": "node_MISSING", "STORED": "node_STORED", "COMMITTED": "node_COMMITTED",
             "IMAGE": "node_IMAGE", "BLOCK": "node_BLOCK", "PRUNED": "node_PRUNED", "ERROR": "node_ERROR",
             "VERIFIED": "node_VERIFIED", "VERIFY_REPORT": "node_VERIFY_REPORT",
             "QUERY": "node_QUERY", "CHUNK": "node_CHUNK", "COMMIT": "node_COMMIT"},  # a drain copy's sender
    "status": {"STATUS": "status_STATUS", "LIST": "status_LIST", "DRAIN": "status_DRAIN"},
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
    devices_connected: int = 0
    nodes_lost: int = 0
    snapshots_committed: int = 0  # catalog rows written (the agent was told after each)
    received_bytes: int = 0  # CHUNK payload bytes accepted from agents (as they travelled)


class Controller(AgentSide, NodeSide, CatalogSide, PruneSide, DrainSide, Enrolment, VerifySide):
    def __init__(self, config, store, index, *, identify=lambda frames: None, process_figures=dict,
                 wall_clock=None, usage=None, drains=()):
        """`store`: the CatalogStore whose methods run on the catalog pool; `index`: its CatalogIndex;
        `usage`: the bytes stored per device, as the catalog saved them (`store.usage()`, read at start);
        `drains`: the nodes draining or drained (`store.drains()`, read at start).
        `identify(frames)`: the key name a connection authenticated with (None if insecure).
        `process_figures()`: the driver's own counters for status (rss_bytes, dropped_messages).
        `wall_clock()`: seconds since the epoch, read for status only (which datasets are behind
        the RPO); the driver passes time.time."""
        self.config = config
        self.store = store
        self.index = index
        self.identify = identify
        self.process_figures = process_figures
        self.wall_clock = wall_clock
        self.live_by_state: Counter = Counter()  # live transfers by state, kept by transfers.py's moves
        self.registry = Registry(config.heartbeat_interval_ms / 1000, config.heartbeat_liveness,
                                 config.idle_heartbeat_interval_ms / 1000)
        self.credit = CreditScheduler()
        self.restores = RestoreCredit(config.restore_window, config.restore_idle_timeout_ms / 1000,
                                      config.restores_per_device)
        self.budgets = DeviceBudgets(config.device_uploads_max, config.query_rate, config.query_burst)
        self.quotas = DeviceQuotas(config.quota, usage)
        self.placement = Placement(index)
        self.history = History(config.finished_transfers_kept, config.device_parked_max, config.parked_ttl)
        self.space_waits = NoSpaceWaits(config.device_parked_max)  # offers parked no_space (nospace.py)
        self.transfers: dict[str, Transfer] = {}
        self.uploads_by_key: dict[tuple, Transfer] = {}  # (device, dataset, snapshot) -> upload in progress
        self.stalls = Deadlines()
        self.stall_s = config.stall_timeout_ms / 1000
        self.errors_by_code: Counter = Counter()
        self.finished_by_state: Counter = Counter()  # transfers ended, by final state
        self.snapshots_committed = 0
        self.received_bytes = 0
        # for metrics, in order of update; seeded from the index, which the driver loaded from the catalog
        self.last_commits = LastCommits()
        self.last_commits.merge((d, s, at) for (d, s), at in index.newest_commit.items() if at is not None)
        self.committed_frames: dict[str, list] = {}  # COMMITTED waiting for its catalog row
        self.rows_waiting: dict[str, tuple] = {}  # transfer id -> catalog row, for the next batch
        self.batch_in_flight: dict[str, tuple] = {}  # the rows the catalog is writing, by transfer id
        self.probe_in_flight = False
        self.catalog_health = CatalogHealth()  # unavailable: writes held and tried again (cataloghealth.py)
        self.prune_state = PruneState()  # retention runs and the manifests still to remove (pruneside.py)
        self.handlers = {side: {t: getattr(self, name) for t, name in table.items()}
                         for side, table in DISPATCH.items()}
        self.now = 0.0
        self.out: list = []
        self.init_enrolment()
        self.init_verifying()
        self.init_drains(drains)

    # --- the core interface -------------------------------------------------------------

    def received(self, peer, msg, frames, now: float) -> list:
        self.now, self.out = now, []
        side, routing = peer
        session = self.registry.session(side, routing) if side != "status" else None
        if session is not None:
            session.last_heard = now
        try:
            self.require_admitted(peer, session, frames)
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
        elif kind == "records":
            self.batch_recorded(key[1], error, committed_at=result)
        elif kind == "list":
            self.listed(key[1], result, error)
        elif kind == "usage":
            self.usage_saved(error)
        elif kind == "probe":
            self.probed(error)
        elif kind == "prune":
            self.prune_applied(result, error)
        elif kind == "pruned":
            self.prunes_confirmed(key[1], error)
        elif kind == "verify":
            self.verify_found(key[1], result, error)
        elif kind == "drain-start":
            self.drain_started(key[1], key[2], result, error)
        elif kind == "drain-end":
            self.drain_ended(key[1], key[2], result, error)
        elif kind == "drain-switch":
            self.copy_switched(key[1], result, error)
        elif kind.startswith("drain-"):
            self.drain_answered(key, result, error)
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
        self.restores_idle()
        self.history.expire(now)
        self.flush_records()
        self.save_usage()
        self.prune_due()
        self.drains_due()
        return self.out

    def next_deadline(self) -> float | None:
        # rows to hand the catalog are due at the end of this turn, unless it is unavailable and backing off
        due = [d for d in (self.catalog_due(), self.registry.next_due(), self.stalls.next_due(),
                           self.restores.next_due(), self.history.next_expiry(), self.quotas.next_deadline(),
                           self.prune_state.next_due(bool(self.config.retention)), self.drain_deadline())
               if d is not None]
        return min(due) if due else None

    def statistics(self) -> ControllerStatistics:
        return ControllerStatistics(len(self.registry.agents), len(self.registry.known_devices),
                                    len(self.registry.nodes), len(self.transfers), len(self.history.parked),
                                    len(self.history.finished),
                                    len(self.registry.deadlines) + len(self.stalls),
                                    sum(self.errors_by_code.values()), len(self.registry.sessions_per_device),
                                    len(self.registry.lost_nodes), self.snapshots_committed, self.received_bytes)

    def transfers_by_state(self) -> Counter:
        """Transfers in progress by state, and offers parked: O(transfers in progress)."""
        counts = Counter(t.state for t in self.transfers.values())
        counts["parked"] += len(self.history.parked)
        return counts

    def node_figures(self) -> list[tuple[str, bool, int, int]]:
        """(node_id, alive, free_bytes, used_bytes) of every node known, alive or lost."""
        return [(n.node_id, n.alive, n.free_bytes, n.used_bytes)
                for nodes in (self.registry.nodes_by_id, self.registry.lost_nodes) for n in nodes.values()]

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
        """To the transfer's sender: its agent, or a copy's source node (drain.py)."""
        if t.kind == "copy":
            source = self.registry.nodes_by_id.get(t.source_node)
            if source is not None:
                if message is not None:
                    self.send(source, message)
                else:
                    self.forward(source, frames, name)
            return
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

    # --- status socket ----------------------------------------------------------------------------

    def status_STATUS(self, peer, msg, frames) -> None:
        self.send(peer, make("STATUS_REPLY", status=self.status(msg.get("device_id"))))

    def status_LIST(self, peer, msg, frames) -> None:
        self.list_page(peer, msg.get("device_id"), msg)

    def status(self, device_id: str | None = None) -> dict:
        """Built per request from memory (no catalog query): the summary's counts are kept as
        things change; only `datasets_behind` walks the datasets, here and nowhere else."""
        wall_now = self.wall_clock() if self.wall_clock is not None else None
        return status_doc.document(self, self.process_figures(), device_id, wall_now)

    # --- lifecycle ------------------------------------------------------------------------------------

    def add_transfer(self, t: Transfer, session) -> None:
        self.transfers[t.transfer_id] = t
        count_in(t, self.live_by_state)
        if t.kind == "upload":
            self.uploads_by_key[t.key] = t
        session.transfers.add(t.transfer_id)
        self.registry.busy(session, True)

    def finish(self, t: Transfer, state: str, reason: str = "", record: bool = True) -> None:
        """End a transfer: release its credit, reservation and placement hold; keep it for status."""
        if t.finished:
            return
        node = self.registry.nodes_by_id.get(t.node_id)
        told_node = t.state not in ("checking",)
        if state in ("aborted", "parked", "error") and node is not None and told_node:
            self.send(node, make("ABORT", transfer_id=t.transfer_id))
        released = t.ledger.release_all()
        if t.kind == "restore":
            self.restores.release(t.transfer_id, t.node_id, t.device_id)
        was = t.state
        finish(t, state, reason, self.now)
        self.finished_by_state[state] += 1
        self.transfers.pop(t.transfer_id, None)
        self.stalls.cancel(t.transfer_id)
        if self.uploads_by_key.get(t.key) is t:
            del self.uploads_by_key[t.key]
        if t.kind == "upload":
            self.budgets.upload_ended(t.device_id)
        if record:
            self.history.ended(t)
        agent = self.registry.agents.get(t.agent_routing)
        if agent is not None:
            agent.transfers.discard(t.transfer_id)
            if not agent.transfers:
                self.registry.busy(agent, False)
        if t.kind == "upload" and t.refusal is None:
            self.placement.release(t.device_id, t.dataset)
        self.credit.forget(t.node_id, t.transfer_id, t.device_id)
        self.credit.release(t.node_id, released, t.device_id)  # to the node's pool even if its session is gone
        if node is not None:
            node.transfers.discard(t.transfer_id)
            if t.kind == "upload" and t.refusal is None:
                node.reserved_bytes = max(0, node.reserved_bytes - t.image_size)
            self.serve_waiting(node)
        if state in ("failed", "aborted", "parked", "error") and record:
            logger.warning("transfer {} {}/{}/{} {} (was {}): {}", t.transfer_id, t.device_id, t.dataset,
                           t.snapshot, state, was, reason)

    def drop_agent(self, session, reason: str) -> None:
        self.registry.drop_agent(session.routing)
        self.verifies_of_agent_gone(session.routing)
        for tid in list(session.transfers):
            t = self.transfers.get(tid)
            if t is not None:
                self.finish(t, "aborted", reason)
        logger.info("agent {} gone: {}", session.device_id, reason)

    def interrupt(self, t: Transfer, exc: RequestError) -> None:
        """Tell the agent, and park an upload (or fail a restore; a copy is tried again: drain.py)."""
        self.count_error(exc.code)
        if t.kind == "copy":
            self.copy_end(t, "failed", f"{exc.code}: {exc.reason}")
            return
        self.to_agent(t, error_message(exc, ref="OFFER" if t.kind == "upload" else "RESTORE",
                                       transfer_id=t.transfer_id, req=t.req))
        self.finish(t, "parked" if t.kind == "upload" else "failed", f"{exc.code}: {exc.reason}")

    def watch_stall(self, tid: str) -> None:
        """The watchdog: an upload with no acknowledged progress is parked, and
        the agent offers it again (silent hangs are how replication dies)."""
        t = self.transfers.get(tid)
        if t is None or t.kind not in ("upload", "copy"):
            return
        if t.state not in WATCHED_STATES:
            if not t.finished:
                self.stalls.schedule(tid, self.now + self.stall_s)
            return
        if t.node_id and self.credit.is_waiting(t.node_id, tid, t.device_id):
            # the broker is withholding credit (the node is busy with others): not the upload's silence;
            # its clock restarts when credit is granted
            self.stalls.schedule(tid, self.now + self.stall_s)
            return
        quiet = self.now - t.last_progress
        if quiet >= self.stall_s:
            self.interrupt(t, RequestError(f"no acknowledged progress for {self.stall_s:.0f}s", "stalled"))
        else:
            self.stalls.schedule(tid, t.last_progress + self.stall_s)

    # --- a sender's chunks and commit, to the node (an agent's upload, or a drain's copy) ---------------

    def pass_chunk(self, t: Transfer, msg, frames) -> int:
        """Spend the sender's credit on a CHUNK and forward it; returns its payload bytes."""
        node = self.node_of(t)
        wire_len = len(msg.payload[0])
        t.ledger.spend(msg["hash"], wire_len, msg["raw_len"], msg.get("offset"), msg.get("total"))
        t.bytes_sent += wire_len
        self.forward(node, frames, msg.t)
        return wire_len

    def pass_commit(self, t: Transfer, frames) -> None:
        """COMMIT: the credit the sender still holds returns to the node's pool, then it goes on."""
        node = self.node_of(t)
        t.last_progress = self.now
        self.credit.release(node.node_id, t.ledger.release_holding(), t.device_id)
        self.serve_waiting(node)
        self.forward(node, frames, "COMMIT")

    # --- credit -----------------------------------------------------------------------------------------

    def grant_credit(self, node, t: Transfer) -> None:
        if t.kind not in ("upload", "copy") or t.state != "active":
            return
        if t.kind == "upload" and self.quotas.over(t.device_id):  # passed its quota through another upload
            self.interrupt(t, self.quotas.exceeded(t.device_id))
            return
        granted = self.credit.grant(node.node_id, t.transfer_id, t.ledger, t.chunk_size)
        if granted:
            self.to_agent(t, make("CREDIT", transfer_id=t.transfer_id, bytes=granted))

    def serve_waiting(self, node) -> None:
        over = []  # uploads of devices past their quota: interrupted once the round is served, not granted

        def live(tid):
            t = self.transfers.get(tid)
            if t is None or t.kind not in ("upload", "copy") or t.state != "active":
                return None
            if t.kind == "upload" and self.quotas.over(t.device_id):
                over.append(t)
                return None
            return t

        for t, granted in self.credit.serve_waiting(node.node_id, live):
            t.last_progress = max(t.last_progress, self.now)  # its wait was ours, not its silence
            self.to_agent(t, make("CREDIT", transfer_id=t.transfer_id, bytes=granted))
        for t in over:
            if not t.finished:
                self.interrupt(t, self.quotas.exceeded(t.device_id))

    def quota_reached(self, t: Transfer) -> None:
        """A STORED of `t` took its device past its quota: its uploads still sending on this
        connection are interrupted (parked quota_exceeded); one committing adds nothing more and
        goes on. Uploads of the device on other connections stop at their next grant."""
        exc = self.quotas.exceeded(t.device_id)
        session = self.registry.agents.get(t.agent_routing)
        tids = [t.transfer_id, *(session.transfers if session is not None else ())]
        for tid in dict.fromkeys(tids):
            u = self.transfers.get(tid)
            if u is not None and u.kind == "upload" and u.device_id == t.device_id and u.state in (
                    "checking", "opening", "active"):
                self.interrupt(u, exc)
