"""Choosing the broker endpoint: measure each, use the best that answers.
Also the link faults the config asks for (tests only).

Each configured endpoint gets a HELLO on its own connection; the time to its
WELCOME is the round trip. The fastest wins; ties go to the earlier entry
(the config lists them in order of preference). The others get a BYE.
"""

from __future__ import annotations

import time
from typing import Callable

import zmq
from loguru import logger

from bus.errors import RemoteProtocolError
from bus.linkfaults import LinkFaults
from bus.sockets import make_dealer
from schemas import decode, encode, make
from schemas.limits import max_frame_for

PROBE_TIMEOUT_S = 2.0


def choose_endpoint(ctx: zmq.Context, config, secure, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    socks = {}
    poller = zmq.Poller()
    started = time.monotonic()
    for endpoint in config.brokers:
        sock = make_dealer(ctx, endpoint, max_frame=max_frame_for("agent"), secure=secure)
        sock.send_multipart(encode(make("HELLO", device_id=config.device_id)), flags=zmq.NOBLOCK)
        socks[sock] = endpoint
        poller.register(sock, zmq.POLLIN)
    rtts: dict[str, float] = {}
    deadline = started + min(timeout_s, config.connect_timeout_ms / 1000)
    try:
        while len(rtts) < len(socks) and time.monotonic() < deadline:
            for sock, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                try:
                    msg = decode(sock.recv_multipart())
                except RemoteProtocolError:
                    continue
                if msg.t == "WELCOME" and socks[sock] not in rtts:
                    rtts[socks[sock]] = time.monotonic() - started
                    poller.unregister(sock)
            if rtts and time.monotonic() - started > 2 * min(rtts.values()) + 0.05:
                break  # the rest are slower than twice the best: no need to wait for them
    finally:
        for sock in socks:
            try:
                sock.send_multipart(encode(make("BYE")), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close(linger=100)
    if not rtts:
        logger.warning("no broker answered among {}", ", ".join(config.brokers))
        return None
    order = {e: i for i, e in enumerate(config.brokers)}
    best = min(rtts, key=lambda e: (round(rtts[e], 3), order[e]))
    logger.info("using broker {} (round trip {:.1f} ms; answered: {})", best, rtts[best] * 1000,
                ", ".join(f"{e} {v * 1000:.1f} ms" for e, v in sorted(rtts.items(), key=lambda kv: kv[1])))
    return best


def endpoint_chooser(ctx: zmq.Context, config, secure) -> Callable[[], str]:
    """What bus.link.DealerLink calls on every (re)connect: the one broker, or
    the best that answers among several (the first when none does)."""
    def choose() -> str:
        if len(config.brokers) > 1:
            return choose_endpoint(ctx, config, secure) or config.brokers[0]
        return config.brokers[0]
    return choose


def link_faults(config) -> LinkFaults | None:
    faults = LinkFaults(config.fault_link_drop_rate, config.fault_link_delay_ms, config.fault_seed)
    if faults.active:
        logger.warning("fault injection on: dropping {:.1%} and delaying {} ms of what this agent sends",
                       config.fault_link_drop_rate, config.fault_link_delay_ms)
        return faults
    return None
