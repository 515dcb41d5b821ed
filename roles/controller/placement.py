"""Where a dataset's snapshots go.

A dataset stays on the node that holds its earlier snapshots (the chunks it
shares with them are there). A new dataset goes, among the nodes with room
for its image, to the node with the most room; room within PLACEMENT_BUCKET
counts as equal (nodes that share a disk, or heartbeats a moment apart), and
then the node holding fewer datasets wins.

A node's room is its free space minus what uploads in progress reserve (their
image_size); its capacity is the filesystem's free plus used bytes, what the
store could ever hold. An image larger than the capacity of every node it may
go to is refused `image_too_large` (it would never fit: a hostile or mistaken
size); one that would fit but finds no room now is refused `no_space`, which
parks it until room appears (nospace.py).

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


def room(node) -> int:
    """Free space not yet reserved for uploads in progress."""
    return max(0, node.free_bytes - node.reserved_bytes)


def capacity(node) -> int:
    return node.free_bytes + node.used_bytes


def choose_node(placed_on: str | None, nodes_by_id: dict, datasets_on, image_size: int = 0,
                closed=frozenset()) -> str:
    """`placed_on`: node already holding the dataset, or None; `closed`: nodes that take no new
    dataset (draining). Raises RequestError: node_unavailable, no_storage, image_too_large (never
    fits) or no_space (not now)."""
    if placed_on is not None:
        node = nodes_by_id.get(placed_on)
        if node is None:
            raise RequestError(f"node {placed_on} holding this dataset is not available", "node_unavailable")
        candidates = [node]
    else:
        candidates = [n for n in nodes_by_id.values() if n.node_id not in closed]
        if not candidates:
            why = "every storage node connected is draining" if nodes_by_id else "no storage node is connected"
            raise RequestError(why, "no_storage")
    largest = max(capacity(n) for n in candidates)
    if image_size > largest:
        raise RequestError(f"image of {image_size} bytes exceeds the {largest} bytes of the largest node it may "
                           f"go to", "image_too_large")
    fits = [n for n in candidates if image_size <= room(n)]
    if not fits:
        most = max(room(n) for n in candidates)
        where = f"node {placed_on}" if placed_on is not None else "any node"
        raise RequestError(f"image of {image_size} bytes: {where} has {most} bytes free not reserved by uploads "
                           f"in progress; parked until room appears", "no_space")

    def score(node):
        return (-(room(node) // PLACEMENT_BUCKET), datasets_on(node.node_id), node.load, node.node_id)

    return min(fits, key=score).node_id


class Placement:
    def __init__(self, index: CatalogIndex):
        self.index = index
        self._pending: dict[tuple, list] = {}  # (device, dataset) -> [node_id, uploads in progress]
        self._pending_per_node: Counter = Counter()  # pending datasets not yet in the index
        self.closed: set = set()  # nodes that take no new dataset (draining or drained: drain.py)

    def node_for(self, device_id: str, dataset: str) -> str | None:
        placed = self.index.node_for(device_id, dataset)
        if placed is not None:
            return placed
        pending = self._pending.get((device_id, dataset))
        return pending[0] if pending else None

    def choose(self, device_id: str, dataset: str, nodes_by_id: dict, image_size: int = 0) -> str:
        return choose_node(self.node_for(device_id, dataset), nodes_by_id, self.datasets_on, image_size,
                           self.closed)

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
