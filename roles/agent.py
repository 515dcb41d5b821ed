"""Appliance agent process: finds snapshots, uploads what the cloud lacks.

One poll loop over the broker connection and two pools: `work` (read, hash,
compress on every core) and `image` (one thread: the whole-image blake3 fed
in order). Uploads are plain `Upload` objects; this module routes replies
and pool results to them and decides what starts next (priority, then age).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import deque

import zmq
from loguru import logger

from bus.linkfaults import LinkFaults
from bus.pipeline import TaskPool
from bus.errors import RequestError
from roles.appliance.chunker import ImageHasher
from roles.appliance.journal import Journal
from roles.appliance.link import BrokerLink
from roles.appliance.progress import Progress
from roles.appliance.scanner import scan
from roles.appliance.upload import Upload
from roles.config import AgentConfig
from roles.process import MAX_POLL_MS, StopFlag, client_security, now
from schemas import make

MAX_ATTEMPTS_ONCE = 4
PARK_RETRY_S = 2.0
# Refusals that say "not now" rather than "never": the upload is parked and
# offered again without counting as a failed attempt.
PARKING_CODES = {"node_unavailable", "no_storage", "stalled", "storage_error"}


class Agent:
    def __init__(self, config: AgentConfig, once: bool = False):
        self.config = config
        self.once = once
        self.journal = Journal(config.state_dir)
        self.work = TaskPool(config.threads, name="work")
        self.image = TaskPool(1, name="image")
        self.ctx = zmq.Context()
        self.link = BrokerLink(self.ctx, config.brokers[0], config.device_id, config.heartbeat_interval_ms / 1000,
                               config.heartbeat_liveness, now(), secure=client_security(config),
                               faults=_link_faults(config))
        self.queue: deque = deque()  # PendingSnapshot, most urgent first
        self.queued_keys: set = set()
        self.active: dict[int, Upload] = {}  # by serial
        self.by_req: dict[int, Upload] = {}
        self.by_transfer: dict[str, Upload] = {}
        self.hashers: dict[int, ImageHasher] = {}
        self.results: dict[tuple, dict] = {}  # (dataset, snapshot) -> summary of the last attempt
        self.attempts: dict[tuple, int] = {}
        self.carry: dict[tuple, dict] = {}  # counters of failed attempts, added to the summary
        self.retry_at: dict[tuple, float] = {}
        self.parked_since: dict[tuple, float] = {}
        self.serials = itertools.count(1)
        self.progress = Progress()
        self.next_scan = 0.0
        self.unanswered_since: float | None = now()  # no WELCOME since then
        self.resuming: set = set()
        for dataset, snapshot, path in self.journal.interrupted():
            if os.path.exists(path):
                self.resuming.add((dataset, snapshot))
                logger.info("{}/{} was interrupted; it resumes from what the cloud holds", dataset, snapshot)
            else:
                logger.warning("{}/{} was interrupted but {} has vanished; forgetting it", dataset, snapshot, path)
                self.journal.forget_started(dataset, snapshot)

    # --- scheduling ---------------------------------------------------------

    def rescan(self, t: float) -> None:
        self.next_scan = t + self.config.scan_interval_ms / 1000
        active_keys = {u.pending.key for u in self.active.values()}
        fresh = [p for p in scan(self.config.datasets, self.journal)
                 if p.key not in active_keys and p.key not in self.queued_keys]
        if self.once and self.results:
            fresh = [p for p in fresh if p.key in self.results]
        for p in fresh:
            self.queue.append(p)
            self.queued_keys.add(p.key)
            self.results.setdefault(p.key, {"dataset": p.dataset.name, "snapshot": p.snapshot, "state": "queued"})
        if fresh:
            # interrupted uploads first within a priority (DESIGN: resume before new work)
            self.queue = deque(sorted(self.queue, key=lambda p: (p.dataset.priority, p.key not in self.resuming,
                                                                 p.order())))

    def start_uploads(self, t: float) -> None:
        if not self.link.welcomed:
            return
        deferred = []
        # One snapshot per dataset at a time: an incremental waits for its
        # predecessor, whose chunks it will then not need to send.
        busy = {u.pending.dataset.name for u in self.active.values()}
        while self.queue and len(self.active) < self.config.max_active_transfers:
            pending = self.queue.popleft()
            if self.retry_at.get(pending.key, 0) > t or pending.dataset.name in busy:
                deferred.append(pending)
                continue
            busy.add(pending.dataset.name)
            self.queued_keys.discard(pending.key)
            self._start(pending, t)
        self.queue.extendleft(reversed(deferred))

    def _start(self, pending, t: float) -> None:
        serial = next(self.serials)
        hasher = self.hashers[serial] = ImageHasher()

        def submit(key, fn, *args):
            self.work.submit((serial, *key), fn, *args)

        def hash_image(pieces, final):
            self.image.submit((serial, "image"), _hash_step, hasher, pieces, final)

        upload = Upload(pending, submit, self._send, hash_image, compress_level=self.config.compress_level)
        self.active[serial] = upload
        req = serial
        self.by_req[req] = upload
        self.attempts[pending.key] = self.attempts.get(pending.key, 0) + 1
        self.journal.record_started(pending.dataset.name, pending.snapshot, pending.path)
        logger.info("offering {}/{} ({} bytes)", pending.dataset.name, pending.snapshot, pending.size)
        self._send(upload.offer(req))

    def _send(self, message) -> None:
        self.link.send(message, now())

    # --- events ---------------------------------------------------------------

    def on_message(self, msg) -> None:
        if msg.t in ("WELCOME", "HEARTBEAT"):
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
            upload.on_stored(msg["hash"], msg["raw_len"])
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
        self.hashers.pop(serial, None)
        self.by_transfer.pop(upload.transfer_id, None)
        for req in [r for r, u in self.by_req.items() if u is upload]:
            del self.by_req[req]
        key = upload.pending.key
        summary = upload.summary()
        carried = self.carry.get(key, {})
        for field in ("chunks_sent", "bytes_read", "bytes_sent"):
            summary[field] += carried.get(field, 0)
        summary["seconds"] = round(summary["seconds"] + carried.get("seconds", 0.0), 3)
        self.results[key] = summary
        if upload.state == "committed":
            self.journal.record_committed(key[0], key[1], upload.image_blake3, upload.image_size)
            self.carry.pop(key, None)
            self.parked_since.pop(key, None)
            logger.info("committed {}/{}: {} chunks sent, {} bytes on the wire", key[0], key[1],
                        summary["chunks_sent"], summary["bytes_sent"])
            return
        self.carry[key] = {f: summary[f] for f in ("chunks_sent", "bytes_read", "bytes_sent", "seconds")}
        if not os.path.exists(upload.pending.path):
            # deleted on the appliance (its retention) while we worked: nothing left to send
            logger.warning("{}/{} vanished from {}; dropping it", key[0], key[1], upload.pending.path)
            summary["state"] = "vanished"
            self.journal.forget_started(key[0], key[1])
            self.parked_since.pop(key, None)
            return
        if upload.state == "parked":
            self.attempts[key] = self.attempts.get(key, 1) - 1  # not the snapshot's fault
            since = self.parked_since.setdefault(key, now())
            if self.once and now() - since > self.config.park_timeout_ms / 1000:
                summary["state"] = "failed"
                logger.error("{}/{} parked for {:.0f}s, giving up: {}", key[0], key[1], now() - since, upload.reason)
                return
            logger.warning("{}/{} parked ({}); offering again in {:.0f}s", key[0], key[1], upload.reason,
                           PARK_RETRY_S)
            self.retry_at[key] = now() + PARK_RETRY_S
            self.queue.appendleft(upload.pending)
            self.queued_keys.add(key)
            return
        attempts = self.attempts.get(key, 0)
        if self.once and attempts >= MAX_ATTEMPTS_ONCE:
            logger.error("{}/{} failed after {} attempts: {}", key[0], key[1], attempts, upload.reason)
            return
        delay = min(30.0, 0.5 * 2 ** attempts)
        logger.warning("{}/{} failed ({}); retrying in {:.1f}s", key[0], key[1], upload.reason, delay)
        self.retry_at[key] = now() + delay
        self.queue.appendleft(upload.pending)
        self.queued_keys.add(key)

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
        for key, result in self.results.items():
            if result.get("state") != "committed":
                result["state"], result["reason"] = "failed", reason
        self.queue.clear()

    def on_broker_lost(self) -> None:
        # Not the snapshots' fault: park them; they are offered again once a
        # broker welcomes us, and only what the cloud lacks travels again.
        for upload in list(self.active.values()):
            upload.park("broker connection lost")
            self._finished(upload)

    # --- loop -------------------------------------------------------------------

    def run(self, stop: StopFlag) -> int:
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self.work.fileno, zmq.POLLIN)
        poller.register(self.image.fileno, zmq.POLLIN)
        self.rescan(now())
        try:
            while not stop.stopping:
                if self.once and not self.active and not self.queue:
                    break
                events = dict(poller.poll(MAX_POLL_MS))
                t = now()
                if self.link.sock in events:
                    for msg in self.link.receive(t):
                        self.on_message(msg)
                if self.link.welcomed:
                    self.unanswered_since = None
                elif self.unanswered_since is None:
                    self.unanswered_since = t
                elif self.once and t - self.unanswered_since > self.config.connect_timeout_ms / 1000:
                    self.give_up(f"no broker answered at {self.link.endpoint} for "
                                 f"{self.config.connect_timeout_ms / 1000:.0f}s")
                    break
                for pool in (self.image, self.work):
                    if pool.fileno in events:
                        for key, result, error in pool.done():
                            self.on_task(key, result, error)
                if not self.link.tick(t):
                    logger.warning("broker {} silent; reconnecting", self.link.endpoint)
                    self.on_broker_lost()
                    poller.unregister(self.link.sock)
                    self.link.connect(t)
                    self.link.liveness.heard(t + self.link.backoff.next_delay())
                    poller.register(self.link.sock, zmq.POLLIN)
                self.watch_replies(t)
                if not self.once and t >= self.next_scan:
                    self.rescan(t)
                self.start_uploads(t)
                self.progress.show(t, [(f"{u.pending.dataset.name}/{u.pending.snapshot}", *u.progress(),
                                        t - u.started_at) for u in self.active.values()])
        finally:
            self.link.close()
            self.work.close()
            self.image.close()
            self.journal.close()
            self.ctx.term()
        failed = [r for r in self.results.values() if r.get("state") not in ("committed", "vanished")]
        return 1 if failed else 0

    def summary(self) -> dict:
        return {"transfers": list(self.results.values())}


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


def run_agent(config: AgentConfig, once: bool, as_json: bool) -> int:
    stop = StopFlag().install()
    agent = Agent(config, once=once)
    code = agent.run(stop)
    if as_json:
        json.dump(agent.summary(), sys.stdout)
        sys.stdout.write("\n")
    if once and code != 0:
        failed = [r for r in agent.results.values() if r.get("state") not in ("committed", "vanished")]
        reasons = "; ".join(f"{r['dataset']}/{r['snapshot']}: {r.get('reason', r.get('state'))}" for r in failed)
        print(f"speedsync agent: {len(failed)} snapshot(s) not committed: {reasons}", file=sys.stderr)
    if stop.stopping and once:
        return 1
    return code
