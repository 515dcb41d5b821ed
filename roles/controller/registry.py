"""Who is connected: agent sessions and storage nodes, with liveness.

Keyed by ZeroMQ routing id (what the ROUTER sees) and, for nodes, by node id.
A node that registers again from a new connection replaces its old session.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from bus.credit import CreditPool
from bus.heartbeat import Liveness


@dataclass
class AgentSession:
    routing: bytes
    device_id: str
    liveness: Liveness
    transfers: set = field(default_factory=set)


@dataclass
class NodeSession:
    routing: bytes
    node_id: str
    liveness: Liveness
    credit: CreditPool
    free_bytes: int = 0
    used_bytes: int = 0
    load: int = 0
    reserved_bytes: int = 0  # image bytes of uploads placed here, not yet committed
    transfers: set = field(default_factory=set)
    hungry: OrderedDict = field(default_factory=OrderedDict)  # uploads waiting for this node's credit
    alive: bool = True

    def status(self) -> dict:
        return {"node_id": self.node_id, "alive": self.alive, "free_bytes": self.free_bytes,
                "used_bytes": self.used_bytes, "load": self.load, "credit": self.credit.statistics(),
                "transfers": len(self.transfers)}


class Registry:
    def __init__(self, interval_s: float, liveness: int):
        self.interval_s = interval_s
        self.liveness = liveness
        self.agents: dict[bytes, AgentSession] = {}
        self.nodes: dict[bytes, NodeSession] = {}
        self.nodes_by_id: dict[str, NodeSession] = {}
        self.known_devices: dict[str, bool] = {}  # device_id -> connected
        self.lost_nodes: dict[str, NodeSession] = {}  # node_id -> last session, until it returns

    def register_agent(self, routing: bytes, device_id: str, now: float) -> AgentSession:
        session = AgentSession(routing, device_id, Liveness(self.interval_s, self.liveness, now))
        self.agents[routing] = session
        self.known_devices[device_id] = True
        return session

    def drop_agent(self, routing: bytes) -> AgentSession | None:
        session = self.agents.pop(routing, None)
        if session is not None and not any(a.device_id == session.device_id for a in self.agents.values()):
            self.known_devices[session.device_id] = False
        return session

    def register_node(self, routing: bytes, node_id: str, window: int, free: int, used: int,
                      now: float) -> tuple[NodeSession, NodeSession | None]:
        """Returns (new session, replaced session or None)."""
        old = self.nodes_by_id.get(node_id)
        if old is not None:
            self.nodes.pop(old.routing, None)
        session = NodeSession(routing, node_id, Liveness(self.interval_s, self.liveness, now), CreditPool(window),
                              free, used)
        self.nodes[routing] = session
        self.nodes_by_id[node_id] = session
        self.lost_nodes.pop(node_id, None)
        return session, old

    def drop_node(self, routing: bytes) -> NodeSession | None:
        session = self.nodes.pop(routing, None)
        if session is not None and self.nodes_by_id.get(session.node_id) is session:
            del self.nodes_by_id[session.node_id]
            session.alive = False
            self.lost_nodes[session.node_id] = session
        return session

    def dead_peers(self, now: float) -> tuple[list, list]:
        agents = [a for a in self.agents.values() if a.liveness.is_dead(now)]
        nodes = [n for n in self.nodes.values() if n.liveness.is_dead(now)]
        return agents, nodes

    def heartbeats_due(self, now: float):
        for a in self.agents.values():
            if a.liveness.heartbeat_due(now):
                yield "agent", a
        for n in self.nodes.values():
            if n.liveness.heartbeat_due(now):
                yield "node", n
