"""The scaling guard: with 10,000 registered sessions and nothing due, the
controller's `on_time` touches no session (counted through a counting
registry); when every heartbeat is due, it touches each once."""

from bus.clock import FakeClock
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex
from roles.controller.core import Controller
from schemas import decode, encode, make

N = 10_000


class CountingDict(dict):
    """A dict that counts every look-up and walk made through it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.touches = 0

    def get(self, key, default=None):
        self.touches += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.touches += 1
        return super().__getitem__(key)

    def __iter__(self):
        self.touches += len(self)
        return super().__iter__()

    def values(self):
        self.touches += len(self)
        return super().values()

    def items(self):
        self.touches += len(self)
        return super().items()


def test_on_time_does_constant_work_when_nothing_is_due():
    clock = FakeClock()
    config = BrokerConfig(insecure=True, heartbeat_interval_ms=1000, idle_heartbeat_interval_ms=1000,
                          heartbeat_liveness=3)
    controller = Controller(config, store=None, index=CatalogIndex())
    for i in range(N):
        frames = encode(make("HELLO", device_id=f"dev-{i}"))
        out = controller.received(("agent", f"r{i}".encode()), decode(frames), frames, clock.now())
        assert out[0].message.t == "WELCOME"
    assert len(controller.registry.agents) == N
    counting = CountingDict(controller.registry.agents)
    controller.registry.agents = counting
    clock.advance(0.5)
    assert controller.on_time(clock.now()) == []
    assert counting.touches == 0
    assert controller.next_deadline() == clock.now() + 0.5
    clock.advance(0.5)
    beats = controller.on_time(clock.now())
    assert len(beats) == N and {e.message.t for e in beats} == {"HEARTBEAT"}
    assert counting.touches == N


def test_an_idle_agent_beats_at_the_idle_interval_and_a_busy_one_at_the_short_one():
    from roles.controller.registry import Registry
    registry = Registry(1.0, 3, idle_interval_s=5.0)
    session = registry.register_agent(b"r", "dev", 100.0)
    assert registry.next_due() == 105.0  # idle: the first beat is owed after 5 s
    assert registry.due(104.9) == ([], [])
    registry.busy(session, True)  # an OFFER began a transfer: beats every second from now on
    assert registry.next_due() == 101.0
    beats, dead = registry.due(101.0)
    assert beats == [session] and not dead
    registry.busy(session, False)
    assert registry.due(103.5) == ([], [])  # idle again: silent 3.5 s is no death (5 s x 3 is)
    assert registry.due(114.9) == ([session], [])
    beats, dead = registry.due(115.0)
    assert dead == [session]
