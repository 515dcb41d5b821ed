"""Live enrolment and revocation in the controller core, on a FakeClock
(roles/controller/enrolment.py; DESIGN.md "Fleet operations — contract").

The test plays the broker driver: every message goes through the real codec,
catalog work runs inline on a real CatalogStore, and `identify(frames)` says
which key name authenticated the connection the message came on (what
CURVE's User-Id says in the real process).
"""

from __future__ import annotations

import pytest

from bus.clock import FakeClock
from bus.effects import Send, Submit
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from schemas import decode, encode, make

MiB = 1 << 20


class Driver:
    def __init__(self, tmp_path):
        self.clock = FakeClock()
        self.store = CatalogStore(str(tmp_path / "catalog"))
        self.key_of: dict[tuple, str] = {}  # peer -> the key name its connection authenticated with
        self.current = None
        self.identified = 0
        self.controller = Controller(BrokerConfig(insecure=False), self.store, CatalogIndex(),
                                     identify=self._identify)
        self.sent: list = []  # (peer, decoded message)

    def _identify(self, frames):
        self.identified += 1
        return self.key_of.get(self.current)

    def run(self, effects) -> list:
        out = []
        for effect in effects:
            if isinstance(effect, Submit):
                try:
                    result, error = effect.fn(*effect.args), None
                except Exception as exc:
                    result, error = None, exc
                out += self.run(self.controller.completed(effect.key, result, error, self.clock.now()))
            elif isinstance(effect, Send):
                out.append((effect.to, decode(encode(effect.message))))
            else:
                out.append((effect.to, decode(effect.frames)))
        self.sent += out
        return out

    def connect(self, side: str, routing: bytes, name: str) -> tuple:
        peer = (side, routing)
        self.key_of[peer] = name
        return peer

    def send(self, peer, t: str, **fields) -> list:
        frames = encode(make(t, **fields))
        self.current = peer
        return self.run(self.controller.received(peer, decode(frames), frames, self.clock.now()))

    def keys_changed(self, domain: str, added=(), removed=()) -> list:
        return self.run(self.controller.keys_changed(domain, frozenset(added), frozenset(removed),
                                                     self.clock.now()))

    def to(self, peer) -> list:
        return [m for p, m in self.sent if p == peer]


def replies(out, peer) -> list:
    return [(m.t, m.get("code")) for p, m in out if p == peer]


@pytest.fixture
def broker(tmp_path):
    d = Driver(tmp_path)
    d.node = d.connect("node", b"n1", "node-a")
    assert d.send(d.node, "READY", node_id="node-a", window=8 * MiB, free_bytes=1 << 40, used_bytes=0) == []
    d.office1 = d.connect("agent", b"a1", "office-1")
    d.office2 = d.connect("agent", b"a2", "office-2")
    for peer, device in ((d.office1, "office-1"), (d.office2, "office-2")):
        assert replies(d.send(peer, "HELLO", device_id=device), peer) == [("WELCOME", None)]
    yield d
    d.store.close()


def offer(d, peer, snapshot: str) -> str:
    out = d.send(peer, "OFFER", req=1, dataset="fs", snapshot=snapshot, image_size=2 * MiB, chunk_size=MiB,
                 chunk_count=2)
    assert [m.t for p, m in out if p == d.node] == ["OPEN"]
    tid = next(m["transfer_id"] for p, m in out if p == d.node)
    d.send(d.node, "OPENED", transfer_id=tid)
    return tid


def test_a_removed_device_key_drops_its_session_aborts_its_upload_and_refuses_it_ever_after(broker):
    d = broker
    tid = offer(d, d.office1, "s1")
    other = offer(d, d.office2, "s1")
    d.clock.advance(1)
    out = d.keys_changed("devices", removed={"office-1"})
    # told at once, its upload aborted on the node, its session gone; office-2 untouched
    assert replies(out, d.office1) == [("ERROR", "forbidden")]
    assert [(m.t, m["transfer_id"]) for p, m in out if p == d.node] == [("ABORT", tid)]
    assert replies(out, d.office2) == []
    assert d.controller.registry.session(*d.office1) is None
    assert tid not in d.controller.transfers and other in d.controller.transfers
    assert d.controller.registry.known_devices == {"office-1": False, "office-2": True}
    # Every later message on that connection is forbidden, HELLO included: never
    # not_registered (which would make the agent say HELLO again at once).
    for t, fields in (("HEARTBEAT", {}), ("HELLO", {"device_id": "office-1"}), ("PING", {"seq": 1, "sent_us": 0}),
                      ("ABORT", {"transfer_id": tid})):
        assert replies(d.send(d.office1, t, **fields), d.office1) == [("ERROR", "forbidden")], t
    # A connection its key opened before the handler's table changed is refused too.
    late = d.connect("agent", b"a3", "office-1")
    assert replies(d.send(late, "HELLO", device_id="office-1"), late) == [("ERROR", "forbidden")]
    # office-2 carries on.
    assert replies(d.send(d.office2, "PING", seq=2, sent_us=0), d.office2) == [("PONG", None)]
    assert d.controller.registry.session(*d.office2) is not None
    assert d.controller.errors_by_code["forbidden"] == 6


def test_a_key_added_back_is_admitted_on_new_connections_only(broker):
    d = broker
    d.keys_changed("devices", removed={"office-1"})
    d.keys_changed("devices", added={"office-1"})
    fresh = d.connect("agent", b"a4", "office-1")
    assert replies(d.send(fresh, "HELLO", device_id="office-1"), fresh) == [("WELCOME", None)]
    assert replies(d.send(d.office1, "HELLO", device_id="office-1"), d.office1) == [("ERROR", "forbidden")]


def test_a_replaced_key_drops_the_connections_but_keeps_the_name_admitted(broker):
    d = broker
    out = d.keys_changed("devices", added={"office-1"}, removed={"office-1"})
    assert replies(out, d.office1) == [("ERROR", "forbidden")]
    assert d.controller.registry.session(*d.office1) is None
    fresh = d.connect("agent", b"a5", "office-1")
    assert replies(d.send(fresh, "HELLO", device_id="office-1"), fresh) == [("WELCOME", None)]


def test_a_removed_node_key_parks_its_transfers_and_refuses_the_node(broker):
    d = broker
    tid = offer(d, d.office1, "s1")
    out = d.keys_changed("nodes", removed={"node-a"})
    assert replies(out, d.node) == [("ERROR", "forbidden")]
    assert [(m.t, m.get("code")) for p, m in out if p == d.office1] == [("ERROR", "node_unavailable")]
    assert tid not in d.controller.transfers and "node-a" not in d.controller.registry.nodes_by_id
    assert replies(d.send(d.node, "READY", node_id="node-a", window=MiB, free_bytes=1, used_bytes=0), d.node) == \
        [("ERROR", "forbidden")]
    assert replies(d.send(d.node, "HEARTBEAT"), d.node) == [("ERROR", "forbidden")]


def test_operators_are_refused_once_removed_and_admins_are_tracked(broker):
    d = broker
    alice, bob = d.connect("status", b"s1", "alice"), d.connect("status", b"s2", "bob")
    d.keys_changed("admins", added={"alice"})
    assert d.controller.admins == {"alice"}
    assert d.keys_changed("operators", removed={"bob"}) == []  # a status connection holds no session
    assert replies(d.send(bob, "STATUS"), bob) == [("ERROR", "forbidden")]
    assert replies(d.send(alice, "STATUS"), alice) == [("STATUS_REPLY", None)]
    d.keys_changed("operators", added={"bob"})
    assert replies(d.send(bob, "STATUS"), bob) == [("STATUS_REPLY", None)]
    d.keys_changed("admins", removed={"alice"})
    assert d.controller.admins == set()


def test_every_message_of_a_session_is_checked_against_the_key_it_enrolled_with(broker):
    """Authority rests on each message's User-Id, not on the routing id: one lookup per
    message (a frame property), and a message under another key is refused and changes nothing."""
    d = broker
    tid = offer(d, d.office1, "s1")
    before = d.identified
    for seq in range(10):
        d.send(d.office1, "PING", seq=seq, sent_us=0)
        d.send(d.node, "HEARTBEAT")
    assert d.identified == before + 20
    d.key_of[d.office1] = "office-2"  # the same routing id, another device's key
    for t, fields in (("ABORT", {"transfer_id": tid}), ("PING", {"seq": 1, "sent_us": 0}),
                      ("HELLO", {"device_id": "office-2"})):
        assert replies(d.send(d.office1, t, **fields), d.office1) == [("ERROR", "forbidden")], t
    d.key_of[d.node] = "node-b"
    out = d.send(d.node, "STORED", transfer_id=tid, hash=bytes(32), raw_len=MiB, wire_len=MiB)
    assert replies(out, d.node) == [("ERROR", "forbidden")] and replies(out, d.office1) == []
    assert tid in d.controller.transfers and d.controller.transfers[tid].state == "active"
    assert d.controller.registry.session(*d.office1).device_id == "office-1"
    d.key_of[d.office1], d.key_of[d.node] = "office-1", "node-a"  # its own key again: served as before
    assert replies(d.send(d.office1, "PING", seq=2, sent_us=0), d.office1) == [("PONG", None)]


# --- the agent's side of a refusal ------------------------------------------------------------

def test_an_agent_refused_backs_off_on_a_new_connection_instead_of_saying_hello_again(tmp_path):
    from roles.appliance.core import BROKER, AgentCore
    from roles.config import AgentConfig

    clock = FakeClock()
    config = AgentConfig(device_id="office-1", state_dir=str(tmp_path / "state"), insecure=True)
    core = AgentCore(config, clock.now(), clock=clock.now, wall_clock=lambda: 1.7e9)

    def hear(t, **fields):
        frames = encode(make(t, **fields))
        return core.received(BROKER, decode(frames), frames, clock.now())

    delays = []
    for ref in ("HELLO", None, "HEARTBEAT"):
        out = hear("ERROR", code="forbidden", reason="the key of this connection is no longer listed", ref=ref)
        assert [e.message.t for e in out] == []  # no HELLO at once, unlike not_registered
        assert core.welcomed is False
        delays.append(core.reconnect_after_s)
        core.reconnect_after_s = None  # the driver took it: the link reconnects that much later
    assert delays == [1.0, 2.0, 4.0]
    # a refusal about one request (an OFFER naming another device) is that request's, not the connection's
    assert hear("ERROR", code="forbidden", reason="not yours", ref="OFFER", req=9) == []
    assert core.reconnect_after_s is None
    hear("WELCOME", heartbeat_interval_ms=1000)
    hear("ERROR", code="forbidden", reason="again", ref="HELLO")
    assert core.reconnect_after_s == 1.0
    core.close()
