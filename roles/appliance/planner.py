"""What to replicate next, in the owner's order (DESIGN.md, client-side management).

Order: dataset priority (1 first), then the kind of action in the configured
order (by default: resume an interrupted upload, then an incremental, then an
initial full upload, then verification work), then age (older snapshot ids
first). A dataset behind by several snapshots follows its `catch_up` policy:
`all` replicates every one, oldest first; `latest` only the newest (chunks
are content addressed, so skipping costs nothing later).
"""

from __future__ import annotations

from dataclasses import dataclass

from roles.appliance.scanner import PendingSnapshot


@dataclass(frozen=True)
class Plan:
    ordered: list  # PendingSnapshot, most urgent first
    skipped: list  # PendingSnapshot left out by catch_up: latest


def action_of(p: PendingSnapshot, resuming: set, has_committed: set) -> str:
    if p.key in resuming:
        return "resume"
    if p.dataset.name in has_committed:
        return "incremental"
    return "full"


def plan(pending: list, resuming: set, has_committed: set, action_order: tuple) -> Plan:
    by_dataset: dict[str, list] = {}
    for p in pending:
        by_dataset.setdefault(p.dataset.name, []).append(p)
    kept, skipped = [], []
    for items in by_dataset.values():
        items.sort(key=lambda p: p.snapshot)
        if items[0].dataset.catch_up == "latest" and len(items) > 1:
            skipped.extend(p for p in items[:-1] if p.key not in resuming)
            kept.extend([items[-1]] + [p for p in items[:-1] if p.key in resuming])
        else:
            kept.extend(items)
    rank = {action: i for i, action in enumerate(action_order)}

    def key(p: PendingSnapshot):
        return (p.dataset.priority, rank[action_of(p, resuming, has_committed)], p.snapshot, p.dataset.name)

    return Plan(sorted(kept, key=key), skipped)


def may_preempt(candidate: PendingSnapshot, active_priorities: list) -> bool:
    """A more urgent snapshot starts at once even when every slot is busy:
    it shares the link by weight instead of queueing behind a long upload."""
    return bool(active_priorities) and candidate.dataset.priority < min(active_priorities)
