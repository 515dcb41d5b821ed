"""`speedsync restore`: ask the broker for a snapshot and rebuild it, verified.

The driver around roles/appliance/restore.py's ImageWriter: one DEALER link
(bus.link.DealerLink: HELLO, heartbeats, liveness), RESTORE once welcomed,
then IMAGE and BLOCKs in order, each BLOCK's payload granted back as CREDIT
until the image is complete. Any ERROR, a broker that goes silent, no
answer within `connect_timeout_ms`, or no IMAGE or BLOCK for
`restore_idle_timeout_ms` ends it with a RequestError naming why, and no
output file. Only the stream counts as progress: a broker that keeps
beating while the node's stream has stopped does not keep a restore alive.
"""

from __future__ import annotations

import math

import zmq
from loguru import logger

from bus.clock import MonotonicClock
from bus.errors import CODES, RemoteProtocolError, RequestError
from bus.link import LOST, DealerLink
from bus.sockets import recv_frames
from roles.appliance.core import SOFTWARE
from roles.appliance.restore import ImageWriter
from roles.config import AgentConfig
from roles.endpoints import endpoint_chooser
from roles.process import MAX_POLL_MS, client_security
from schemas import decode, encode, make
from schemas.limits import max_frame_for

RESTORE_WINDOW = 32 * 1024 * 1024  # asked for; the broker caps it at its restore_window
STREAM_PROGRESS = frozenset({"ACCEPT", "IMAGE", "BLOCK"})


def restore(config: AgentConfig, dataset: str, snapshot: str, out: str, timeout_s: float | None = None) -> dict:
    """Run a restore to completion; raises RequestError with a clear reason on failure.
    `timeout_s`: how long the stream may stop (default: the config's restore_idle_timeout_ms)."""
    ctx = zmq.Context()
    secure = client_security(config)
    clock = MonotonicClock()
    link = DealerLink(ctx, endpoint_chooser(ctx, config, secure), encode,
                      lambda now: make("HELLO", device_id=config.device_id, software=SOFTWARE),
                      lambda now: make("HEARTBEAT"), config.heartbeat_interval_ms / 1000,
                      config.heartbeat_liveness, max_frame=max_frame_for("agent"), secure=secure, clock=clock.now)
    started = clock.now()
    link.connect(started)
    if timeout_s is None:
        timeout_s = config.restore_idle_timeout_ms / 1000
    try:
        with ImageWriter(out) as writer:
            return _restore_loop(link, writer, dataset, snapshot, out, (config.connect_timeout_ms / 1000, timeout_s),
                                 clock, started)
    finally:
        link.close(bye=make("BYE"))
        ctx.term()


def _receive(link: DealerLink, now: float) -> list:
    """Decoded messages waiting on the link (bad ones are logged and skipped)."""
    out = []
    for _ in range(512):
        try:
            frames = recv_frames(link.sock)
        except zmq.Again:
            break
        link.heard(now)
        try:
            msg = decode(frames, receiver="agent")
        except RemoteProtocolError as exc:
            logger.warning("bad message from broker: {}", exc)
            continue
        if msg.t == "WELCOME":
            link.welcomed = True
            link.interval_s = msg["heartbeat_interval_ms"] / 1000
        out.append(msg)
    return out


def _restore_loop(link, writer, dataset, snapshot, out, timeouts, clock, started) -> dict:
    connect_s, idle_s = timeouts
    transfer_id = None
    last_progress = clock.now()
    requested = False
    while True:
        t = clock.now()
        if not link.welcomed and t - last_progress > connect_s:
            raise RequestError(f"no broker answered at {link.endpoint} for {connect_s:.0f}s", "node_unavailable")
        if link.welcomed and t - last_progress > idle_s:
            what = "no block" if transfer_id is not None else "no answer to RESTORE"
            raise RequestError(f"the restore stream stopped: {what} for {idle_s:g}s", "stalled")
        if link.next_deadline() <= t and link.on_time(t) == LOST:
            raise RequestError(f"broker {link.endpoint} does not answer", "node_unavailable")
        if link.welcomed and not requested:
            link.send(make("RESTORE", req=1, dataset=dataset, snapshot=snapshot, window=RESTORE_WINDOW), t)
            requested = True
            last_progress = t
        wait_ms = max(0, min(MAX_POLL_MS, math.ceil((link.next_deadline() - t) * 1000)))
        if not link.sock.poll(wait_ms):
            continue
        for msg in _receive(link, clock.now()):
            if msg.t == "ERROR":
                raise RequestError(msg["reason"], msg["code"] if msg["code"] in CODES else "internal")
            if msg.t == "ACCEPT" and transfer_id is None:
                transfer_id = msg["transfer_id"]
            if msg.t in STREAM_PROGRESS and msg["transfer_id"] == transfer_id:
                last_progress = clock.now()  # only the stream is progress: heartbeats and pongs are not
            if msg.t == "IMAGE" and msg["transfer_id"] == transfer_id:
                writer.on_image(msg["image_size"], msg["chunk_size"], msg["chunk_count"], msg["image_blake3"])
            elif msg.t == "BLOCK" and msg["transfer_id"] == transfer_id:
                credit = writer.on_block(msg["index"], msg["hash"], msg["raw_len"], msg["codec"],
                                         msg.payload[0] if msg.payload else None)
                if credit and not writer.complete:
                    link.send(make("CREDIT", transfer_id=transfer_id, bytes=credit), clock.now())
            if writer.complete:
                writer.finish()
                return {"dataset": dataset, "snapshot": snapshot, "out": str(out), "bytes": writer.image_size,
                        "blake3": writer.expected_blake3.hex(), "seconds": round(clock.now() - started, 3)}
