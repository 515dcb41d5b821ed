"""What becomes of each snapshot across attempts: the agent's bookkeeping.

Plain logic. When an upload ends, `settle` folds its counters into the
snapshot's summary (DESIGN.md `--once --json`) and says what to do next:
done, retry at a time (a failure, with back-off, a bounded number of times
in --once), park (not the snapshot's fault: offered again soon, given up
only after `park_timeout_s` in --once), or drop (the file vanished).

A snapshot parked `no_space` (the cloud is full) is offered again after a
back-off that doubles from PARK_RETRY_S up to NO_SPACE_MAX_S: thousands of
devices waiting for room would otherwise offer every 2 s for as long as the
cloud is full. The broker says ROOM when room appears (`room`), so the
back-off only bounds how long a lost ROOM delays it.
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger

MAX_ATTEMPTS_ONCE = 4
PARK_RETRY_S = 2.0
NO_SPACE_MAX_S = 300.0
CARRIED = ("chunks_sent", "bytes_read", "bytes_sent")


@dataclass(frozen=True)
class Next:
    action: str  # "done" | "retry" | "give_up" | "drop"
    at: float = 0.0
    why: str = ""


class Outcomes:
    def __init__(self, once: bool, park_timeout_s: float):
        self.once = once
        self.park_timeout_s = park_timeout_s
        self.results: dict[tuple, dict] = {}
        self.attempts: dict[tuple, int] = {}
        self.carry: dict[tuple, dict] = {}
        self.retry_at: dict[tuple, float] = {}
        self.parked_since: dict[tuple, float] = {}
        self.no_space: dict[tuple, int] = {}  # snapshot -> times parked no_space in a row

    def queued(self, key: tuple, dataset: str, snapshot: str) -> None:
        self.results.setdefault(key, {"dataset": dataset, "snapshot": snapshot, "state": "queued"})

    def skipped(self, key: tuple, dataset: str, snapshot: str, why: str) -> None:
        self.results[key] = {"dataset": dataset, "snapshot": snapshot, "state": "skipped", "reason": why}

    def started(self, key: tuple) -> None:
        self.attempts[key] = self.attempts.get(key, 0) + 1

    def ready(self, key: tuple, now: float) -> bool:
        return self.retry_at.get(key, 0.0) <= now

    def settle(self, key: tuple, summary: dict, state: str, reason: str, file_exists: bool, now: float) -> Next:
        carried = self.carry.get(key, {})
        for field in CARRIED:
            summary[field] = summary.get(field, 0) + carried.get(field, 0)
        summary["seconds"] = round(summary.get("seconds", 0.0) + carried.get("seconds", 0.0), 3)
        self.results[key] = summary
        if state != "parked" or not reason.startswith("no_space"):
            self.no_space.pop(key, None)
            no_space = 0
        else:
            no_space = self.no_space[key] = self.no_space.get(key, 0) + 1
        if state == "committed":
            self.carry.pop(key, None)
            self.parked_since.pop(key, None)
            self.retry_at.pop(key, None)
            return Next("done")
        self.carry[key] = {field: summary[field] for field in (*CARRIED, "seconds")}
        if not file_exists:
            summary["state"] = "vanished"
            self.parked_since.pop(key, None)
            self.no_space.pop(key, None)
            return Next("drop", why="the snapshot file vanished")
        if state == "parked":
            self.attempts[key] = self.attempts.get(key, 1) - 1  # not the snapshot's fault
            since = self.parked_since.setdefault(key, now)
            if self.once and now - since > self.park_timeout_s:
                summary["state"] = "failed"
                return Next("give_up", why=f"parked for {now - since:.0f}s: {reason}")
            delay = min(NO_SPACE_MAX_S, PARK_RETRY_S * 2 ** (no_space - 1)) if no_space else PARK_RETRY_S
            self.retry_at[key] = now + delay
            return Next("retry", at=self.retry_at[key], why=reason)
        attempts = self.attempts.get(key, 0)
        if self.once and attempts >= MAX_ATTEMPTS_ONCE:
            return Next("give_up", why=f"failed after {attempts} attempts: {reason}")
        self.retry_at[key] = now + min(30.0, 0.5 * 2 ** attempts)
        return Next("retry", at=self.retry_at[key], why=reason)

    def room(self, key: tuple, now: float) -> bool:
        """The cloud has room for `key`: True if it was waiting out a no_space back-off (now over)."""
        if key not in self.no_space or self.retry_at.get(key, 0.0) <= now:
            return False
        self.retry_at[key] = now
        return True

    def fail_all(self, reason: str) -> None:
        for result in self.results.values():
            if result.get("state") not in ("committed", "vanished", "skipped"):
                result["state"], result["reason"] = "failed", reason

    def failures(self) -> list[dict]:
        return [r for r in self.results.values() if r.get("state") not in ("committed", "vanished", "skipped")]

    def summary(self) -> dict:
        return {"transfers": list(self.results.values())}


def record_settled(after: Next, upload, journal, names, resuming: set, outcomes: Outcomes, now: float) -> None:
    """Write down and log what `settle` decided for a finished upload (a retry's
    re-queueing is the caller's)."""
    key = upload.pending.key
    if after.action == "done":
        journal.record_committed(key[0], key[1], upload.image_blake3, upload.image_size)
        if len(upload.names) == upload.chunk_count:
            names.save(key[0], key[1], upload.chunk_size, upload.image_size, upload.names)
        resuming.discard(key)
        summary = outcomes.results[key]
        logger.info("committed {}/{}: {} chunks sent, {} bytes on the wire", key[0], key[1],
                    summary["chunks_sent"], summary["bytes_sent"])
    elif after.action == "drop":
        logger.warning("{}/{} vanished from {}; dropping it", key[0], key[1], upload.pending.path)
        journal.forget_started(key[0], key[1])
    elif after.action == "give_up":
        logger.error("{}/{}: giving up: {}", key[0], key[1], after.why)
    else:
        logger.warning("{}/{} {} ({}); offering again in {:.1f}s", key[0], key[1], upload.state, after.why,
                       after.at - now)
