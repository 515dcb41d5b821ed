"""Background verification on a storage node: the loop-side scheduler (sans IO).

Theory of operation (DESIGN.md "Lifecycle", Verification): the node walks
its committed manifests in key order, one snapshot at a time, re-reading
each (verifyrun.py) in slices on the store pool. One slice is in flight at
most; the next starts when the read limit allows (a slice of `b` bytes
begun at `t` lets the next begin at `t + b / verify_read_limit`), so the
node's loop and its uploads never wait for it and the disk sees at most the
limit. A pass that took `D` is followed by the next at `start + interval -
D`, so that each snapshot is checked again within about `verify_interval`
of the last time (a store too large to read at the limit within the
interval simply runs back to back, and says so: `verify_behind`).

A device's VERIFY (through the broker) goes ahead of the background order:
requests and the background take slices in turn, so neither starves the
other. One request per device at a time, and `REQUESTS_MAX` on the node.

Damage (an Outcome not ok) is kept by snapshot key and shown in status; a
READ of a damaged snapshot is refused (`damaged`); a fresh chunk file for a
damaged name (an upload of the same content: the quarantined file is absent,
so negotiation asks for it) heals it, and a snapshot whose damaged chunks
are all healed is whole again. A cursor and the damage are saved after each
snapshot (verify.state); after a restart the pass goes on from the cursor,
at once (its timing is not saved: a restart only verifies sooner), and the
damaged snapshots saved are checked again first.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from loguru import logger

from bus.effects import Submit
from bus.errors import RequestError
from roles.storenode.verifyrun import VerifyRun, save_state, step, next_key

SLICE_S = 0.25  # a slice reads about this long's worth of the read limit
SLICE_READ_MAX = 16 * 1024 * 1024
SLICE_HASH_MAX = 256 * 1024 * 1024  # zeros are hashed, not read: bound a slice's work all the same
REQUESTS_MAX = 256  # devices' verifies queued on one node
DAMAGED_SHOWN = 32  # damaged snapshots named in a report (the counts cover all)
CHUNKS_SHOWN = 8  # chunk names shown per damaged snapshot


def background_slice(run, after, damaged_keys, chunks, manifests, data_dir, read_budget, hash_budget):
    """On a store thread: the next snapshot of the background order if `run` is None, then a step.
    Returns (run or None at the end of the pass, bytes read, the damaged keys no longer stored: at
    the end of a pass, so that a pruned snapshot's damage does not stay named for ever)."""
    if run is None:
        key = next_key(manifests.root, after)
        if key is None:
            return None, 0, [key for key in damaged_keys if not manifests.exists(*key)]
        run = VerifyRun(key)
    return run, step(run, chunks, manifests, data_dir, read_budget, hash_budget), []


def request_slice(run, chunks, manifests, data_dir, read_budget, hash_budget):
    return run, step(run, chunks, manifests, data_dir, read_budget, hash_budget), []


class Verifier:
    def __init__(self, chunks, manifests, data_dir, *, read_limit: int, interval_s: float | None, now: float,
                 saved=(None, [])):
        """`interval_s` None: no background order (devices' requests only; the unit tests' default)."""
        self.chunks, self.manifests, self.data_dir = chunks, manifests, Path(data_dir)
        self.read_limit = max(1, read_limit)
        self.interval_s = interval_s
        cursor, damaged = saved
        self.cursor = cursor  # the last snapshot of the background order done (None: the pass starts)
        self.run: VerifyRun | None = None  # the background's snapshot under way (None: take the next)
        self.damaged: dict[tuple, tuple[set, str]] = {key: (set(names), reason) for key, names, reason in damaged}
        self.requests: deque = deque()  # VerifyRun of devices' requests, in arrival order
        self.requests_by_device: dict[str, str] = {}  # device -> its request id
        self.recheck: deque = deque(self.damaged)  # damaged at start: checked again before the order goes on
        self.in_flight = False
        self.next_slice_at = now
        self.pass_started_at = now
        self.next_pass_at = now
        self.last_pass_s = 0.0
        self.requests_turn = False
        self.verified_snapshots = 0
        self.bytes_read = 0
        self.passes = 0
        self.changed = True  # figures the broker has not been told

    # --- the loop's questions ------------------------------------------------------

    def next_due(self) -> float | None:
        if self.in_flight:
            return None  # its completion wakes the loop
        if self.requests or self.recheck or self.run is not None or self.cursor is not None:
            return self.next_slice_at
        if self.interval_s is None:
            return None
        return max(self.next_slice_at, self.next_pass_at)

    def on_time(self, now: float) -> list:
        due = self.next_due()
        if due is None or due > now:
            return []
        read_budget = min(SLICE_READ_MAX, max(1, int(self.read_limit * SLICE_S)))
        args = (self.chunks, self.manifests, self.data_dir, read_budget, SLICE_HASH_MAX)
        take_request = self.requests and (self.requests_turn or not self._background_due(now))
        if not take_request and self.recheck and self.run is None:
            key = self.recheck.popleft()
            self.run = VerifyRun(key)  # a damaged one saved at start: the order resumes after it
            self.run.request_id = "recheck"
        self.requests_turn = not take_request
        self.in_flight = True
        self.slice_started_at = now
        if take_request:
            return [Submit("store", ("verify", "request"), request_slice, (self.requests[0], *args))]
        if self.run is None and self.cursor is None:
            self.pass_started_at = now
        damaged_keys = tuple(self.damaged) if self.run is None else ()
        return [Submit("store", ("verify", "background"), background_slice,
                       (self.run, self.cursor, damaged_keys, *args))]

    def _background_due(self, now: float) -> bool:
        if self.run is not None or self.cursor is not None or self.recheck:
            return True
        return self.interval_s is not None and now >= self.next_pass_at

    # --- the pool's answers ----------------------------------------------------------

    def completed(self, key, result, error, now: float) -> tuple[list, list]:
        """A slice ended: (store effects, finished requests as (request id, match, reason))."""
        self.in_flight = False
        effects, answers = [], []
        if error is not None:
            logger.error("verification slice failed: {}", error)
            self.next_slice_at = now + 1.0  # a disk error: the slice is tried again, not skipped
            return effects, answers
        run, nbytes, gone = result
        self.bytes_read += nbytes
        self.changed = self.changed or nbytes > 0
        self.next_slice_at = max(now, self.slice_started_at + nbytes / self.read_limit)
        if key[1] == "request":
            if run.done:
                self.requests.popleft()
                self.requests_by_device.pop(run.key[0], None)
                answers.append((run.request_id, *self._answer(run)))
                self._record(run.outcome)
                effects.append(self._save())
            return effects, answers
        if run is None:  # the pass is over
            for gone_key in gone:
                self.damaged.pop(gone_key, None)
            self.passes += 1
            self.last_pass_s = now - self.pass_started_at
            self.next_pass_at = max(now, self.pass_started_at + self.interval_s - self.last_pass_s)
            self.cursor, self.run = None, None
            effects.append(self._save())
            return effects, answers
        if not run.done:
            self.run = run
            return effects, answers
        self.run = None
        if run.request_id != "recheck":
            self.cursor = run.key
        self._record(run.outcome)
        effects.append(self._save())
        return effects, answers

    @staticmethod
    def _answer(run: VerifyRun) -> tuple[bool, str]:
        outcome = run.outcome
        if outcome.gone:
            return False, "the snapshot is not stored on its node"
        if not outcome.ok:
            return False, outcome.reason
        if run.expected is not None and outcome.image_blake3 != run.expected:
            return False, "the cloud's copy has another image blake3 than the local image"
        return True, "verified: every chunk and the image blake3"

    def _record(self, outcome) -> None:
        if outcome.gone:
            if self.damaged.pop(outcome.key, None) is not None:
                self.changed = True
            return
        self.verified_snapshots += 1
        self.changed = True
        if outcome.ok:
            if self.damaged.pop(outcome.key, None) is not None:
                logger.info("{}/{}/{} verified whole again", *outcome.key)
            return
        known = self.damaged.get(outcome.key)
        names = set(outcome.damaged) | (known[0] if known else set())
        self.damaged[outcome.key] = (names, outcome.reason)
        logger.error("verification: {}/{}/{} is damaged: {}", *outcome.key, outcome.reason)

    def _save(self) -> Submit:
        damaged = [(key, tuple(sorted(names)), reason) for key, (names, reason) in self.damaged.items()]
        return Submit("store", ("verify-save",), save_state, (self.data_dir, self.cursor, damaged))

    # --- requests, reads, heals ----------------------------------------------------------

    def request(self, request_id: str, device: str, dataset: str, snapshot: str, expected: bytes) -> None:
        """Queue a device's verify ahead of the background order; RequestError(over_budget) past a budget."""
        if device in self.requests_by_device:
            raise RequestError(f"device {device} has a verify in progress on this node", "over_budget")
        if len(self.requests) >= REQUESTS_MAX:
            raise RequestError(f"{REQUESTS_MAX} verifies are queued on this node", "over_budget")
        self.requests_by_device[device] = request_id
        self.requests.append(VerifyRun((device, dataset, snapshot), expected, request_id))

    def forget_requests(self) -> None:
        """The broker restarted: its requests are gone with it (the one in flight finishes unanswered)."""
        keep = [self.requests[0]] if self.in_flight and self.requests else []
        for run in keep:
            run.request_id = "forgotten"
        self.requests = deque(keep)
        self.requests_by_device = {run.key[0]: run.request_id for run in keep}

    def refuse_read(self, device: str, dataset: str, snapshot: str) -> None:
        known = self.damaged.get((device, dataset, snapshot))
        if known is not None:
            names, reason = known
            raise RequestError(f"{dataset}/{snapshot} is damaged on this node ({reason}); a new upload of the same "
                               f"data heals it", "damaged")

    def chunk_written(self, name: bytes) -> list:
        """A fresh chunk file: it heals the damaged snapshots that lacked it. Returns a save if any did."""
        if not self.damaged:
            return []
        hexname = name.hex()
        healed = False
        for key, (names, reason) in list(self.damaged.items()):
            if hexname in names:
                names.discard(hexname)
                healed = True
                if not names:
                    del self.damaged[key]
                    logger.info("{}/{}/{} healed by a new upload of its chunks", *key)
        if not healed:
            return []
        self.changed = True
        return [self._save()]

    # --- figures ---------------------------------------------------------------------------

    @property
    def damaged_chunks(self) -> int:
        return len({name for names, _ in self.damaged.values() for name in names})

    def report(self) -> dict:
        """What status shows (the node sends it to the broker as VERIFY_REPORT)."""
        shown = sorted(self.damaged.items())[:DAMAGED_SHOWN]
        return {
            "verified_snapshots": self.verified_snapshots, "verify_bytes_read": self.bytes_read,
            "verify_passes": self.passes, "damaged_chunks": self.damaged_chunks,
            "damaged_snapshots": len(self.damaged),
            "verify_behind": self.interval_s is not None and self.passes > 0 and self.last_pass_s > self.interval_s,
            "damaged": [{"device_id": d, "dataset": s, "snapshot": n, "chunks": sorted(names)[:CHUNKS_SHOWN],
                         "chunk_count": len(names), "reason": reason[:200]}
                        for (d, s, n), (names, reason) in shown],
        }
