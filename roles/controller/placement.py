"""Where a dataset's snapshots go.

A dataset stays on the node that holds its earlier snapshots (the chunks it
shares with them are there). A new dataset goes to the node with the most
free space after what is already reserved for uploads in progress; free
space within PLACEMENT_BUCKET counts as equal (nodes that share a disk, or
heartbeats a moment apart), and then the node holding fewer datasets wins.
"""

from __future__ import annotations

from bus.errors import RequestError

PLACEMENT_BUCKET = 1024**3


def choose_node(placed_on: str | None, nodes_by_id: dict, datasets_on) -> str:
    """`placed_on`: node already holding the dataset, or None. Raises RequestError."""
    if placed_on is not None:
        if placed_on not in nodes_by_id:
            raise RequestError(f"node {placed_on} holding this dataset is not available", "node_unavailable")
        return placed_on
    if not nodes_by_id:
        raise RequestError("no storage node is connected", "no_storage")

    def score(node):
        return (-((node.free_bytes - node.reserved_bytes) // PLACEMENT_BUCKET), datasets_on(node.node_id),
                node.load, node.node_id)

    return min(nodes_by_id.values(), key=score).node_id
