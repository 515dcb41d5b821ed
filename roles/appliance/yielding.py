"""`limit: yield`: take only what the office link leaves, in the spirit of LEDBAT.

Theory of operation (RFC 6817 and LEDBAT++, adapted to a paced rate instead
of a window): the agent pings the broker every `probe_interval_s` on its own
connection; the median round trip of the last three pings over the base
delay (the least seen in the last minutes) is the queueing delay on the path.
Beside it the controller keeps the peak delivery rate (what the cloud
acknowledged per second, at its highest in the last minutes, counted only
while we were not making way for someone): the link's capacity as we know it.

- Under `target_s` the rate grows, in proportion to how far under: fast far
  below the peak, in ever smaller steps near and above it, because the queue
  an overshoot builds is seen a probe or two late. Above the peak with still
  no queue, the step doubles every second (the peak was not the link's). It
  never grows past twice what is being delivered: with little to send no
  queue shows at any rate, and the rate must not be a burst waiting for the
  next large upload.
- Over the target, whose queue is it? While we send, or are delivered, well
  under the peak, we cannot have built it: it is someone else's (`foreign`),
  answered against half the target and with a cut of at least a quarter per
  probe interval. A loss-based flow (CUBIC, Reno) keeps a router's queue
  standing, often just about at any fixed target once its growth flattens;
  a controller that weighed that queue as its own would share the link with
  the flow instead of leaving it.
- Near the peak the queue is taken as our own: the rate drops just under what
  is delivered (`DRAIN_FRACTION`), and it is given the time to drain, as long
  as it is seen draining. A queue that stays over the target regardless
  counts for more the longer it stays.
- Every `slowdown_every_s` the rate drops to the floor for a moment so that
  queues drain and the base delay is measured again (LEDBAT++'s periodic
  slowdown): otherwise a queue we built ourselves would become our idea of an
  empty path.
"""

from __future__ import annotations

from collections import deque

MIN_RATE = 32 * 1024
MAX_RATE = 10 * 1024**3
STEP_S = 0.1  # the gains below are per this much time
MAX_STEPS = 3  # a late answer counts for at most this many steps
DECREASE_AT_TWICE_TARGET = 0.5
INSISTENT_QUEUE_S = 1.5  # a queue over target for this long counts as twice the target
# Growth per step under the target, by where the rate stands against the peak delivery rate: the nearer
# the link's capacity, the smaller the step, because the queue an overshoot builds is seen late.
GROWTH = ((0.5, 0.35), (0.8, 0.08), (1.0, 0.02), (float("inf"), 0.005))
PROBE_DOUBLING_S = 1.0  # above the peak with no queue, the growth step doubles this often
FLOOR_ESCAPE = 64 * 1024  # bytes per second per second added under target, so growth leaves the floor
DRAIN_FRACTION = 0.9  # of the delivery rate, when our own queue is over target
CEILING = 2.0  # of the delivery rate: with little to send, the rate holds rather than grows into a burst
PEAK_HISTORY_S = 300.0  # an office link's capacity changes seldom; a competitor may stay for minutes
PEAK_AGE_S = 2.0  # a peak is only a ceiling once it is this old: a rate that is rising is not one
FOREIGN_BELOW = 0.8  # of the peak: a queue seen while we send, or are delivered, less is someone else's
FOREIGN_TARGET = 0.5  # ... answered against this much of the target
FOREIGN_OVER = 0.5  # ... and as one at least 1.5 times over it


class WindowedExtreme:
    """The largest (or smallest) value seen in the last `history_s` seconds, in `bucket_s` buckets."""

    def __init__(self, history_s: float, bucket_s: float, pick=max):
        self.history_s, self.bucket_s = history_s, bucket_s
        self._pick = pick
        self._buckets: deque = deque()  # (bucket start, extreme in bucket)

    def add(self, value: float, now: float) -> None:
        bucket = now - now % self.bucket_s
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1] = (bucket, self._pick(self._buckets[-1][1], value))
        else:
            self._buckets.append((bucket, value))
        while self._buckets and self._buckets[0][0] < now - self.history_s:
            self._buckets.popleft()

    @property
    def value(self) -> float | None:
        return self._pick((v for _, v in self._buckets), default=None)

    def value_before(self, moment: float) -> float | None:
        """The extreme over buckets that ended by `moment`."""
        return self._pick((v for b, v in self._buckets if b + self.bucket_s <= moment), default=None)


class YieldController:
    def __init__(self, now: float, target_s: float = 0.025, start_rate: int = 256 * 1024,
                 probe_interval_s: float = 0.1, base_history_s: float = 120.0, slowdown_every_s: float = 20.0,
                 slowdown_s: float = 0.3):
        self.target_s = target_s
        self.rate = float(start_rate)
        self.probe_interval_s = probe_interval_s
        self.slowdown_every_s = slowdown_every_s
        self.slowdown_s = slowdown_s
        self._base = WindowedExtreme(base_history_s, 10.0, pick=min)
        self._peak = WindowedExtreme(PEAK_HISTORY_S, 5.0)
        self.next_slowdown = now + slowdown_every_s
        self.slowdown_until = 0.0
        self.queue_delay_s = 0.0
        self.resume(now)

    def resume(self, now: float) -> None:
        """Start (again) measuring: what was learned of the path stays, the moment's state goes."""
        self._recent: deque = deque(maxlen=3)
        self.next_probe = now
        self.last_update = now
        self.over_since: float | None = None
        self.above_peak_since: float | None = None
        self.draining_until = self.drain_seen_from = 0.0
        self.previous_queue_s = 0.0

    @property
    def base_delay_s(self) -> float | None:
        return self._base.value

    @property
    def peak_delivery_rate(self) -> float | None:
        return self._peak.value

    def probe_due(self, now: float) -> bool:
        return now >= self.next_probe

    def probe_sent(self, now: float) -> None:
        self.next_probe = now + self.probe_interval_s

    def on_rtt(self, rtt_s: float, now: float, delivery_rate: float = 0.0) -> None:
        """A ping's round trip; `delivery_rate`: what the cloud acknowledges per second lately (0: unknown)."""
        self._base.add(rtt_s, now)
        self._recent.append(rtt_s)
        self.queue_delay_s = max(0.0, sorted(self._recent)[(len(self._recent) - 1) // 2] - self.base_delay_s)
        steps = min(MAX_STEPS, max(0.0, now - self.last_update) / STEP_S)
        self.last_update = now
        if now < self.slowdown_until:
            return
        peak = self._peak.value_before(now - PEAK_AGE_S)
        # Paced well under what the path delivered to us alone, we cannot have built a queue: one that
        # is there is someone else's, and half the target is reason enough to make way. So is a queue
        # while the path delivers us well under that peak: someone else takes the rest.
        ours = min(self.rate, delivery_rate) if delivery_rate > 0 else self.rate
        foreign = peak is not None and ours < FOREIGN_BELOW * peak and now >= self.draining_until
        if delivery_rate > 0 and not foreign:
            self._peak.add(delivery_rate, now)  # what we get while making way says nothing of the link
        target = self.target_s * (FOREIGN_TARGET if foreign else 1.0)
        over = self.queue_delay_s / target - 1.0
        latest_queue_s = rtt_s - self.base_delay_s
        if over > 0:
            self._back_off(over, latest_queue_s, foreign, target, delivery_rate, steps, now)
        else:
            self.over_since = None
            self._grow(over, peak, delivery_rate, steps, now)
        self.rate = max(MIN_RATE, min(MAX_RATE, self.rate))
        self.previous_queue_s = latest_queue_s

    def _back_off(self, over: float, latest_queue_s: float, foreign: bool, target: float, delivery_rate: float,
                  steps: float, now: float) -> None:
        self.above_peak_since = None
        if not foreign and latest_queue_s <= target:
            return  # our own queue, and the newest ping says it is already draining
        if now < self.draining_until:
            # Our own queue, given the time it takes to drain, as long as it is seen draining once the
            # pings sent after our cut come back: one that still grows then is not only ours.
            if now < self.drain_seen_from or latest_queue_s < self.previous_queue_s:
                return
            self.draining_until = 0.0
        first_sight = self.over_since is None
        if first_sight:
            self.over_since = now
        if first_sight and not foreign and delivery_rate > 0:
            # Our own queue: we send more than the path delivers. Just under that, the queue drains (in
            # 1 / (1 - DRAIN_FRACTION) times its delay) and is seen draining a few probes later; a cut by
            # how far over the queue is would take the rate far under what the link can carry.
            self.rate = min(self.rate, DRAIN_FRACTION * delivery_rate)
            self.drain_seen_from = now + self.base_delay_s + latest_queue_s + self.probe_interval_s
            self.draining_until = (now + latest_queue_s / (1.0 - DRAIN_FRACTION) + self.base_delay_s
                                   + len(self._recent) * self.probe_interval_s)
            return
        # A queue that stays over the target after that is not only ours (or we know nothing of what is
        # delivered): the longer it stays the harder we back off.
        over += (now - self.over_since) / INSISTENT_QUEUE_S
        if foreign:
            over = max(over, FOREIGN_OVER)
        self.rate *= (1.0 - DECREASE_AT_TWICE_TARGET * min(1.0, over)) ** steps

    def _grow(self, over: float, peak: float | None, delivery_rate: float, steps: float, now: float) -> None:
        standing = 0.0 if peak is None else self.rate / peak
        gain = next(g for below, g in GROWTH if standing < below)
        if standing < 1.0:
            self.above_peak_since = None
        elif self.above_peak_since is None:
            self.above_peak_since = now
        else:
            # Above the peak and still no queue: the peak was not the link's (it was learned while the rate
            # was still rising, or the link got faster). Probing speeds up the longer that lasts, as CUBIC's
            # window leaves its last maximum.
            gain = min(GROWTH[0][1], gain * 2.0 ** ((now - self.above_peak_since) / PROBE_DOUBLING_S))
        grown = self.rate * (1.0 - gain * over) ** steps + FLOOR_ESCAPE * STEP_S * steps
        if delivery_rate > 0:
            # With little to send no queue shows, whatever the rate: it holds rather than grow into a burst.
            grown = min(grown, max(self.rate, CEILING * delivery_rate))
        self.rate = grown

    def current_rate(self, now: float) -> int:
        if now >= self.next_slowdown:
            self.slowdown_until = now + self.slowdown_s
            self.next_slowdown = now + self.slowdown_every_s
            self._recent.clear()
            self.over_since = None
        if now < self.slowdown_until:
            return MIN_RATE
        return int(self.rate)
