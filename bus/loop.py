"""The one poll loop of every role process (zguide style: one thread owns
the sockets; CPU and disk work run on pools whose results come back through
a pipe the loop polls).

Each turn: wait until the earliest deadline (the core's, a link's) or until
something arrives; feed what arrived to its handler, a bounded burst per
socket so no peer starves the others; feed pool results; let the links and
the core act on what is due; execute every effect they return. The loop
owns the clock: handlers and cores get `now` and return effects.

Handlers: `on_frames(peer, frames, now) -> effects` for sockets,
`on_done(key, result, error, now) -> effects` for pools, and
`on_link(side, event, now) -> effects` for link events (connected, lost).
"""

from __future__ import annotations

import zmq

from bus.effects import Forward, Send, Submit
from bus.link import DealerLink
from bus.sockets import Outbox, recv_frames

MAX_WAIT_S = 0.2  # the longest a poll blocks, so that signals are seen promptly


class Loop:
    def __init__(self, clock, encode):
        self.clock = clock
        self.encode = encode
        self.poller = zmq.Poller()
        self._readers: dict = {}  # socket -> (side, handler, burst, routed)
        self.outboxes: dict[str, Outbox] = {}
        self.links: dict[str, tuple] = {}  # side -> (link, on_link)
        self._link_handlers: dict[str, tuple] = {}  # side -> (on_frames, burst)
        self._pools: dict[str, tuple] = {}  # name -> (pool, on_done)
        self._pool_fds: dict[int, str] = {}
        self.dropped_invalid = 0
        self.turns = 0

    # --- wiring ---------------------------------------------------------------------

    def add_socket(self, side: str, sock: zmq.Socket, on_frames, *, routed: bool, burst: int = 512) -> Outbox:
        self.poller.register(sock, zmq.POLLIN)
        self._readers[sock] = (side, on_frames, burst, routed)
        outbox = self.outboxes[side] = Outbox(sock, self.encode)
        return outbox

    def add_link(self, side: str, link: DealerLink, on_frames, on_link, *, burst: int = 512) -> None:
        self.links[side] = (link, on_link)
        self._link_handlers[side] = (on_frames, burst)
        if link.sock is not None:
            self._watch_link(side, link)

    def _watch_link(self, side: str, link: DealerLink) -> None:
        on_frames, burst = self._link_handlers[side]
        self.poller.register(link.sock, zmq.POLLIN)
        self._readers[link.sock] = (side, on_frames, burst, False)

    def _unwatch(self, sock) -> None:
        if sock in self._readers:
            self.poller.unregister(sock)
            del self._readers[sock]

    def add_pool(self, name: str, pool, on_done) -> None:
        self._pools[name] = (pool, on_done)
        self.poller.register(pool.fileno, zmq.POLLIN)
        self._pool_fds[pool.fileno] = name

    # --- effects --------------------------------------------------------------------

    def execute(self, effects, now: float) -> None:
        for effect in effects or ():
            kind = type(effect)
            if kind is Send:
                side, routing = effect.to
                link = self.links.get(side)
                if link is not None:
                    link[0].send(effect.message, now)
                else:
                    self.outboxes[side].send(effect.message, routing)
            elif kind is Forward:
                side, routing = effect.to
                link = self.links.get(side)
                if link is not None:
                    link[0].send_frames(effect.frames, now, effect.t)
                else:
                    self.outboxes[side].send_frames(effect.frames, routing, effect.t)
            elif kind is Submit:
                self._pools[effect.pool][0].submit(effect.key, effect.fn, *effect.args)
            else:
                raise TypeError(f"not an effect: {effect!r}")

    # --- running --------------------------------------------------------------------

    def run(self, stop, core, on_turn=None) -> None:
        """Until `stop.stopping`. `on_turn(now) -> effects` runs once a turn
        (signals such as reload are checked there)."""
        clock = self.clock
        while not stop.stopping:
            now = clock.now()
            due = core.next_deadline()
            for link, _ in self.links.values():
                link_due = link.next_deadline()
                due = link_due if due is None else min(due, link_due)
            wait = MAX_WAIT_S if due is None else min(MAX_WAIT_S, max(0.0, due - now))
            events = self.poller.poll(int(wait * 1000 + 0.999))
            now = clock.now()
            self.turns += 1
            for sock, _ in events:
                if isinstance(sock, int):
                    name = self._pool_fds[sock]
                    pool, on_done = self._pools[name]
                    for key, result, error in pool.done():
                        self.execute(on_done(key, result, error, now), now)
                elif sock in self._readers:
                    self._drain(sock, now)
            for side, (link, on_link) in self.links.items():
                if link.next_deadline() <= now:
                    old = link.sock
                    event = link.on_time(now)
                    if event is not None:
                        if old is not None and old is not link.sock:
                            self._unwatch(old)
                        if link.sock is not None and link.sock not in self._readers:
                            self._watch_link(side, link)
                        self.execute(on_link(side, event, now), now)
            self.execute(core.on_time(now), now)
            if on_turn is not None:
                self.execute(on_turn(now), now)

    def _drain(self, sock, now: float) -> None:
        side, on_frames, burst, routed = self._readers[sock]
        link = self.links.get(side)
        for _ in range(burst):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            if routed:
                if len(frames) < 2:
                    self.dropped_invalid += 1
                    continue
                peer = (side, frames[0].bytes)
                frames = frames[1:]
            else:
                peer = (side, None)
                link[0].heard(now)
            self.execute(on_frames(peer, frames, now), now)
            if sock not in self._readers:
                return  # the handler replaced the socket (a reconnect)

    def replace_link_socket(self, side: str, old) -> None:
        """After the owner reconnected a link by hand (not_registered, say)."""
        link = self.links[side][0]
        if old is not None:
            self._unwatch(old)
        if link.sock is not None and link.sock not in self._readers:
            self._watch_link(side, link)

    def close(self) -> None:
        for sock in list(self._readers):
            sock.close(linger=0)
        self._readers.clear()
