"""The image thread's work, served by device in bounded turns (issue 11, "QUERY amplification").

Theory of operation: every upload's whole-image hash runs on the node's one
image thread (imagehash.py), and how much work that is, a device decides:
each nil name in a QUERY stands for a whole zero chunk to hash, so 4,096 nil
names of 16 MiB chunks are 64 GiB of zeros (half a minute). Submitted to the
pool as they come, such feeds run in arrival order and every other device's
commit waits behind them. So the loop keeps that work here instead, one FIFO
per device (a transfer's feeds, then its finish, stay in order), and hands
the pool at most IN_FLIGHT turns at a time. A turn is one device's next task,
cut to at most TURN_BYTES of hashing; devices take turns round robin. A
device's commit then waits behind at most one turn of each other busy device,
however much they queued, and the thread never idles while anyone has work.

The cost is the device's own: its QUERYs are answered at once (MISSING does
not wait for the hash), the zeros it named are hashed in its turns, and its
commit comes when they are done.

Memory stays bounded whatever a device names: consecutive zero pieces of a
transfer merge into one run (O(1) for any number of nil names), and the chunk
bytes queued for hashing are capped per device (RAW_QUEUED_MAX); past it a
piece keeps only its name and the image thread reads it back from the store
(the chunk is durable by then), as UploadSession does past MAX_ARRIVED_BYTES.

Loop thread only; `submits()` returns the Submit effects to run now, and
`done()` is called once per completed image task.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from bus.effects import Submit
from roles.counting import decrement

TURN_BYTES = 32 * 1024 * 1024  # bytes hashed in one turn: about 20 ms at 1.8 GB/s
IN_FLIGHT = 2  # turns handed to the pool at once: one running, one ready, so the thread never waits on the loop
RAW_QUEUED_MAX = 64 * 1024 * 1024  # chunk bytes one device may have queued for hashing


@dataclass
class _Task:
    kind: str  # "hash" (feed pieces), "commit" (finish), "drop"
    transfer_id: str
    pieces: deque = field(default_factory=deque)  # (index, name, raw or None, length), for "hash"
    manifest: object = None  # for "commit"


@dataclass(frozen=True)
class TurnStatistics:
    devices_waiting: int
    tasks_queued: int
    raw_bytes_queued: int
    turns: int


class ImageTurns:
    def __init__(self, hashes, *, turn_bytes: int = TURN_BYTES, in_flight_max: int = IN_FLIGHT,
                 raw_max: int = RAW_QUEUED_MAX):
        self._hashes = hashes  # ImageHashes: its methods run on the image thread
        self._turn_bytes = turn_bytes
        self._in_flight_max = in_flight_max
        self._raw_max = raw_max
        self._queues: OrderedDict[str, deque] = OrderedDict()  # device -> its tasks; order is the round robin
        self._raw: Counter = Counter()  # device -> chunk bytes queued
        self.in_flight = 0
        self.turns = 0

    # --- what the core queues ----------------------------------------------------------

    def feed(self, device: str, transfer_id: str, pieces: list) -> None:
        queue = self._queues.setdefault(device, deque())
        if queue and queue[-1].kind == "hash" and queue[-1].transfer_id == transfer_id:
            task = queue[-1]
        else:
            task = _Task("hash", transfer_id)
            queue.append(task)
        run = task.pieces
        for index, name, raw, length in pieces:
            if name is None:
                if run and run[-1][1] is None:
                    first = run.pop()
                    run.append((first[0], None, None, first[3] + length))
                else:
                    run.append((index, None, None, length))
                continue
            if raw is not None:
                if self._raw[device] + len(raw) > self._raw_max:
                    raw = None  # read back from the store when its turn comes
                else:
                    self._raw[device] += len(raw)
            run.append((index, name, raw, length))

    def finish(self, device: str, transfer_id: str, manifest) -> None:
        self._queues.setdefault(device, deque()).append(_Task("commit", transfer_id, manifest=manifest))

    def drop(self, device: str, transfer_id: str) -> None:
        """Forget a transfer's queued work; the actor forgets its hasher after any turn already running."""
        queue = self._queues.setdefault(device, deque())
        kept = deque()
        for task in queue:
            if task.transfer_id == transfer_id:
                self._unqueue_raw(device, task.pieces)
            else:
                kept.append(task)
        kept.append(_Task("drop", transfer_id))
        self._queues[device] = kept

    # --- what the pool runs ---------------------------------------------------------------

    def submits(self) -> list:
        """The turns to hand the image pool now (at most IN_FLIGHT running)."""
        out = []
        while self.in_flight < self._in_flight_max and self._queues:
            device, queue = next(iter(self._queues.items()))
            out.append(self._turn(device, queue))
            self.in_flight += 1
            self.turns += 1
            if queue:
                self._queues.move_to_end(device)
            else:
                del self._queues[device]
        return out

    def done(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def _turn(self, device: str, queue: deque) -> Submit:
        task = queue[0]
        tid = task.transfer_id
        if task.kind == "commit":
            queue.popleft()
            return Submit("image", ("commit", tid), self._hashes.finish, (tid, task.manifest))
        if task.kind == "drop":
            queue.popleft()
            return Submit("image", ("drop", tid), self._hashes.drop, (tid,))
        budget, taken, pieces = self._turn_bytes, [], task.pieces
        while pieces and budget > 0:
            index, name, raw, length = pieces[0]
            if name is None and length > budget:  # a zero run is cut: zeros are zeros
                taken.append((index, None, None, budget))
                pieces[0] = (index, None, None, length - budget)
                break
            pieces.popleft()
            taken.append((index, name, raw, length))
            budget -= length
            if raw is not None:
                decrement(self._raw, device, len(raw))
        if not pieces:
            queue.popleft()
        return Submit("image", ("hash", tid), self._hashes.feed, (tid, taken))

    def _unqueue_raw(self, device: str, pieces) -> None:
        for _, _, raw, _ in pieces:
            if raw is not None:
                decrement(self._raw, device, len(raw))

    def statistics(self) -> TurnStatistics:
        """For status and tests (walks the queues)."""
        return TurnStatistics(len(self._queues), sum(map(len, self._queues.values())), sum(self._raw.values()),
                              self.turns)
