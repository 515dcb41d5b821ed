"""Appliance agent process: finds snapshots, uploads what the cloud lacks.

The driver around roles/appliance/core.py's AgentCore: one DealerLink to a
broker (HELLO, heartbeats, reconnect with back-off, the best of several
endpoints), the agent's status ROUTER socket, and two pools: `work` (read,
hash, compress on every core) and `image` (one thread: the whole-image
blake3 fed in order), all in one bus.loop.Loop. Per turn it also applies a
SIGHUP reload, gives up under `--once` when no broker answers, and draws the
progress line; `--once` ends when nothing is active or queued.
"""

from __future__ import annotations

import json
import sys
import time

import zmq
from loguru import logger

from bus.clock import MonotonicClock
from bus.errors import RemoteProtocolError
from bus.link import DealerLink
from bus.loop import Loop
from bus.pipeline import TaskPool
from bus.sockets import make_router
from roles import config as cfg
from roles.appliance.core import AgentCore
from roles.render import Progress
from roles.config import AgentConfig
from roles.endpoints import endpoint_chooser, link_faults
from roles import metrics
from roles.process import StopFlag, client_security
from roles.statusclient import status_endpoint
from schemas import decode, encode, make
from schemas.limits import max_frame_for


class AgentProcess:
    def __init__(self, config: AgentConfig, once: bool = False, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.once = once
        self.clock = MonotonicClock()
        t = self.clock.now()
        self.core = AgentCore(config, t, clock=self.clock.now, wall_clock=time.time, once=once)
        self.work = TaskPool(config.threads, name="work")
        self.image = TaskPool(1, name="image")
        self.ctx = zmq.Context()
        secure = client_security(config)
        self.link = DealerLink(self.ctx, endpoint_chooser(self.ctx, config, secure), encode, self._register,
                               self.core.heartbeat_message, config.heartbeat_interval_ms / 1000,
                               config.heartbeat_liveness, max_frame=max_frame_for("agent"), secure=secure,
                               faults=link_faults(config),
                               clock=self.clock.now)
        self.link.connect(t)
        self.loop = Loop(self.clock, encode)
        self.loop.add_link("broker", self.link, self._from, self._on_link)
        self.loop.add_pool("image", self.image, self.core.completed)
        self.loop.add_pool("work", self.work, self.core.completed)
        status_sock = make_router(self.ctx, status_endpoint(config), max_frame=max_frame_for("agent", "operator"),
                                  mandatory=False)
        self.loop.add_socket("status", status_sock, self._from, routed=True, burst=64)
        self.progress = Progress()
        self.metrics = metrics.start(metrics.AgentMetrics, config.metrics_listen, self.core)
        self.unanswered_since: float | None = t  # no WELCOME since then
        self.gave_up = False
        self.signals: StopFlag | None = None

    # --- handlers the loop calls ------------------------------------------------------

    def _register(self, now: float):
        return self.core.register_message(now, endpoint=self.link.endpoint)

    def _from(self, peer, frames, now: float) -> list:
        try:
            msg = decode(frames, receiver="agent")
        except RemoteProtocolError as exc:
            return self.core.malformed(peer, exc, now)
        effects = self.core.received(peer, msg, frames, now)
        self.link.welcomed = self.core.welcomed  # for BYE at close
        if self.core.reconnect_after_s is not None:  # refused (ERROR forbidden): a new connection, later
            old = self.link.sock
            self.link.reconnect_after(self.core.reconnect_after_s, now)
            self.core.reconnect_after_s = None
            self.loop.replace_link_socket("broker", old)
        return effects

    def _on_link(self, side: str, event: str, now: float) -> list:
        return self.core.on_link(event, now)

    def _on_turn(self, now: float) -> list:
        effects = []
        if self.core.link_interval_s is not None:  # the broker's, from WELCOME: short while uploading
            self.link.set_interval(self.core.link_interval_s, now)
        if self.signals.reload_requested:
            self.signals.reload_requested = False
            effects += self._reload(now)
        if self.core.welcomed:
            self.unanswered_since = None
        elif self.unanswered_since is None:
            self.unanswered_since = now
        elif self.once and now - self.unanswered_since > self.config.connect_timeout_ms / 1000:
            effects += self.core.give_up(f"no broker answered at {self.link.endpoint} for "
                                         f"{self.config.connect_timeout_ms / 1000:.0f}s", now)
            self.gave_up = True
        if self.progress.enabled:
            self.progress.show(now, self.core.progress_rows(now))
        self.metrics.tick(now)
        return effects

    def _reload(self, now: float) -> list:
        """SIGHUP: apply the config file's limit, schedule and dataset settings live."""
        if self.config_path is None:
            return []
        try:
            fresh = cfg.load(AgentConfig, self.config_path)
        except cfg.ConfigError as exc:
            logger.error("reload refused, keeping the running config: {}", exc)
            return []
        self.config = fresh
        effects = self.core.reload(fresh, now)
        logger.info("config reloaded from {}", self.config_path)
        return effects

    @property
    def stopping(self) -> bool:
        """What the loop checks before each turn: a signal, a give-up, or `--once` done."""
        return self.signals.stopping or self.gave_up or (self.once and self.core.done)

    # --- running -----------------------------------------------------------------------

    def run(self, signals: StopFlag) -> int:
        self.signals = signals
        self.core.rescan(self.clock.now())
        try:
            self.loop.run(self, self.core, self._on_turn)
        finally:
            self.metrics.close()
            self.progress.done()  # the terminal gets its cursor back
            self.link.close(bye=make("BYE"))
            self.loop.close()
            self.work.close()
            self.image.close()
            self.core.close()
            self.ctx.term()
        return 1 if self.core.outcomes.failures() else 0


def run_agent(config: AgentConfig, once: bool, as_json: bool, config_path: str | None = None) -> int:
    stop = StopFlag().install()
    agent = AgentProcess(config, once=once, config_path=config_path)
    code = agent.run(stop)
    outcomes = agent.core.outcomes
    if as_json:
        json.dump(outcomes.summary(), sys.stdout)
        sys.stdout.write("\n")
    failed = outcomes.failures()
    if once and failed:
        reasons = "; ".join(f"{r['dataset']}/{r['snapshot']}: {r.get('reason', r.get('state'))}" for r in failed)
        print(f"speedsync agent: {len(failed)} snapshot(s) not committed: {reasons}", file=sys.stderr)
    if stop.stopping and once:
        return 1
    return code
