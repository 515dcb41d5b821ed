"""zmq socket construction and the send/receive edge of every role.

Only role processes (and this module) touch zmq. Sends never block the loop:
everything goes out with NOBLOCK, and a message that cannot be queued (peer
gone with ROUTER_MANDATORY, or its pipe at the high-water mark) is counted
as a drop and reported to the caller.
"""

from __future__ import annotations

from collections import Counter

import msgpack
import zmq

# Credit bounds the bytes in flight; the HWM only bounds message counts, so
# it is set high enough never to be the limit in normal operation.
DEFAULT_HWM = 10_000
# Connections waiting to be accepted. libzmq's default (100) overflows when
# thousands of devices reconnect at once (a broker restart); the kernel caps
# it at net.core.somaxconn (4096 on current Linux).
DEFAULT_BACKLOG = 4096


def make_router(ctx: zmq.Context, bind: str, *, max_frame: int, mandatory: bool = True, hwm: int = DEFAULT_HWM,
                secure=None, backlog: int = DEFAULT_BACKLOG) -> zmq.Socket:
    """`secure(sock)` applies CURVE (bus.security) before the bind. `max_frame`: the
    largest frame a peer may send (schemas.limits.max_frame_for); libzmq drops the
    connection of a peer that sends a larger one, before buffering it."""
    sock = ctx.socket(zmq.ROUTER)
    if secure is not None:
        secure(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.BACKLOG, backlog)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if mandatory:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(bind)
    return sock


def make_dealer(ctx: zmq.Context, connect: str, *, max_frame: int, hwm: int = DEFAULT_HWM,
                secure=None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    if secure is not None:
        secure(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(connect)
    return sock


class Outbox:
    """Non-blocking sends with drop counting, one per socket.

    `encode(message, pack) -> frames` comes from the caller (schemas.encode),
    so the bus stays ignorant of what messages mean. One msgpack `Packer` is
    reused for every header (a fresh `packb` allocates a 1 MiB buffer per
    call, which malloc serves by mmap), and a message without fields
    (HEARTBEAT, BYE) is encoded once and its frames reused.
    """

    def __init__(self, sock: zmq.Socket, encode):
        self.sock = sock
        self.encode = encode
        self.dropped = Counter()
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._fieldless: dict[str, list] = {}

    def send(self, message, routing: bytes | None = None) -> bool:
        if not message.fields and not message.payload:
            frames = self._fieldless.get(message.t)
            if frames is None:
                frames = self._fieldless[message.t] = self.encode(message, self._pack)
        else:
            frames = self.encode(message, self._pack)
        return self.send_frames(frames, routing, message.t)

    def send_frames(self, frames: list, routing: bytes | None = None, t: str = "?") -> bool:
        if routing is not None:
            frames = [routing, *frames]
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped[t] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.dropped[t] += 1
                return False
            raise

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def recv_frames(sock: zmq.Socket) -> list:
    """All frames of one message, zero-copy for large ones."""
    return sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
