"""The broker's status document (DESIGN.md "Status" and "Fleet operations —
contract", Status at scale): built on request from the controller's memory,
never from the catalog; the driver adds its own counters.

`summary` is global and cheap: device counts are the registry's, transfer
counts by state are kept by the transfer table's moves, and only
`datasets_behind` walks the datasets (once per request). `device_id`
narrows `agents` and `transfers` to one device; the summary stays global.
No reply is unbounded: `agents` and `transfers` hold at most
`status_items_max` entries each (transfers in progress first, then parked,
then finished), and the summary says how many were left out.
"""

from __future__ import annotations

import heapq
from itertools import islice

from schemas.messages import MAX_CHUNK_SIZE

BEHIND_SHOWN = 20  # the oldest datasets behind, named in the summary (the count covers all)


def summary(controller, wall_now: float | None) -> dict:
    registry = controller.registry
    by_state = dict(controller.live_by_state)
    parked = len(controller.history.parked)
    if parked:
        by_state["parked"] = by_state.get("parked", 0) + parked
    rpo_s = controller.config.rpo_target
    behind = controller.index.behind(wall_now, rpo_s) if wall_now is not None else []
    # never committed first, then the oldest commit
    oldest = heapq.nsmallest(BEHIND_SHOWN, behind, key=lambda e: (e[2] is not None, e[2] or 0.0, e[0], e[1]))
    return {
        "devices_known": len(registry.known_devices),
        "devices_connected": len(registry.sessions_per_device),
        "transfers_by_state": by_state,
        "datasets": len(controller.index.newest_commit),
        "datasets_behind": len(behind),
        "datasets_behind_oldest": [{"device_id": d, "dataset": s, "newest_committed_at": at}
                                   for d, s, at in oldest],
        "rpo_target_s": rpo_s,
    }


def catalog(controller) -> dict:
    """Whether the catalog can record, why not, and the rows held meanwhile (cataloghealth.py)."""
    return {**controller.catalog_health.status(controller.now),
            "rows_waiting": len(controller.rows_waiting) + len(controller.batch_in_flight)}


def document(controller, figures: dict, device_id: str | None = None, wall_now: float | None = None) -> dict:
    registry = controller.registry
    cap = controller.config.status_items_max
    if device_id is None:
        agents = [{"device_id": d, "connected": connected}
                  for d, connected in islice(registry.known_devices.items(), cap)]
        live = controller.transfers.values()
        ended = controller.history.status()
    else:
        connected = registry.known_devices.get(device_id)
        agents = [] if connected is None else [{"device_id": device_id, "connected": connected}]
        live = [t for t in controller.transfers.values() if t.device_id == device_id]
        ended = [t for t in controller.history.status() if t["device_id"] == device_id]
    storage = [n.status() for n in registry.nodes_by_id.values()]
    storage += [n.status() for n in registry.lost_nodes.values()]
    shown_agents = agents[:cap]
    for entry in shown_agents:
        entry.update(controller.quotas.figures(entry["device_id"]))
    known = len(registry.known_devices) if device_id is None else len(agents)
    transfers = [t.status() for t in islice(live, cap)]
    restores = controller.restores
    for entry in transfers:
        if entry["kind"] == "restore":  # BLOCK bytes forwarded and not yet acknowledged by the agent
            entry["in_flight_bytes"] = restores.in_flight(entry["transfer_id"])
            entry["window"] = restores.window(entry["transfer_id"])
    for entry in storage:
        entry["restore_in_flight_bytes"] = restores.node_in_flight.get(entry["node_id"], 0)
        entry.update(controller.storage_report(entry["node_id"]))  # background verification (verifying.py)
        entry.update(controller.drain_status(entry["node_id"]))  # a drain of it, if any (drain.py)
    transfers += ended[:cap - len(transfers)]
    total_transfers = (len(controller.transfers) if device_id is None else len(live)) + len(ended)
    head = summary(controller, wall_now)
    head["agents_omitted"] = known - len(shown_agents)
    head["transfers_omitted"] = total_transfers - len(transfers)
    return {
        "summary": head,
        "agents": shown_agents,
        "storage": storage,
        "transfers": transfers,
        "broker": {"rss_bytes": figures.get("rss_bytes", 0), "dropped_messages": figures.get("dropped_messages", 0),
                   "errors_by_code": dict(controller.errors_by_code), "active_transfers": len(controller.transfers),
                   "restore_in_flight_bytes": sum(restores.node_in_flight.values()),
                   "max_chunk_size": MAX_CHUNK_SIZE, "catalog": catalog(controller),
                   "retention": controller.prune_status(),
                   "drains": [job.status() for job in controller.drains.values()]},
    }
