"""Who sends next on the agent's one connection: weighted, paced, bounded.

Theory of operation: every upload with a chunk ready and credit for it is a
flow with a weight (its dataset's `weight`). Deficit round robin over the
flows decides the order of pieces on the wire, so concurrent transfers share
the link in proportion to their weights. Two limits hold for all flows
together: the token bucket (the bandwidth limit in force, pacing each piece)
and `window`, the payload bytes sent but not yet acknowledged, which keeps
our own queue short so that order, not buffering, decides the shares.

The bandwidth limit is met on what the office's router sees: the bucket is
charged `wire_cost(piece)`, the piece with its message's headers and the
Ethernet/IP/TCP headers of the segments that carry it, not the payload alone.
"""

from __future__ import annotations

from collections import OrderedDict

from roles.appliance.ratelimit import TokenBucket

QUANTUM = 256 * 1024  # bytes per unit of weight per round
MIN_WINDOW = 2 * 1024 * 1024
# The window holds this long of what the cloud acknowledges: enough to keep
# the link busy, short enough that our own queue stays small and the order
# of pieces (the weights), not buffering, decides the shares.
WINDOW_S = 0.25
IDLE_S = 0.5  # nothing in flight and no acknowledgement for this long: a pause in sending

# What a CHUNK piece costs on the link beyond its payload. The message: its header frame (about 130
# bytes of msgpack), two ZMTP frame headers (11) and, under CURVE, a box per frame (33 each), rounded
# up. Each TCP segment of at most SEGMENT_PAYLOAD bytes (MTU 1500 less IPv4, TCP and its timestamps)
# then carries Ethernet (14), IPv4 (20) and TCP with timestamps (32) headers. A shorter MTU (PPPoE,
# VPN) costs a little more than this estimate; the limit is then met within about 1% more.
MESSAGE_OVERHEAD = 208
SEGMENT_PAYLOAD = 1448
SEGMENT_OVERHEAD = 66


def wire_cost(payload: int) -> int:
    """Bytes on the link (Ethernet frames) for a CHUNK message of `payload` bytes."""
    message = payload + MESSAGE_OVERHEAD
    return message + -(-message // SEGMENT_PAYLOAD) * SEGMENT_OVERHEAD


class WireScheduler:
    def __init__(self, window: int, now: float, rate: int | None = None):
        self.max_window = window
        self.window = min(window, MIN_WINDOW)
        self.in_flight = 0
        self._acked = 0
        self._acked_since = now
        self.ack_rate = 0.0  # bytes per second the cloud acknowledges (smoothed)
        self._last_ack = now
        self.bucket = TokenBucket(rate, now)
        self._flows: OrderedDict = OrderedDict()  # key -> [flow, weight, deficit]
        self.sent_total = 0
        self.link_bound = 0  # pumps that stopped on the bandwidth limit
        self.starved = 0  # pumps that found no flow with a chunk ready

    def take_counts(self) -> tuple[int, int]:
        counts = (self.link_bound, self.starved)
        self.link_bound = self.starved = 0
        return counts

    def add(self, key, flow, weight: int) -> None:
        # [flow, weight, deficit, in_turn]
        self._flows[key] = [flow, max(1, weight), 0, False]

    def remove(self, key) -> None:
        self._flows.pop(key, None)

    def acknowledged(self, nbytes: int, now: float | None = None) -> None:
        self.in_flight = max(0, self.in_flight - nbytes)
        if now is None:
            return
        self._last_ack = now
        self._acked += nbytes
        elapsed = now - self._acked_since
        if elapsed >= 0.1:
            self.ack_rate = 0.7 * self.ack_rate + 0.3 * (self._acked / elapsed)
            self._acked, self._acked_since = 0, now
            self.window = int(min(self.max_window, max(MIN_WINDOW, self.ack_rate * WINDOW_S)))

    def set_rate(self, rate: int | None, now: float) -> None:
        self.bucket.set_rate(rate, now)

    def pump(self, now: float, max_piece: int) -> float | None:
        """Send what may go now. Returns seconds until the bucket allows more
        (None when nothing waits on the bucket).

        A flow offers `next_piece(limit) -> size or None` and `send_piece(limit, now)
        -> bytes sent`.
        """
        piece_limit = self.bucket.piece_size(max_piece)
        idle_in_a_row = 0
        while self._flows and idle_in_a_row < len(self._flows):
            key = next(iter(self._flows))
            entry = self._flows[key]
            flow, weight = entry[0], entry[1]
            size = flow.next_piece(piece_limit)
            if size is None:
                entry[2], entry[3] = 0, False  # an idle flow banks no credit
                self._flows.move_to_end(key)
                idle_in_a_row += 1
                continue
            idle_in_a_row = 0
            if not entry[3]:
                entry[2] += QUANTUM * weight
                entry[3] = True
            while size is not None and entry[2] >= size:
                if self.in_flight + size > self.window and self.in_flight > 0:
                    return None  # resumes this flow's turn when acknowledgements free the window
                wait = self.bucket.wait_s(wire_cost(size), now)
                if wait > 0:
                    self.link_bound += 1
                    return wait
                if self.in_flight == 0 and now - self._last_ack > IDLE_S:
                    # sending again after a pause: a rate measured over the pause would be the pause's
                    self._acked, self._acked_since = 0, now
                sent = flow.send_piece(piece_limit, now)
                self.bucket.spend(wire_cost(sent), now)
                self.in_flight += sent
                self.sent_total += sent
                entry[2] -= sent
                size = flow.next_piece(piece_limit)
            entry[3] = False
            if size is None:
                entry[2] = 0
            self._flows.move_to_end(key)
        if self._flows:
            self.starved += 1
        return None
