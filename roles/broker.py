"""Cloud controller process: the driver around `roles.controller.core.Controller`.

Three ROUTERs (agents, storage nodes, status), the CURVE authenticator, one
poll loop and a one-thread catalog pool. Every message is decoded by
`schemas.decode` first; a bad one is answered with ERROR and changes
nothing. The controller decides; this module only moves frames and runs
effects (ROLES.md).
"""

from __future__ import annotations

import os
import time

import zmq
from loguru import logger

from bus import security
from bus.clock import MonotonicClock
from bus.errors import RemoteProtocolError
from bus.loop import Loop
from bus.pipeline import TaskPool
from bus.sockets import make_router
from roles.config import BrokerConfig
from roles.controller.catalog import CatalogIndex, CatalogStore
from roles.controller.core import Controller
from roles import metrics
from roles.process import StopFlag, tune_malloc
from schemas import decode, encode


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class BrokerProcess:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.store = CatalogStore(config.data_dir)
        self.catalog_pool = TaskPool(1, name="catalog")
        self.ctx = zmq.Context()
        self.auth = None
        secure = {"devices": None, "nodes": None, "operators": None}
        if config.insecure:
            logger.warning("insecure: true: plain TCP, peers are not authenticated and ids are taken on trust")
        else:
            ours = security.load_keypair(config.key_file)
            self.auth = security.Authenticator(self.ctx, {"devices": config.authorized_keys,
                                                          "nodes": config.node_keys,
                                                          "operators": config.operator_keys})
            secure = {domain: (lambda sock, d=domain: security.make_server(sock, ours, d)) for domain in secure}
        self.loop = Loop(MonotonicClock(), encode)
        index = CatalogIndex(self.store.placements(), self.store.newest_commits())  # before the loop starts
        self.controller = Controller(config, self.store, index,
                                     identify=lambda frames: security.peer_identity(frames[0]),
                                     process_figures=self.figures, wall_clock=time.time)
        for side, bind, domain in (("agent", config.frontend_bind, "devices"), ("node", config.backend_bind, "nodes"),
                                   ("status", config.status_bind, "operators")):
            self.loop.add_socket(side, make_router(self.ctx, bind, secure=secure[domain]), self.on_frames,
                                 routed=True)
        self.loop.add_pool("catalog", self.catalog_pool, self.controller.completed)
        self.metrics = metrics.start(metrics.BrokerMetrics, config.metrics_listen, self.controller, self.figures)

    def on_frames(self, peer, frames, now: float) -> list:
        try:
            msg = decode(frames)
        except RemoteProtocolError as exc:
            return self.controller.malformed(peer, exc, now)
        return self.controller.received(peer, msg, frames, now)

    def figures(self) -> dict:
        dropped = sum(out.dropped_total for out in self.loop.outboxes.values()) + self.loop.dropped_invalid
        return {"rss_bytes": rss_bytes(), "dropped_messages": dropped}

    def run(self, stop: StopFlag) -> None:
        logger.info("broker up: agents {}, nodes {}, status {}", self.config.frontend_bind,
                    self.config.backend_bind, self.config.status_bind)
        try:
            self.loop.run(stop, self.controller, self.metrics.tick)
        finally:
            self.metrics.close()
            self.loop.close()
            self.catalog_pool.close()  # waits for catalog work in progress: a commit is never cut short
            self.store.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()


def run_broker(config: BrokerConfig) -> int:
    tune_malloc()
    stop = StopFlag().install()
    BrokerProcess(config).run(stop)
    return 0
