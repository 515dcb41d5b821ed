"""The broker's status document (DESIGN.md "Status", contract): built on
request from the controller's state; the driver adds its own counters."""

from __future__ import annotations

from schemas.messages import MAX_CHUNK_SIZE


def document(controller, figures: dict) -> dict:
    registry = controller.registry
    agents = [{"device_id": device_id, "connected": connected}
              for device_id, connected in registry.known_devices.items()]
    storage = [n.status() for n in registry.nodes_by_id.values()]
    storage += [n.status() for n in registry.lost_nodes.values()]
    transfers = [t.status() for t in controller.transfers.values()] + controller.history.status()
    return {
        "agents": agents,
        "storage": storage,
        "transfers": transfers,
        "broker": {"rss_bytes": figures.get("rss_bytes", 0), "dropped_messages": figures.get("dropped_messages", 0),
                   "errors_by_code": dict(controller.errors_by_code), "active_transfers": len(controller.transfers),
                   "max_chunk_size": MAX_CHUNK_SIZE},
    }
