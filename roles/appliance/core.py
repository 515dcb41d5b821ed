"""The appliance agent's logic as a sans-IO core (ROLES.md, "The core interface").

Theory of operation: the driver (roles/agent.py) owns the sockets, the pools
and the clock. It feeds this core what the broker says (`received`), what
the pools finished (`completed`), link events (`on_link`) and, once a loop
turn, `on_time(now)`; each returns the effects to carry out: `Send` to the
broker or to a status client, `Submit` to the "work" pool (read, hash,
compress) or the "image" pool (the whole-image blake3, fed in order).

Uploads are plain `Upload` objects that call an injected `send(message)`
and `submit(...)`; here those append to the outbox that the entry point
returns. `on_time` runs the same sequence the agent loop always ran, once a
turn and in this order: the reply watchdog, a rescan when due, starting what
the planner says is most urgent, the bandwidth limit and yield probe, the
WireScheduler's pump (whose chunks go into the outbox), compression effort.
Timers (rescan, limit check, watchdog, parked retries) are `Deadlines` so
that `next_deadline()` says when to wake; the pacing, yield and bandwidth
objects are called exactly as before, with the driver's `now`.
"""

from __future__ import annotations

import datetime as dt

import itertools
import math
import os
from collections import deque
from dataclasses import dataclass

from loguru import logger

from bus.deadlines import Deadlines
from bus.effects import Send, Submit
from bus.pacing import BlockingPacer
from roles.appliance import cbt
from roles.appliance.bandwidth import Bandwidth
from roles.appliance.chunker import ImageHasher
from roles.appliance.effort import CompressionEffort
from roles.appliance.journal import Journal
from roles.appliance.outcomes import Outcomes, record_settled
from roles.appliance.planner import may_preempt, plan
from roles.appliance.replies import DISPATCH, BrokerReplies, answer_status
from roles.appliance.resume import interrupted_uploads, unchanged_chunks
from roles.appliance.scanner import scan
from roles.appliance.upload import Upload
from roles.appliance.verifying import AgentVerify
from roles.appliance.wire import WireScheduler
from schemas import error_message, make

SOFTWARE = "speedsync-agent/0.1"
BROKER = ("broker", None)
MAX_PIECE = 16 * 1024 * 1024 + 65536
LIMIT_CHECK_S = 0.5
RESCAN, LIMIT = "rescan", "limit"


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    welcomed: bool
    active: int
    queued: int
    in_flight: int
    window: int
    sent_total: int
    malformed: int
    commits: int = 0  # snapshots the cloud committed, this run
    rate: int | None = None  # the bandwidth limit in force, bytes/s (None: unlimited)


class AgentCore(BrokerReplies, AgentVerify):
    def __init__(self, config, now: float, *, clock, wall_clock, once: bool = False):
        """`clock()` is the driver's monotonic clock (for Upload's own
        timestamps); `wall_clock()` the wall time (status dates commits)."""
        self.config = config
        self.once = once
        self._clock = clock
        self._wall_clock = wall_clock
        self.journal = Journal(config.state_dir)
        self.names = cbt.NamesStore(config.state_dir)
        self.read_pacer = BlockingPacer(config.read_limit)
        self.effort = CompressionEffort(config.compress_level, config.compress_adapt)
        self.bandwidth = Bandwidth(config.limit, config.schedule, config.yield_target_ms)
        self.wire = WireScheduler(config.wire_window, now)
        self.rate: int | None = None
        self.queue: deque = deque()  # PendingSnapshot, most urgent first
        self.active: dict[int, Upload] = {}  # by serial
        self.by_req: dict[int, Upload] = {}
        self.by_transfer: dict[str, Upload] = {}
        self._serial_of: dict[int, int] = {}  # id(upload) -> serial
        self.outcomes = Outcomes(once, config.park_timeout_ms / 1000)
        self.serials = itertools.count(1)
        self.pings = itertools.count(1)
        self.deadlines = Deadlines()
        self.next_limit_check = 0.0
        self.wire_wait_until = 0.0
        self.welcomed = False
        self.refusals = 0  # ERROR forbidden on our connection since the last WELCOME
        self.reconnect_after_s: float | None = None  # set when refused: the driver reconnects this much later
        self.endpoint = ""
        self.heartbeat_interval_s: float | None = None  # the broker's, from WELCOME
        self.idle_heartbeat_interval_s: float | None = None  # with no upload in progress
        self.malformed_count = 0
        self.commits = 0
        self.resuming = interrupted_uploads(self.journal)
        self.scanned_once = False
        self._outbox: list = []
        self._handlers = {t: getattr(self, name) for t, name in DISPATCH["broker"].items()}
        self.init_verifying()

    def _take(self) -> list:
        out, self._outbox = self._outbox, []
        return out

    def _send(self, message) -> None:
        self._outbox.append(Send(BROKER, message))

    # --- the link (a DEALER: bus.link.DealerLink) -------------------------------

    def register_message(self, now: float, endpoint: str | None = None):
        """HELLO on a new connection (or again, after not_registered)."""
        if endpoint is not None:
            self.endpoint = endpoint
        self.welcomed = False
        return make("HELLO", device_id=self.config.device_id, software=SOFTWARE)

    def heartbeat_message(self, now: float):
        return make("HEARTBEAT")

    def on_link(self, event: str, now: float) -> list:
        if event == "lost":
            logger.warning("broker {} silent; reconnecting", self.endpoint)
            self.welcomed = False
            self.on_broker_lost(now)
        return self._take()

    def on_broker_lost(self, now: float) -> None:
        # Not the snapshots' fault: park them; they are offered again once a
        # broker welcomes us, and only what the cloud lacks travels again.
        self.verifies_lost()
        for upload in list(self.active.values()):
            upload.park("broker connection lost")
            self._finished(upload, now)

    # --- scheduling ----------------------------------------------------------------

    def rescan(self, now: float) -> None:
        if not self.once:
            self.deadlines.schedule(RESCAN, now + self.config.scan_interval_ms / 1000)
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

    def start_uploads(self, now: float) -> None:
        if not self.welcomed:
            return
        # One snapshot per dataset at a time: an incremental waits for its
        # predecessor, whose chunks it will then not need to send.
        busy = {u.pending.dataset.name for u in self.active.values()}
        deferred = []
        while self.queue:
            pending = self.queue.popleft()
            if not self.outcomes.ready(pending.key, now) or pending.dataset.name in busy:
                deferred.append(pending)
                continue
            active_priorities = [u.pending.dataset.priority for u in self.active.values()]
            if len(self.active) >= self.config.max_active_transfers and not may_preempt(pending, active_priorities):
                deferred.append(pending)
                break
            busy.add(pending.dataset.name)
            self._start(pending, now)
        self.queue.extendleft(reversed(deferred))

    def _start(self, pending, now: float) -> None:
        serial = next(self.serials)
        hasher = ImageHasher()
        outbox = self._outbox_append

        def submit(key, fn, *args):
            outbox(Submit("work", (serial, *key), fn, args))

        def hash_image(pieces, final):
            outbox(Submit("image", (serial, "image"), _hash_step, (hasher, pieces, final)))

        known = unchanged_chunks(pending, self.journal, self.names)
        upload = Upload(pending, submit, self._send, hash_image, compress_level=self.effort.level,
                        clock=self._clock, known=known, read_pacer=self.read_pacer,
                        sample=cbt.sample_of(known, pending, self.config.cbt_sample_chunks,
                                             self.config.cbt_sample_fraction),
                        distrust=lambda: self.names.distrust(pending.dataset.name, pending.snapshot))
        self.active[serial] = upload
        self.by_req[serial] = upload
        self._serial_of[id(upload)] = serial
        self.wire.add(serial, upload, pending.dataset.weight)
        self.outcomes.started(pending.key)
        self.journal.record_started(pending.dataset.name, pending.snapshot, pending.path)
        self._watch(serial, upload)
        logger.info("offering {}/{} ({} bytes)", pending.dataset.name, pending.snapshot, pending.size)
        self._send(upload.offer(serial))

    def _outbox_append(self, effect) -> None:
        self._outbox.append(effect)

    # --- the reply watchdog: an upload the cloud has gone silent about (a lost
    # message, a broker that lost it) is parked and offered again ----------------

    def _watch(self, serial: int, upload: Upload, now: float | None = None) -> None:
        # parked once silent for strictly more than the limit: the first instant after it
        limit = self.config.reply_timeout_ms / 1000
        due = math.nextafter(upload.last_heard + limit, math.inf)
        self.deadlines.schedule(("reply", serial), due if now is None else max(due, math.nextafter(now, math.inf)))

    def watch_replies(self, serials: list, now: float) -> None:
        limit = self.config.reply_timeout_ms / 1000
        for serial in sorted(serials):  # in the order of `active`, as a walk over it would go
            upload = self.active.get(serial)
            if upload is None:
                continue
            if upload.silent_for(now) <= limit:
                self._watch(serial, upload, now)  # heard since: look again when it could next be silent
                continue
            if upload.transfer_id is not None:
                self._send(make("ABORT", transfer_id=upload.transfer_id))
            upload.park(f"no answer from the cloud for {limit:.0f}s")
            self._finished(upload, now)

    # --- bandwidth ----------------------------------------------------------------

    def apply_limit(self, now: float) -> None:
        if now < self.next_limit_check and self.bandwidth.yielding is None:
            return
        self.next_limit_check = now + LIMIT_CHECK_S
        self.deadlines.schedule(LIMIT, self.next_limit_check)
        rate = self.bandwidth.current(now, dt.datetime.fromtimestamp(self._wall_clock()))
        if rate != self.rate:
            if self.bandwidth.yielding is None:
                logger.info("bandwidth limit now {} (set by {})", self.bandwidth.describe(rate)["limit"],
                            self.bandwidth.set_by)
            self.rate = rate
            self.wire.set_rate(rate, now)
        yielding = self.bandwidth.yielding
        if yielding is not None and yielding.probe_due(now) and self.welcomed:
            yielding.probe_sent(now)
            self._send(make("PING", seq=next(self.pings), sent_us=int(now * 1e6)))

    def adapt_effort(self, now: float) -> None:
        if not self.active or not self.effort.due(now):
            return
        level = self.effort.update(now, *self.wire.take_counts())
        for upload in self.active.values():
            upload.compress_level = level

    def reload(self, fresh, now: float) -> list:
        """SIGHUP: the config file's limit, schedule and dataset settings, live."""
        self.config = fresh
        self.bandwidth.reconfigure(fresh.limit, fresh.schedule, fresh.yield_target_ms)
        self.next_limit_check = 0.0
        if not self.once:
            self.deadlines.schedule(RESCAN, 0.0)
        return self._take()

    # --- the Core protocol ----------------------------------------------------------

    def received(self, peer, msg, frames, now: float) -> list:
        if peer[0] == "status":
            return [answer_status(self, peer, msg, now, self._wall_clock())]
        self.on_message(msg, now)
        return self._take()

    def malformed(self, peer, exc, now: float) -> list:
        if peer[0] == "status":
            return [Send(peer, error_message(exc))]
        self.malformed_count += 1
        logger.warning("bad message from broker: {}", exc)
        return []

    def completed(self, key, result, error, now: float) -> list:
        self.on_task(key, result, error, now)
        return self._take()

    def on_time(self, now: float) -> list:
        due = self.deadlines.pop_due(now)
        self.watch_replies([key[1] for key in due if type(key) is tuple and key[0] == "reply"], now)
        if RESCAN in due:
            self.rescan(now)
        self.start_uploads(now)
        self.start_verifies(now)
        self.apply_limit(now)
        wait = self.wire.pump(now, MAX_PIECE)
        self.wire_wait_until = now + wait if wait else 0.0
        self.adapt_effort(now)
        return self._take()

    def next_deadline(self) -> float | None:
        due = self.deadlines.next_due()
        if self.wire_wait_until:  # the bucket has tokens due: wake for them
            due = self.wire_wait_until if due is None else min(due, self.wire_wait_until)
        return due

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(self.welcomed, len(self.active), len(self.queue), self.wire.in_flight,
                               self.wire.window, self.wire.sent_total, self.malformed_count, self.commits,
                               self.rate)

    def behind_snapshots(self) -> dict[str, int]:
        """Per configured dataset, the snapshots queued or uploading (status' `behind_snapshots`)."""
        behind = {ds.name: 0 for ds in self.config.datasets}
        for pending in itertools.chain(self.queue, (u.pending for u in self.active.values())):
            behind[pending.dataset.name] = behind.get(pending.dataset.name, 0) + 1
        return behind

    def last_commit_times(self) -> dict[str, float]:
        """Per dataset, the wall-clock time of its newest commit, from the journal."""
        return self.journal.last_commit_times()

    @property
    def link_interval_s(self) -> float | None:
        """The heartbeat interval the broker expects of us now (None before WELCOME):
        the short one while an upload is in progress, the idle one otherwise."""
        if self.heartbeat_interval_s is None:
            return None
        return self.heartbeat_interval_s if self.active else self.idle_heartbeat_interval_s

    @property
    def done(self) -> bool:
        """Nothing active and nothing queued (what `--once` waits for)."""
        return not self.active and not self.queue

    # --- events ---------------------------------------------------------------------

    def on_task(self, key, result, error, now: float) -> None:
        serial, kind = key[0], key[1]
        upload = self.active.get(serial)
        if upload is None or upload.finished:
            return
        if error is not None:
            self._fail(upload, f"{kind} failed: {error}", now)
            return
        if kind == "hash":
            upload.on_hashed(key[2], result)
        elif kind == "compress":
            upload.on_compressed(*result)
        elif kind == "sample":
            upload.on_sampled(result)
        elif kind == "image" and result is not None:
            upload.on_image_digest(result)
        if upload.finished:
            self._finished(upload, now)

    def _fail(self, upload: Upload, reason: str, now: float) -> None:
        upload.fail(reason)
        if upload.transfer_id is not None:
            self._send(make("ABORT", transfer_id=upload.transfer_id))
        self._finished(upload, now)

    def _finished(self, upload: Upload, now: float) -> None:
        serial = self._serial_of.pop(id(upload), None)
        if serial is None:
            return
        del self.active[serial]
        self.deadlines.cancel(("reply", serial))
        self.wire.remove(serial)
        self.wire.acknowledged(upload.unacked_wire)
        self.by_transfer.pop(upload.transfer_id, None)
        self.by_req.pop(serial, None)
        key = upload.pending.key
        after = self.outcomes.settle(key, upload.summary(), upload.state, upload.reason,
                                     os.path.exists(upload.pending.path), now)
        record_settled(after, upload, self.journal, self.names, self.resuming, self.outcomes, now)
        if after.action == "done":
            self.commits += 1
        if after.action == "retry":
            self.queue.appendleft(upload.pending)
            self.deadlines.schedule(("retry", key), after.at)  # only to wake when it may start

    def give_up(self, reason: str, now: float) -> list:
        for upload in list(self.active.values()):
            upload.fail(reason)
            self._finished(upload, now)
        self.outcomes.fail_all(reason)
        self.queue.clear()
        return self._take()

    def progress_rows(self, now: float) -> list:
        return [(f"{u.pending.dataset.name}/{u.pending.snapshot}", *u.progress(), now - u.started_at)
                for u in self.active.values()]

    def close(self) -> None:
        self.journal.close()


def _hash_step(hasher: ImageHasher, pieces: list, final: bool):
    hasher.update(pieces)
    return hasher.digest() if final else None
