"""Cloud controller process: the driver around `roles.controller.core.Controller`.

Three ROUTERs (agents, storage nodes, status), the CURVE authenticator, one
poll loop and a one-thread catalog pool. Every message is decoded by
`schemas.decode` first; a bad one is answered with ERROR and changes
nothing. The controller decides; this module only moves frames and runs
effects (ROLES.md). Under CURVE the key directories are rescanned on a
one-thread "keys" pool every `keys_rescan_ms` and on SIGHUP: the ZAP
handler's table is swapped and the controller told what changed (live
enrolment, roles/controller/enrolment.py).
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
from roles.controller.catalog import CatalogIndex, open_store
from roles.controller.core import Controller
from roles import metrics
from roles.process import StopFlag, tune_malloc
from schemas import decode, encode
from schemas.limits import max_frame_for

# socket side -> the role whose messages arrive there: its frames are bounded by what the broker
# receives from that role (an agent's CHUNK, a node's BLOCK; an operator's requests are small)
SENDERS = {"agent": "agent", "node": "node", "status": "operator"}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class BrokerProcess:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.store = open_store(config.data_dir, config.catalog_url)
        self.catalog_pool = TaskPool(1, name="catalog")
        self.ctx = zmq.Context()
        self.auth = None
        self.keys_pool = TaskPool(1, name="keys")
        self.rescan_at: float | None = None  # None: a scan is running (or CURVE is off)
        self.key_problems: set = set()
        secure = {"devices": None, "nodes": None, "operators": None}
        if config.insecure:
            logger.warning("insecure: true: plain TCP, peers are not authenticated and ids are taken on trust")
        else:
            ours = security.load_keypair(config.key_file)
            self.auth = security.Authenticator(self.ctx, {"devices": config.authorized_keys,
                                                          "nodes": config.node_keys,
                                                          "operators": config.operator_keys,
                                                          "admins": config.admin_keys})
            secure = {domain: (lambda sock, d=domain: security.make_server(sock, ours, d)) for domain in secure}
            for problem in self.auth.skipped:
                logger.warning("key directories: key refused: {}", problem)
            self.key_problems = set(self.auth.problems)
        self.clock = MonotonicClock()
        self.loop = Loop(self.clock, encode)
        index = CatalogIndex(self.store.placements(), self.store.newest_commits())  # before the loop starts
        self.controller = Controller(config, self.store, index,
                                     identify=lambda frames: security.peer_identity(frames[0]),
                                     process_figures=self.figures, wall_clock=time.time,
                                     usage=self.store.usage(), drains=self.store.drains())
        if self.auth is not None:
            self.controller.keys_changed("admins", self.auth.keys.names("admins"), (), self.clock.now())
            self.rescan_at = self.clock.now() + config.keys_rescan_ms / 1000
        for side, bind, domain in (("agent", config.frontend_bind, "devices"), ("node", config.backend_bind, "nodes"),
                                   ("status", config.status_bind, "operators")):
            sock = make_router(self.ctx, bind, max_frame=max_frame_for("broker", SENDERS[side]), secure=secure[domain],
                               backlog=config.listen_backlog)
            self.loop.add_socket(side, sock, self.on_frames, routed=True)
        self.loop.add_pool("catalog", self.catalog_pool, self.controller.completed)
        self.metrics = metrics.start(metrics.BrokerMetrics, config.metrics_listen, self.controller, self.figures)
        self.loop.add_pool("keys", self.keys_pool, self.keys_scanned)

    def on_frames(self, peer, frames, now: float) -> list:
        try:
            msg = decode(frames, receiver="broker")
        except RemoteProtocolError as exc:
            return self.controller.malformed(peer, exc, now)
        return self.controller.received(peer, msg, frames, now)

    def on_turn(self, now: float) -> list:
        """Start a key rescan when due or asked for by SIGHUP (one at a time)."""
        if self.auth is not None and self.rescan_at is not None and (now >= self.rescan_at or
                                                                     self.stop.reload_requested):
            self.stop.reload_requested = False
            self.rescan_at = None
            self.keys_pool.submit("keys", self.auth.scan)
        return self.metrics.tick(now)

    def keys_scanned(self, key, result, error, now: float) -> list:
        """A rescan finished: new handshakes see the new table; the controller drops what was revoked."""
        self.rescan_at = now + self.config.keys_rescan_ms / 1000
        if error is not None:
            logger.error("rescanning the key directories failed, keeping the keys: {}", error)
            return []
        for problem in sorted(set(result.problems) - self.key_problems):
            logger.error("key directories: {}", problem)
        self.key_problems = set(result.problems)
        self.auth.install(result)
        effects = []
        for domain, (added, removed) in result.changes.items():
            effects += self.controller.keys_changed(domain, added, removed, now)
        return effects

    def save_usage_at_stop(self) -> None:
        """The stored bytes not yet saved (the last second's), written from here: the pool is closed."""
        usage = self.controller.quotas.unsaved()
        if not usage:
            return
        try:
            self.store.save_usage(usage)
        except Exception as exc:  # the catalog's own failure: logged, the stop goes on
            logger.error("saving the stored bytes of {} devices at stop failed: {}", len(usage), exc)

    def figures(self) -> dict:
        dropped = sum(out.dropped_total for out in self.loop.outboxes.values()) + self.loop.dropped_invalid
        return {"rss_bytes": rss_bytes(), "dropped_messages": dropped}

    def run(self, stop: StopFlag) -> None:
        self.stop = stop
        logger.info("broker up: agents {}, nodes {}, status {}", self.config.frontend_bind,
                    self.config.backend_bind, self.config.status_bind)
        try:
            self.loop.run(stop, self.controller, self.on_turn)
        finally:
            self.metrics.close()
            self.loop.close()
            self.keys_pool.close()
            self.catalog_pool.close()  # waits for catalog work in progress: a commit is never cut short
            self.save_usage_at_stop()
            self.store.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()


def run_broker(config: BrokerConfig) -> int:
    tune_malloc()
    stop = StopFlag().install()
    BrokerProcess(config).run(stop)
    return 0
