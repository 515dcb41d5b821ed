"""The agent's status as a readable table."""

from __future__ import annotations

from roles.tables import table
from roles.units import format_bytes


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def render_agent_status(doc: dict) -> str:
    bw = doc["bandwidth"]
    extra = ""
    if "queue_delay_ms" in bw:
        peak = bw.get("peak_delivery_bytes_per_s")
        extra = (f", pacing at {bw['rate_bytes_per_s'] * 8 / 1e6:.1f} Mbit/s; queueing delay {bw['queue_delay_ms']} ms"
                 f" over a base of {bw['base_delay_ms']} ms; link delivered up to "
                 f"{'-' if peak is None else f'{peak * 8 / 1e6:.1f}'} Mbit/s")
    parts = [
        f"device {doc['device_id']} -> {doc['broker']} ({'connected' if doc['connected'] else 'not connected'})",
        f"bandwidth: {bw['limit']} (set by {bw['set_by']}){extra}",
        "",
        table(["dataset", "prio", "weight", "catch_up", "queue", "behind", "behind bytes", "newest committed", "age"],
              [[d["name"], d["priority"], d["weight"], d["catch_up"], " ".join(d["queue"]) or "-",
                d["behind_snapshots"], format_bytes(max(0, d["behind_bytes"])), d["newest_committed"] or "-",
                _age(d["newest_committed_age_s"])] for d in doc["datasets"]]),
        "",
        table(["transfer", "state", "done/image", "sent", "rate", "ETA"],
              [[f"{t['dataset']}/{t['snapshot']}", t["state"],
                f"{format_bytes(t['bytes_done'])}/{format_bytes(t['bytes_image'])}", format_bytes(t["bytes_sent"]),
                f"{t['rate_bytes_per_s'] * 8 / 1e6:.1f} Mbit/s", "-" if t["eta_s"] is None else f"{t['eta_s']:.0f}s"]
               for t in doc["transfers"]]),
    ]
    return "\n".join(parts)
