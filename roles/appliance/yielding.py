"""`limit: yield`: take only what the office link leaves, in the spirit of LEDBAT.

Theory of operation (RFC 6817 and LEDBAT++, adapted to a paced rate instead
of a window): the agent pings the broker every `probe_interval_s` on its own
connection; the median round trip of the last three pings over the base
delay (the least seen in the last minutes) is the queueing delay on the path.

- Under `target_s` the rate grows: fast (a third per probe interval, scaled by
  how far under) while it is well below the fastest delivery rate seen in the
  last minutes, carefully near that peak and slowly above it. A rate above
  what the path delivers only queues, and the queue is seen a probe or two
  late: the step taken near the known capacity bounds the overshoot.
- Over the target, whose queue is it? A paced sender well under what the path
  delivered to it alone builds none: a queue seen then is someone else's
  (`foreign`), answered with half the target and a cut of at least a quarter
  per probe interval. A loss-based flow (CUBIC, Reno) keeps a router's queue
  standing, often just about at any fixed target once its growth flattens,
  and a controller that weighed such a queue as its own would share the link
  with it instead of leaving it.
- Near the peak the queue is taken as our own: the rate drops just under what
  the path delivers (`DRAIN_FRACTION`), so the queue drains without the rate
  collapsing, and nothing more is cut while it drains. A queue that stays over
  the target regardless counts for more the longer it stays.
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
DECREASE_AT_TWICE_TARGET = 0.5
INSISTENT_QUEUE_S = 1.5  # a queue over target for this long counts as twice the target
FAST_GROWTH = 0.35
CAREFUL_GROWTH = 0.02
PROBING_GROWTH = 0.005
CAREFUL_FROM = 0.8  # of the peak delivery rate
FLOOR_ESCAPE = 64 * 1024  # bytes per second per second added under target, so growth leaves the floor
DRAIN_FRACTION = 0.9  # of the delivery rate, when our own queue is over target
PEAK_HISTORY_S = 300.0  # an office link's capacity changes seldom; a competitor may stay for minutes
PEAK_AGE_S = 2.0  # a peak is only a ceiling once it is this old: a rate that is rising is not one
CEILING = 1.5  # of the peak delivery rate: growth stops there
FOREIGN_BELOW = 0.8  # of the peak delivery rate: a queue seen while we send less is someone else's
FOREIGN_TARGET = 0.5  # ... answered against this much of the target
FOREIGN_OVER = 0.5  # ... and as one at least 1.5 times over it

class WindowedMax:
    """The largest value seen in the last `history_s` seconds, kept in `bucket_s` buckets (O(buckets))."""

    def __init__(self, history_s: float, bucket_s: float, smallest: bool = False):
        self.history_s, self.bucket_s = history_s, bucket_s
        self._pick = min if smallest else max
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
        self._base = WindowedMax(base_history_s, 10.0, smallest=True)
        self._peak = WindowedMax(PEAK_HISTORY_S, 5.0)
        self._recent: deque = deque(maxlen=3)
        self.next_probe = now
        self.next_slowdown = now + slowdown_every_s
        self.slowdown_until = 0.0
        self.queue_delay_s = 0.0
        self.last_update = now
        self.over_since = None

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
        """A ping's round trip; `delivery_rate`: what the cloud acknowledges per second lately."""
        self._base.add(rtt_s, now)
        if delivery_rate > 0:
            self._peak.add(delivery_rate, now)
        self._recent.append(rtt_s)
        self.queue_delay_s = max(0.0, sorted(self._recent)[len(self._recent) // 2] - self.base_delay_s)
        steps = max(0.0, min(1.0, now - self.last_update)) / STEP_S
        self.last_update = now
        if now < self.slowdown_until:
            return
        peak = self._peak.value_before(now - PEAK_AGE_S)
        # Paced well under what the path delivered to us alone, we cannot have built a queue: one that
        # is there is someone else's, and half the target is reason enough to make way.
        foreign = peak is not None and self.rate < FOREIGN_BELOW * peak
        target = self.target_s * (FOREIGN_TARGET if foreign else 1.0)
        over = self.queue_delay_s / target - 1.0
        if over > 0:
            cut = self._decrease(over, rtt_s - self.base_delay_s, foreign, target, now)
            self.rate *= (1.0 - cut) ** steps
            if cut and not foreign and delivery_rate > 0:
                # our own queue: we send more than the path delivers; just under that, it drains
                self.rate = min(self.rate, DRAIN_FRACTION * delivery_rate)
        else:
            if self.queue_delay_s < target / 2:
                self.over_since = None
            if peak is None or self.rate < CAREFUL_FROM * peak:
                gain = FAST_GROWTH
            elif self.rate < peak:
                gain = CAREFUL_GROWTH
            else:
                gain = PROBING_GROWTH
            grown = self.rate * (1.0 - gain * over) ** steps + FLOOR_ESCAPE * STEP_S * steps
            if peak is not None:
                # With little to send no queue shows, whatever the rate: growth stops at CEILING times
                # the peak, so the rate is no burst waiting for the next large upload.
                grown = min(grown, CEILING * peak)
            self.rate = grown
        self.rate = max(MIN_RATE, min(MAX_RATE, self.rate))

    def _decrease(self, over: float, latest_queue_s: float, foreign: bool, target: float, now: float) -> float:
        """The fraction to cut per step while the queue is `over` the target by that fraction of it."""
        if not foreign and latest_queue_s <= target:
            return 0.0  # our own queue, already draining: the cuts made while it grew suffice
        if self.over_since is None:
            self.over_since = now
        # A queue we built ourselves drains once we slow down a little; one that stays is someone
        # else's, and the longer it stays the harder we back off.
        over += (now - self.over_since) / INSISTENT_QUEUE_S
        if foreign:
            over = max(over, FOREIGN_OVER)
        return DECREASE_AT_TWICE_TARGET * min(1.0, over)

    def current_rate(self, now: float) -> int:
        if now >= self.next_slowdown:
            self.slowdown_until = now + self.slowdown_s
            self.next_slowdown = now + self.slowdown_every_s
            self._recent.clear()
        if now < self.slowdown_until:
            return MIN_RATE
        return int(self.rate)
