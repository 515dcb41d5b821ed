"""Appliance agent process: finds snapshots, uploads what the cloud lacks.

One poll loop over the broker connection, the agent's status socket and two
pools: `work` (read, hash, compress on every core) and `image` (one thread:
the whole-image blake3 fed in order). Uploads are plain `Upload` objects;
this module routes replies and pool results to them, starts what the planner
says is most urgent, and lets the WireScheduler decide, by weight and within
the bandwidth limit in force, whose chunk goes on the wire next.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections import deque

import zmq
from loguru import logger

from bus.errors import RemoteProtocolError, RequestError
from bus.linkfaults import LinkFaults
from bus.pacing import BlockingPacer
from bus.pipeline import TaskPool
from bus.sockets import Outbox, make_router, recv_frames
from roles import config as cfg
from roles.appliance.bandwidth import Bandwidth
from roles.appliance.chunker import ImageHasher
from roles.appliance.effort import CompressionEffort
from roles.appliance.endpoints import choose_endpoint
from roles.appliance.journal import Journal
from roles.appliance.link import BrokerLink
from roles.appliance.outcomes import Outcomes
from roles.appliance.planner import may_preempt, plan
from roles.appliance.progress import Progress
from roles.appliance import cbt
from roles.appliance.scanner import scan, scan_ids
from roles.appliance.status import agent_status
from roles.appliance.upload import Upload
from roles.appliance.wire import WireScheduler
from roles.config import AgentConfig
from roles.process import MAX_POLL_MS, StopFlag, client_security, now
from schemas import decode, encode, error_message, make

# Refusals that say "not now" rather than "never": the upload is parked and
# offered again without counting as a failed attempt.
PARKING_CODES = {"node_unavailable", "no_storage", "stalled", "storage_error"}
MAX_PIECE = 16 * 1024 * 1024 + 65536


def status_endpoint(config: AgentConfig) -> str:
    return config.status_bind or f"ipc://{os.path.join(config.state_dir, 'agent.sock')}"


class Agent:
    def __init__(self, config: AgentConfig, once: bool = False, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.once = once
        self.journal = Journal(config.state_dir)
        self.names = cbt.NamesStore(config.state_dir)
        self.read_pacer = BlockingPacer(config.read_limit)
        self.effort = CompressionEffort(config.compress_level, config.compress_adapt)
        self.work = TaskPool(config.threads, name="work")
        self.image = TaskPool(1, name="image")
        self.ctx = zmq.Context()
        self.secure = client_security(config)
        t = now()
        self.link = self._connect(t)
        self.status_sock = make_router(self.ctx, status_endpoint(config), mandatory=False)
        self.status_out = Outbox(self.status_sock, encode)
        self.bandwidth = Bandwidth(config.limit, config.schedule, config.yield_target_ms)
        self.wire = WireScheduler(config.wire_window, t)
        self.rate: int | None = None
        self.queue: deque = deque()  # PendingSnapshot, most urgent first
        self.active: dict[int, Upload] = {}  # by serial
        self.by_req: dict[int, Upload] = {}
        self.by_transfer: dict[str, Upload] = {}
        self.outcomes = Outcomes(once, config.park_timeout_ms / 1000)
        self.serials = itertools.count(1)
        self.pings = itertools.count(1)
        self.progress = Progress()
        self.next_scan = 0.0
        self.next_limit_check = 0.0
        self.wire_wait_until = 0.0
        self.unanswered_since: float | None = t  # no WELCOME since then
        self.resuming = self._interrupted_uploads()
        self.scanned_once = False

    # --- connection -----------------------------------------------------------

    def _connect(self, t: float) -> BrokerLink:
        endpoint = self.config.brokers[0]
        if len(self.config.brokers) > 1:
            endpoint = choose_endpoint(self.ctx, self.config, self.secure) or endpoint
        return BrokerLink(self.ctx, endpoint, self.config.device_id, self.config.heartbeat_interval_ms / 1000,
                          self.config.heartbeat_liveness, t, secure=self.secure, faults=_link_faults(self.config))

    def _interrupted_uploads(self) -> set:
        resuming = set()
        for dataset, snapshot, path in self.journal.interrupted():
            if os.path.exists(path):
                resuming.add((dataset, snapshot))
                logger.info("{}/{} was interrupted; it resumes from what the cloud holds", dataset, snapshot)
            else:
                logger.warning("{}/{} was interrupted but {} has vanished; forgetting it", dataset, snapshot, path)
                self.journal.forget_started(dataset, snapshot)
        return resuming

    # --- scheduling -------------------------------------------------------------

    def rescan(self, t: float) -> None:
        self.next_scan = t + self.config.scan_interval_ms / 1000
        busy = {u.pending.key for u in self.active.values()}
        pending = [p for p in scan(self.config.datasets, self.journal) if p.key not in busy]
        if self.once and self.scanned_once:
            pending = [p for p in pending if p.key in self.outcomes.results]  # --once: only what was pending at start
        self.scanned_once = True
        decided = plan(pending, self.resuming, self.journal.datasets_with_commits(), self.config.action_order)
        for p in decided.skipped:
            why = "catch_up: latest replicates only the newest snapshot"
            self.journal.record_skipped(p.dataset.name, p.snapshot, why)
            self.outcomes.skipped(p.key, p.dataset.name, p.snapshot, why)
            logger.info("skipping {}/{}: {}", p.dataset.name, p.snapshot, why)
        for p in decided.ordered:
            self.outcomes.queued(p.key, p.dataset.name, p.snapshot)
        self.queue = deque(decided.ordered)

    def start_uploads(self, t: float) -> None:
        if not self.link.welcomed:
            return
        # One snapshot per dataset at a time: an incremental waits for its
        # predecessor, whose chunks it will then not need to send.
        busy = {u.pending.dataset.name for u in self.active.values()}
        deferred = []
        while self.queue:
            pending = self.queue.popleft()
            if not self.outcomes.ready(pending.key, t) or pending.dataset.name in busy:
                deferred.append(pending)
                continue
            active_priorities = [u.pending.dataset.priority for u in self.active.values()]
            if len(self.active) >= self.config.max_active_transfers and not may_preempt(pending, active_priorities):
                deferred.append(pending)
                break
            busy.add(pending.dataset.name)
            self._start(pending)
        self.queue.extendleft(reversed(deferred))

    def _start(self, pending) -> None:
        serial = next(self.serials)
        hasher = ImageHasher()

        def submit(key, fn, *args):
            self.work.submit((serial, *key), fn, *args)

        def hash_image(pieces, final):
            self.image.submit((serial, "image"), _hash_step, hasher, pieces, final)

        upload = Upload(pending, submit, self._send, hash_image, compress_level=self.effort.level,
                        known=self._unchanged_chunks(pending), read_pacer=self.read_pacer)
        self.active[serial] = upload
        self.by_req[serial] = upload
        self.wire.add(serial, upload, pending.dataset.weight)
        self.outcomes.started(pending.key)
        self.journal.record_started(pending.dataset.name, pending.snapshot, pending.path)
        logger.info("offering {}/{} ({} bytes)", pending.dataset.name, pending.snapshot, pending.size)
        self._send(upload.offer(serial))

    def _unchanged_chunks(self, pending) -> dict | None:
        """Changed-block tracking: names of chunks the .changes sidecar says did not change."""
        if not os.path.exists(os.path.splitext(pending.path)[0] + cbt.SUFFIX):
            return None
        name = pending.dataset.name
        previous = self.journal.previous_committed(name, pending.snapshot)
        between = previous is not None and any(
            previous < other < pending.snapshot
            for other in scan_ids(pending.dataset) | self.journal.settled_snapshots(name))
        known, why = cbt.known_names(pending, previous, between, self.names)
        if known is None:
            logger.info("{}/{}: reading the whole image ({})", name, pending.snapshot, why)
        else:
            logger.info("{}/{}: reading only changed chunks ({})", name, pending.snapshot, why)
        return known

    def _send(self, message) -> None:
        self.link.send(message, now())

    # --- bandwidth ----------------------------------------------------------------

    def apply_limit(self, t: float) -> None:
        if t < self.next_limit_check and self.bandwidth.yielding is None:
            return
        self.next_limit_check = t + 0.5
        rate = self.bandwidth.current(t)
        if rate != self.rate:
            if self.bandwidth.yielding is None:
                logger.info("bandwidth limit now {} (set by {})", self.bandwidth.describe(rate)["limit"],
                            self.bandwidth.set_by)
            self.rate = rate
            self.wire.set_rate(rate, t)
        yielding = self.bandwidth.yielding
        if yielding is not None and yielding.probe_due(t) and self.link.welcomed:
            yielding.probe_sent(t)
            self.link.send(make("PING", seq=next(self.pings), sent_us=int(t * 1e6)), t)

    def adapt_effort(self, t: float) -> None:
        if not self.active or not self.effort.due(t):
            return
        level = self.effort.update(t, *self.wire.take_counts())
        for upload in self.active.values():
            upload.compress_level = level

    def reload(self) -> None:
        """SIGHUP: apply the config file's limit, schedule and dataset settings live."""
        if self.config_path is None:
            return
        try:
            fresh = cfg.load(AgentConfig, self.config_path)
        except cfg.ConfigError as exc:
            logger.error("reload refused, keeping the running config: {}", exc)
            return
        self.config = fresh
        self.bandwidth.reconfigure(fresh.limit, fresh.schedule, fresh.yield_target_ms)
        self.next_limit_check = 0.0
        self.next_scan = 0.0
        logger.info("config reloaded from {}", self.config_path)

    # --- events ---------------------------------------------------------------------

    def on_message(self, msg) -> None:
        if msg.t in ("WELCOME", "HEARTBEAT"):
            return
        if msg.t == "PONG":
            if self.bandwidth.yielding is not None:
                t = now()
                self.bandwidth.yielding.on_rtt(t - msg["sent_us"] / 1e6, t, self.wire.ack_rate)
            return
        if msg.t == "ERROR" and msg["code"] == "not_registered":
            # the broker restarted and forgot us: our transfers are gone with it
            self.on_broker_lost()
            self.link.hello(now())
            return
        upload = None
        if msg.get("transfer_id") is not None:
            upload = self.by_transfer.get(msg["transfer_id"])
        if upload is None and msg.get("req") is not None:
            upload = self.by_req.get(msg["req"])
        if upload is None:
            if msg.t == "ERROR":
                logger.warning("broker error {}: {}", msg["code"], msg["reason"])
            return
        try:
            self._dispatch(upload, msg)
        except RequestError as exc:
            self._fail(upload, f"{exc.code}: {exc.reason}")

    def _dispatch(self, upload: Upload, msg) -> None:
        upload.heard()
        if msg.t == "ACCEPT":
            self.by_req.pop(msg["req"], None)
            if not msg["committed"]:
                self.by_transfer[msg["transfer_id"]] = upload
            upload.on_accept(msg["transfer_id"], msg["committed"])
        elif msg.t == "MISSING":
            upload.on_missing(msg["start"], msg["missing"])
        elif msg.t == "CREDIT":
            upload.on_credit(msg["bytes"])
        elif msg.t == "STORED":
            upload.on_stored(msg["hash"], msg["raw_len"], msg["wire_len"])
            self.wire.acknowledged(msg["wire_len"], now())
        elif msg.t == "COMMITTED":
            upload.on_committed(msg["image_blake3"])
        elif msg.t == "ERROR" and msg["code"] in PARKING_CODES:
            upload.park(f"{msg['code']}: {msg['reason']}")
        elif msg.t == "ERROR":
            upload.fail(f"{msg['code']}: {msg['reason']}")
        if upload.finished:
            self._finished(upload)

    def on_task(self, key, result, error) -> None:
        serial, kind = key[0], key[1]
        upload = self.active.get(serial)
        if upload is None or upload.finished:
            return
        if error is not None:
            self._fail(upload, f"{kind} failed: {error}")
            return
        if kind == "hash":
            upload.on_hashed(key[2], result)
        elif kind == "compress":
            upload.on_compressed(*result)
        elif kind == "image" and result is not None:
            upload.on_image_digest(result)
        if upload.finished:
            self._finished(upload)

    def _fail(self, upload: Upload, reason: str) -> None:
        upload.fail(reason)
        if upload.transfer_id is not None:
            self._send(make("ABORT", transfer_id=upload.transfer_id))
        self._finished(upload)

    def _finished(self, upload: Upload) -> None:
        serial = next((s for s, u in self.active.items() if u is upload), None)
        if serial is None:
            return
        del self.active[serial]
        self.wire.remove(serial)
        self.wire.acknowledged(upload.unacked_wire)
        self.by_transfer.pop(upload.transfer_id, None)
        for req in [r for r, u in self.by_req.items() if u is upload]:
            del self.by_req[req]
        key = upload.pending.key
        t = now()
        after = self.outcomes.settle(key, upload.summary(), upload.state, upload.reason,
                                     os.path.exists(upload.pending.path), t)
        if after.action == "done":
            self.journal.record_committed(key[0], key[1], upload.image_blake3, upload.image_size)
            if len(upload.names) == upload.chunk_count:
                self.names.save(key[0], key[1], upload.chunk_size, upload.image_size, upload.names)
            self.resuming.discard(key)
            summary = self.outcomes.results[key]
            logger.info("committed {}/{}: {} chunks sent, {} bytes on the wire", key[0], key[1],
                        summary["chunks_sent"], summary["bytes_sent"])
        elif after.action == "drop":
            logger.warning("{}/{} vanished from {}; dropping it", key[0], key[1], upload.pending.path)
            self.journal.forget_started(key[0], key[1])
        elif after.action == "give_up":
            logger.error("{}/{}: giving up: {}", key[0], key[1], after.why)
        else:
            logger.warning("{}/{} {} ({}); offering again in {:.1f}s", key[0], key[1], upload.state, after.why,
                           after.at - t)
            self.queue.appendleft(upload.pending)

    def on_broker_lost(self) -> None:
        # Not the snapshots' fault: park them; they are offered again once a
        # broker welcomes us, and only what the cloud lacks travels again.
        for upload in list(self.active.values()):
            upload.park("broker connection lost")
            self._finished(upload)

    def watch_replies(self, t: float) -> None:
        """The agent's watchdog: an upload the cloud has gone silent about
        (a lost message, a broker that lost it) is parked and offered again."""
        limit = self.config.reply_timeout_ms / 1000
        for upload in [u for u in self.active.values() if u.silent_for(t) > limit]:
            if upload.transfer_id is not None:
                self._send(make("ABORT", transfer_id=upload.transfer_id))
            upload.park(f"no answer from the cloud for {limit:.0f}s")
            self._finished(upload)

    def give_up(self, reason: str) -> None:
        for upload in list(self.active.values()):
            upload.fail(reason)
            self._finished(upload)
        self.outcomes.fail_all(reason)
        self.queue.clear()

    # --- status socket ------------------------------------------------------------------

    def on_status_request(self) -> None:
        for _ in range(64):
            try:
                frames = recv_frames(self.status_sock)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            routing = frames[0].bytes
            try:
                msg = decode(frames[1:])
                if msg.t != "STATUS":
                    raise RequestError(f"{msg.t} is not a status request", "unknown_type")
                doc = agent_status(self, now())
                self.status_out.send(make("STATUS_REPLY", status=doc), routing)
            except (RemoteProtocolError, RequestError) as exc:
                self.status_out.send(error_message(exc), routing)

    # --- loop ---------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> int:
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self.status_sock, zmq.POLLIN)
        poller.register(self.work.fileno, zmq.POLLIN)
        poller.register(self.image.fileno, zmq.POLLIN)
        self.rescan(now())
        try:
            while not stop.stopping:
                if self.once and not self.active and not self.queue:
                    break
                if stop.reload_requested:
                    stop.reload_requested = False
                    self.reload()
                t = now()
                timeout_ms = MAX_POLL_MS
                if self.wire_wait_until:  # the bucket has tokens due: wake for them, even at once
                    timeout_ms = max(0, min(timeout_ms, math.ceil((self.wire_wait_until - t) * 1000)))
                events = dict(poller.poll(timeout_ms))
                t = now()
                if self.link.sock in events:
                    for msg in self.link.receive(t):
                        self.on_message(msg)
                for pool in (self.image, self.work):
                    if pool.fileno in events:
                        for key, result, error in pool.done():
                            self.on_task(key, result, error)
                if self.status_sock in events:
                    self.on_status_request()
                if self.link.welcomed:
                    self.unanswered_since = None
                elif self.unanswered_since is None:
                    self.unanswered_since = t
                elif self.once and t - self.unanswered_since > self.config.connect_timeout_ms / 1000:
                    self.give_up(f"no broker answered at {self.link.endpoint} for "
                                 f"{self.config.connect_timeout_ms / 1000:.0f}s")
                    break
                if not self.link.tick(t):
                    logger.warning("broker {} silent; reconnecting", self.link.endpoint)
                    self.on_broker_lost()
                    poller.unregister(self.link.sock)
                    backoff = self.link.backoff
                    self.link.close(say_bye=False)
                    self.link = self._connect(t)
                    self.link.backoff = backoff
                    self.link.liveness.heard(t + backoff.next_delay())
                    poller.register(self.link.sock, zmq.POLLIN)
                self.watch_replies(t)
                if not self.once and t >= self.next_scan:
                    self.rescan(t)
                self.start_uploads(t)
                self.apply_limit(t)
                wait = self.wire.pump(t, MAX_PIECE)
                self.wire_wait_until = t + wait if wait else 0.0
                self.adapt_effort(t)
                self.progress.show(t, [(f"{u.pending.dataset.name}/{u.pending.snapshot}", *u.progress(),
                                        t - u.started_at) for u in self.active.values()])
        finally:
            self.link.close()
            self.status_sock.close(linger=0)
            self.work.close()
            self.image.close()
            self.journal.close()
            self.ctx.term()
        return 1 if self.outcomes.failures() else 0


def _link_faults(config: AgentConfig) -> LinkFaults | None:
    faults = LinkFaults(config.fault_link_drop_rate, config.fault_link_delay_ms, config.fault_seed)
    if faults.active:
        logger.warning("fault injection on: dropping {:.1%} and delaying {} ms of what this agent sends",
                       config.fault_link_drop_rate, config.fault_link_delay_ms)
        return faults
    return None


def _hash_step(hasher: ImageHasher, pieces: list, final: bool):
    hasher.update(pieces)
    return hasher.digest() if final else None


def run_agent(config: AgentConfig, once: bool, as_json: bool, config_path: str | None = None) -> int:
    stop = StopFlag().install()
    agent = Agent(config, once=once, config_path=config_path)
    code = agent.run(stop)
    if as_json:
        json.dump(agent.outcomes.summary(), sys.stdout)
        sys.stdout.write("\n")
    failed = agent.outcomes.failures()
    if once and failed:
        reasons = "; ".join(f"{r['dataset']}/{r['snapshot']}: {r.get('reason', r.get('state'))}" for r in failed)
        print(f"speedsync agent: {len(failed)} snapshot(s) not committed: {reasons}", file=sys.stderr)
    if stop.stopping and once:
        return 1
    return code


def query_agent_status(config: AgentConfig, timeout_ms: int = 3000) -> dict:
    """`speedsync agent --config F --status`: ask the running agent."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(status_endpoint(config))
        sock.send_multipart(encode(make("STATUS")))
        if not sock.poll(timeout_ms):
            raise RequestError(f"no agent answers at {status_endpoint(config)} (is it running?)", "internal")
        reply = decode(sock.recv_multipart())
    finally:
        sock.close()
    if reply.t != "STATUS_REPLY":
        raise RequestError(reply.get("reason", "unexpected answer"), "internal")
    return dict(reply["status"])
