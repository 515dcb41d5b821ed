"""Who is connected: agent sessions and storage nodes, with liveness as deadlines.

Keyed by ZeroMQ routing id (what the ROUTER sees) and, for nodes, by node
id. Any message heard or sent only moves a timestamp (O(1)); each peer has
one deadline, the earlier of "heartbeat due" and "dead", and when it pops
`due(now)` re-checks the timestamps and schedules the next (7/MDP,
zguide's `purge_workers`: a wake-up costs what is due, never a walk over
every peer). A node that registers again from a new connection replaces
its old session. Dropping a session is O(1): per-device session counts say
when a device is no longer connected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bus.credit import CreditPool
from bus.deadlines import Deadlines
from roles.counting import decrement


@dataclass(eq=False)
class PeerSession:
    side: str
    routing: bytes
    last_heard: float
    last_sent: float
    interval_s: float = 1.0  # this session's heartbeat interval (an idle agent's is longer)

    @property
    def peer(self) -> tuple:
        return self.side, self.routing


@dataclass(eq=False)
class AgentSession(PeerSession):
    device_id: str = ""
    transfers: set = field(default_factory=set)


@dataclass(eq=False)
class NodeSession(PeerSession):
    node_id: str = ""
    credit: CreditPool | None = None
    free_bytes: int = 0
    used_bytes: int = 0
    load: int = 0
    reserved_bytes: int = 0  # image bytes of uploads placed here, not yet committed
    transfers: set = field(default_factory=set)
    alive: bool = True
    chunks: int = 0  # chunk files on the node, as it last reported
    gc_runs: int = 0
    gc_freed_bytes: int = 0

    def take_figures(self, msg) -> None:
        """The store figures of a READY or HEARTBEAT (absent from an older node: kept as they were)."""
        self.chunks = msg.get("chunks", self.chunks)
        self.gc_runs = msg.get("gc_runs", self.gc_runs)
        self.gc_freed_bytes = msg.get("gc_freed_bytes", self.gc_freed_bytes)

    def status(self) -> dict:
        return {"node_id": self.node_id, "alive": self.alive, "free_bytes": self.free_bytes,
                "used_bytes": self.used_bytes, "load": self.load, "credit": self.credit.statistics(),
                "transfers": len(self.transfers), "chunks": self.chunks, "gc_runs": self.gc_runs,
                "gc_freed_bytes": self.gc_freed_bytes}


class Registry:
    def __init__(self, interval_s: float, liveness: int, idle_interval_s: float | None = None):
        self.interval_s = interval_s
        self.idle_interval_s = max(interval_s, idle_interval_s or interval_s)
        self.liveness = liveness
        self.agents: dict[bytes, AgentSession] = {}
        self.nodes: dict[bytes, NodeSession] = {}
        self.nodes_by_id: dict[str, NodeSession] = {}
        self.known_devices: dict[str, bool] = {}  # device_id -> connected
        self.sessions_per_device: Counter = Counter()
        self.lost_nodes: dict[str, NodeSession] = {}  # node_id -> last session, until it returns
        self.deadlines = Deadlines()

    # --- sessions ---------------------------------------------------------------------

    def register_agent(self, routing: bytes, device_id: str, now: float) -> AgentSession:
        old = self.agents.get(routing)
        if old is None:
            self.sessions_per_device[device_id] += 1
        session = AgentSession("agent", routing, now, now, self.idle_interval_s, device_id=device_id)
        if old is not None:
            session.transfers = old.transfers
            session.interval_s = old.interval_s
        self.agents[routing] = session
        self.known_devices[device_id] = True
        self._schedule(session)
        return session

    def drop_agent(self, routing: bytes) -> AgentSession | None:
        session = self.agents.pop(routing, None)
        if session is not None:
            self.deadlines.cancel(("agent", routing))
            if not decrement(self.sessions_per_device, session.device_id):
                self.known_devices[session.device_id] = False
        return session

    def register_node(self, routing: bytes, node_id: str, pool: CreditPool, free: int, used: int,
                      now: float) -> NodeSession:
        session = NodeSession("node", routing, now, now, self.interval_s, node_id=node_id, credit=pool, free_bytes=free,
                              used_bytes=used)
        self.nodes[routing] = session
        self.nodes_by_id[node_id] = session
        self.lost_nodes.pop(node_id, None)
        self._schedule(session)
        return session

    def drop_node(self, routing: bytes) -> NodeSession | None:
        session = self.nodes.pop(routing, None)
        if session is not None:
            self.deadlines.cancel(("node", routing))
            if self.nodes_by_id.get(session.node_id) is session:
                del self.nodes_by_id[session.node_id]
                session.alive = False
                self.lost_nodes[session.node_id] = session
        return session

    def session(self, side: str, routing: bytes):
        return (self.agents if side == "agent" else self.nodes).get(routing)

    # --- liveness -------------------------------------------------------------------------

    @staticmethod
    def heard(session: PeerSession, now: float) -> None:
        session.last_heard = now

    @staticmethod
    def sent(session: PeerSession, now: float) -> None:
        session.last_sent = now

    def busy(self, session: AgentSession, busy: bool) -> None:
        """An agent's first transfer began (beat at the short interval from now on) or its last ended."""
        interval = self.interval_s if busy else self.idle_interval_s
        if session.interval_s != interval:
            session.interval_s = interval
            if busy:  # sooner than what is scheduled: the agent now expects us at the short interval
                self._schedule(session)

    def _schedule(self, session: PeerSession) -> None:
        death = session.last_heard + session.interval_s * self.liveness
        beat = session.last_sent + session.interval_s
        self.deadlines.schedule(session.peer, min(death, beat))

    def due(self, now: float) -> tuple[list, list]:
        """(sessions owed a heartbeat, sessions dead) among the peers whose deadline came.
        Those owed a heartbeat are counted as sent at `now`: the caller sends it."""
        beats, dead = [], []
        for side, routing in self.deadlines.pop_due(now):
            session = self.session(side, routing)
            if session is None:
                continue
            if now >= session.last_heard + session.interval_s * self.liveness:
                dead.append(session)
                continue
            if now >= session.last_sent + session.interval_s:
                beats.append(session)
                session.last_sent = now
            self._schedule(session)
        return beats, dead

    def next_due(self) -> float | None:
        return self.deadlines.next_due()
