"""Per-device budgets on the broker: what one device may hold at once.

Theory of operation: every device is possibly hostile, so each thing a
device can make the broker or a node hold is counted per device and refused
past its budget with a stable code, before anything is allocated:

- uploads in progress (`device_uploads_max`): `over_budget`;
- QUERY slices, a token bucket per device (`query_rate` slices per second,
  a burst of `query_burst`): `rate_limited`.

(Whether an image fits a node, `image_too_large` or `no_space`, is placement's: placement.py.)

Refusing one device changes nothing for another: the counters are keyed by
device, and a refusal allocates nothing. O(1) per message. A device's upload
count leaves when it returns to zero; its token bucket stays (a few dozen
bytes per device that has ever queried, so bounded by the enrolled keys), since
forgetting it would hand a device a fresh burst each time its uploads end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bus.errors import RequestError
from roles.counting import decrement


@dataclass
class TokenBucket:
    tokens: float
    stamp: float


class DeviceBudgets:
    def __init__(self, uploads_max: int, query_rate: float, query_burst: int):
        self.uploads_max = uploads_max
        self.query_rate = query_rate
        self.query_burst = query_burst
        self.uploads: Counter = Counter()  # device -> uploads in progress
        self._queries: dict[str, TokenBucket] = {}

    def admit_upload(self, device: str) -> None:
        """Raises over_budget before anything is allocated for the OFFER."""
        if self.uploads[device] >= self.uploads_max:
            raise RequestError(f"device {device} has {self.uploads[device]} uploads in progress "
                               f"(device_uploads_max {self.uploads_max})", "over_budget")

    def upload_started(self, device: str) -> None:
        self.uploads[device] += 1

    def upload_ended(self, device: str) -> None:
        decrement(self.uploads, device)

    def admit_query(self, device: str, now: float) -> None:
        """One QUERY slice from `device`; raises rate_limited past its rate."""
        bucket = self._queries.get(device)
        if bucket is None:
            bucket = self._queries[device] = TokenBucket(float(self.query_burst), now)
        bucket.tokens = min(float(self.query_burst), bucket.tokens + (now - bucket.stamp) * self.query_rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise RequestError(f"more than {self.query_rate:g} QUERY slices per second (query_rate)",
                               "rate_limited")
        bucket.tokens -= 1.0

