"""One DEALER connection to a broker, shared by the agent and the storage node.

Theory of operation (Paranoid Pirate, 7/MDP): on connect the link sends its
owner's register message (HELLO or READY). Any traffic counts as a
heartbeat both ways: every message heard moves `last_heard`, every message
sent moves `last_sent`, and a HEARTBEAT goes out only after an interval with
nothing else sent. A broker silent for `liveness` intervals is dead: the
socket is closed and a new one is opened when the back-off deadline comes
(doubling, reset by the first message heard), never by postdating liveness.

The link keeps no thread: the loop feeds it `now` and asks
`next_deadline()` when to wake.
"""

from __future__ import annotations

from typing import Callable

import zmq

from bus.effects import CONNECTED, LOST
from bus.heartbeat import Backoff
from bus.sockets import Outbox, make_dealer

__all__ = ["CONNECTED", "LOST", "DealerLink"]


class DealerLink:
    def __init__(self, ctx: zmq.Context, choose_endpoint: Callable[[], str], encode,
                 register: Callable[[float], object], heartbeat: Callable[[float], object],
                 interval_s: float, liveness: int, *, max_frame: int, secure=None, faults=None, clock=None):
        """`register(now)`/`heartbeat(now)` build the owner's HELLO|READY and
        HEARTBEAT; `choose_endpoint()` runs on every (re)connect. It may block
        (probing several brokers): with the driver's `clock()`, the new
        connection's liveness then counts from when it opened."""
        self.ctx = ctx
        self.max_frame = max_frame  # ZMQ_MAXMSGSIZE of every connection (bus.sockets.make_dealer)
        self._choose_endpoint = choose_endpoint
        self._encode = encode
        self._register = register
        self._heartbeat = heartbeat
        self.interval_s = interval_s
        self.liveness = liveness
        self.secure = secure
        self.faults = faults  # bus.linkfaults.LinkFaults, for tests
        self._clock = clock
        self.backoff = Backoff()
        self.endpoint = ""
        self.sock: zmq.Socket | None = None
        self.outbox: Outbox | None = None
        self.welcomed = False
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.reconnect_at: float | None = None
        self.connects = 0
        self.dropped_closed = 0  # sends while between connections

    # --- connection --------------------------------------------------------------

    def connect(self, now: float) -> zmq.Socket:
        self.close(say_bye=False)
        self.endpoint = self._choose_endpoint()
        if self._clock is not None:
            now = self._clock()
        self.sock = make_dealer(self.ctx, self.endpoint, max_frame=self.max_frame, secure=self.secure)
        self.outbox = Outbox(self.sock, self._encode)
        self.reconnect_at = None
        self.connects += 1
        self.last_heard = now
        self.register(now)
        return self.sock

    def register(self, now: float) -> None:
        """(Re-)register on the current connection (after not_registered too)."""
        self.welcomed = False
        self.send(self._register(now), now)

    def reconnect_after(self, delay_s: float, now: float) -> None:
        """Leave this connection (the broker refused it) and open a new one `delay_s` from now."""
        self.close(say_bye=False)
        self.reconnect_at = now + delay_s

    def close(self, say_bye: bool = True, bye=None) -> None:
        if self.sock is None:
            return
        if say_bye and bye is not None and self.welcomed:
            self.outbox.send(bye)
            self.sock.setsockopt(zmq.LINGER, 200)
        self.sock.close()
        self.sock = None
        self.outbox = None
        self.welcomed = False

    # --- traffic -------------------------------------------------------------------

    def send(self, message, now: float) -> bool:
        if self.outbox is None:
            self.dropped_closed += 1
            return False
        if self.faults is not None and message.t not in ("HELLO", "READY", "HEARTBEAT", "BYE"):
            if not self.faults.admit(message, now):
                self.last_sent = now
                return True  # as lost on the wire: the sender cannot tell
        self.last_sent = now
        return self.outbox.send(message)

    def send_frames(self, frames: list, now: float, t: str = "?") -> bool:
        if self.outbox is None:
            self.dropped_closed += 1
            return False
        self.last_sent = now
        return self.outbox.send_frames(frames, None, t)

    def set_interval(self, interval_s: float, now: float) -> None:
        """The heartbeat interval in force changes (an idle agent starts an upload, say). Going
        shorter, the broker gets a full liveness period at the new interval from now: it
        learns of the change only from what we send, and had until now been silent by right."""
        if interval_s < self.interval_s:
            self.last_heard = max(self.last_heard, now)
        self.interval_s = interval_s

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.backoff.reset()

    # --- time ------------------------------------------------------------------------

    def next_deadline(self) -> float:
        if self.reconnect_at is not None:
            return self.reconnect_at
        due = min(self.last_sent + self.interval_s, self.last_heard + self.interval_s * self.liveness)
        if self.faults is not None and self.faults.next_due() is not None:
            due = min(due, self.faults.next_due())
        return due

    def on_time(self, now: float) -> str | None:
        """LOST when the broker has just been declared dead (the socket is
        closed); CONNECTED when a new socket was opened; else None."""
        if self.reconnect_at is not None:
            if now >= self.reconnect_at:
                self.connect(now)
                return CONNECTED
            return None
        if self.faults is not None and self.outbox is not None:
            for message in self.faults.due(now):
                self.outbox.send(message)
        if now - self.last_heard >= self.interval_s * self.liveness:
            self.close(say_bye=False)
            self.reconnect_at = now + self.backoff.next_delay()
            return LOST
        if now - self.last_sent >= self.interval_s:
            self.send(self._heartbeat(now), now)
        return None

    def statistics(self) -> dict:
        return {"endpoint": self.endpoint, "welcomed": self.welcomed, "connects": self.connects,
                "dropped": (self.outbox.dropped_total if self.outbox else 0) + self.dropped_closed}
