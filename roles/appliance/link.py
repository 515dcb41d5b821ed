"""The agent's connection to a broker: DEALER, HELLO/WELCOME, heartbeats, reconnect.

Shared by the replicating agent and the restore command. The owner polls
`sock` and calls `receive()`; `tick(now)` sends heartbeats and says whether
the broker has gone silent (then `reconnect()` gives a fresh session).
"""

from __future__ import annotations

import zmq
from loguru import logger

from bus.errors import RemoteProtocolError
from bus.heartbeat import Backoff, Liveness
from bus.linkfaults import LinkFaults
from bus.sockets import Outbox, make_dealer, recv_frames
from schemas import decode, encode, make

SOFTWARE = "speedsync-agent/0.1"


class BrokerLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, device_id: str, interval_s: float, liveness: int, now: float,
                 secure=None, faults: LinkFaults | None = None):
        self.ctx = ctx
        self.secure = secure
        self.faults = faults
        self.endpoint = endpoint
        self.device_id = device_id
        self.interval_s = interval_s
        self.liveness_count = liveness
        self.backoff = Backoff()
        self.sock = None
        self.outbox = None
        self.welcomed = False
        self.bad_messages = 0
        self.connect(now)

    def connect(self, now: float) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = make_dealer(self.ctx, self.endpoint, secure=self.secure)
        self.outbox = Outbox(self.sock, encode)
        self.liveness = Liveness(self.interval_s, self.liveness_count, now)
        self.hello(now)

    def hello(self, now: float) -> None:
        """(Re-)register on the current connection."""
        self.welcomed = False
        self.send(make("HELLO", device_id=self.device_id, software=SOFTWARE), now)

    def send(self, message, now: float | None = None) -> bool:
        if self.faults is not None and message.t not in ("HELLO", "HEARTBEAT", "BYE"):
            if not self.faults.admit(message, now if now is not None else 0.0):
                return True  # as lost on the wire: the sender cannot tell
        ok = self.outbox.send(message)
        if now is not None:
            self.liveness.sent(now)
        return ok

    def receive(self, now: float) -> list:
        """Decoded messages waiting on the socket (bad ones are counted and skipped)."""
        out = []
        for _ in range(512):
            try:
                frames = recv_frames(self.sock)
            except zmq.Again:
                break
            self.liveness.heard(now)
            try:
                msg = decode(frames)
            except RemoteProtocolError as exc:
                self.bad_messages += 1
                logger.warning("bad message from broker: {}", exc)
                continue
            if msg.t == "WELCOME":
                self.welcomed = True
                self.backoff.reset()
                self.liveness.interval_s = msg["heartbeat_interval_ms"] / 1000
            out.append(msg)
        return out

    def tick(self, now: float) -> bool:
        """Heartbeat if due; False when the broker is considered dead."""
        if self.faults is not None:
            for message in self.faults.due(now):
                self.outbox.send(message)
        if self.liveness.is_dead(now):
            return False
        if self.liveness.heartbeat_due(now):
            self.send(make("HEARTBEAT"), now)
        return True

    def close(self, say_bye: bool = True) -> None:
        if self.sock is not None:
            if say_bye and self.welcomed:
                self.outbox.send(make("BYE"))
                self.sock.setsockopt(zmq.LINGER, 200)
            self.sock.close()
            self.sock = None
