"""The agent's own status (`speedsync agent --config F --status`): each
dataset's queue and how far behind it is, the transfers in progress with rate
and ETA, and the bandwidth limit in force with what set it.

`now` is the monotonic time of the turn; `wall_now` (time.time() from the
driver) dates the newest commit, which the journal stores as wall time."""

from __future__ import annotations


def agent_status(agent, now: float, wall_now: float) -> dict:
    queued: dict[str, list] = {}
    for p in agent.queue:
        queued.setdefault(p.dataset.name, []).append(p)
    active = {u.pending.dataset.name: u for u in agent.active.values()}
    datasets = []
    for ds in agent.config.datasets:
        waiting = queued.get(ds.name, [])
        upload = active.get(ds.name)
        behind = waiting + ([upload.pending] if upload else [])
        newest = agent.journal.newest_committed(ds.name)
        datasets.append({
            "name": ds.name, "priority": ds.priority, "weight": ds.weight, "catch_up": ds.catch_up,
            "queue": [p.snapshot for p in waiting],
            "behind_snapshots": len(behind),
            "behind_bytes": sum(p.size for p in behind) - (upload.progress()[0] if upload else 0),
            "newest_committed": newest[0] if newest else None,
            "newest_committed_age_s": round(wall_now - newest[2], 1) if newest else None,
            "last_verified": agent.last_verified(ds.name),  # {snapshot, at, match, reason} or None
        })
    transfers = []
    for u in agent.active.values():
        done, total = u.progress()
        elapsed = max(1e-6, now - u.started_at)
        rate = u.bytes_sent / elapsed
        image_rate = done / elapsed
        transfers.append({
            "dataset": u.pending.dataset.name, "snapshot": u.pending.snapshot, "state": u.state,
            "transfer_id": u.transfer_id, "bytes_image": total, "bytes_done": done, "bytes_sent": u.bytes_sent,
            "rate_bytes_per_s": round(rate), "eta_s": round((total - done) / image_rate, 1) if image_rate else None,
        })
    return {
        "device_id": agent.config.device_id,
        "broker": agent.endpoint,
        "connected": agent.welcomed,
        "bandwidth": agent.bandwidth.describe(agent.rate),
        "wire": {"in_flight": agent.wire.in_flight, "window": agent.wire.window, "ack_rate_bytes_per_s": round(agent.wire.ack_rate), "sent_total": agent.wire.sent_total,
                 "compress_level": agent.effort.level},
        "datasets": datasets,
        "transfers": transfers,
    }
