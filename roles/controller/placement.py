"""Where a dataset's snapshots go.

A dataset stays on the node that holds its earlier snapshots (the chunks it
shares with them are there). A new dataset goes to the node with the most
free space after what is already reserved for uploads in progress; free
space within PLACEMENT_BUCKET counts as equal (nodes that share a disk, or
heartbeats a moment apart), and then the node holding fewer datasets wins.

`Placement` adds to the catalog's index the datasets whose first upload is
in progress, so two offers of one new dataset land on one node; every
count is kept as it changes, so `datasets_on` is O(1).
"""

from __future__ import annotations

from collections import Counter

from bus.errors import RequestError
from roles.counting import decrement
from roles.controller.catalog import CatalogIndex

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


class Placement:
    def __init__(self, index: CatalogIndex):
        self.index = index
        self._pending: dict[tuple, list] = {}  # (device, dataset) -> [node_id, uploads in progress]
        self._pending_per_node: Counter = Counter()  # pending datasets not yet in the index

    def node_for(self, device_id: str, dataset: str) -> str | None:
        placed = self.index.node_for(device_id, dataset)
        if placed is not None:
            return placed
        pending = self._pending.get((device_id, dataset))
        return pending[0] if pending else None

    def choose(self, device_id: str, dataset: str, nodes_by_id: dict) -> str:
        return choose_node(self.node_for(device_id, dataset), nodes_by_id, self.datasets_on)

    def hold(self, device_id: str, dataset: str, node_id: str) -> None:
        """An upload of the dataset is in progress on `node_id`."""
        key = (device_id, dataset)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [node_id, 1]
            if self.index.node_for(device_id, dataset) is None:
                self._pending_per_node[node_id] += 1
        else:
            entry[1] += 1

    def release(self, device_id: str, dataset: str) -> None:
        key = (device_id, dataset)
        entry = self._pending.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._pending[key]
            if self.index.node_for(device_id, dataset) is None:
                decrement(self._pending_per_node, entry[0])

    def placed(self, device_id: str, dataset: str, node_id: str) -> None:
        """The catalog recorded the dataset on `node_id`."""
        if self.index.place(device_id, dataset, node_id):
            entry = self._pending.get((device_id, dataset))
            if entry is not None:
                decrement(self._pending_per_node, entry[0])

    def datasets_on(self, node_id: str) -> int:
        return self.index.datasets_on(node_id) + self._pending_per_node[node_id]
