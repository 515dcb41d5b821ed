"""The catalog's side of a node drain (roles/controller/drain.py): what is
durable, so that a broker restarted mid-drain resumes it from the catalog alone.

- `drains` says which nodes are draining (or drained). Its row is the only
  drain state kept: what is left to move is read from `placements` and
  `snapshots` whenever it is needed.
- A dataset moves in two kinds of step. First its placement, so its next
  snapshots go to the new node. Then each committed snapshot, once its copy
  is committed on the new node: the row names the new node, and the old
  manifest enters `pruning`, in one transaction. Retention's PRUNE then
  removes it from the drained node, and its garbage collection frees the
  chunks.

A mixin of `SqlCatalog` (catalog.py), in SQL both engines run. Its methods run on the catalog pool's
one thread.
"""

from __future__ import annotations

import time

UPSERT_PRUNING = ("INSERT INTO pruning VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, dataset, snapshot, node_id) "
                  "DO UPDATE SET pruned_at=excluded.pruned_at")


class DrainRecords:
    def drains(self) -> list[tuple]:
        """(node, state, datasets_total) of every node draining or drained."""
        return [tuple(r) for r in self._execute("SELECT node_id, state, datasets_total FROM drains ORDER BY node_id")]

    def start_drain(self, node_id: str) -> tuple:
        """Record the drain (again, if it was drained: new datasets may have come before); returns
        (state, datasets_total)."""
        total = len(self.datasets_to_move(node_id))
        self._execute("INSERT INTO drains VALUES (?, 'draining', ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                      "state='draining', datasets_total=excluded.datasets_total WHERE drains.state='drained'",
                      (node_id, time.time(), total))
        return tuple(self._execute("SELECT state, datasets_total FROM drains WHERE node_id=?", (node_id,)).fetchone())

    def end_drain(self, node_id: str) -> bool:
        """Undrain: the node takes new datasets again. True if it was draining or drained."""
        return self._execute("DELETE FROM drains WHERE node_id=?", (node_id,)).rowcount > 0

    def drain_done(self, node_id: str) -> None:
        self._execute("UPDATE drains SET state='drained' WHERE node_id=?", (node_id,))

    def datasets_to_move(self, node_id: str) -> list[tuple]:
        """(device, dataset, placed on) of every dataset placed on the node or with a committed snapshot on
        it, in key order (a dataset whose placement moved already is placed on its new node)."""
        return [tuple(r) for r in self._execute(
            "SELECT p.device_id, p.dataset, p.node_id FROM placements p WHERE p.node_id=? "
            "UNION SELECT s.device_id, s.dataset, COALESCE(p.node_id, s.node_id) FROM snapshots s "
            "LEFT JOIN placements p ON p.device_id=s.device_id AND p.dataset=s.dataset WHERE s.node_id=? "
            "ORDER BY 1, 2", (node_id, node_id))]

    def move_placement(self, device_id: str, dataset: str, node_id: str) -> None:
        self._execute("INSERT INTO placements VALUES (?, ?, ?) ON CONFLICT (device_id, dataset) DO UPDATE SET "
                        "node_id=excluded.node_id", (device_id, dataset, node_id))

    def snapshots_on(self, device_id: str, dataset: str, node_id: str) -> list[tuple]:
        """(snapshot, size, chunk_count, blake3) of the dataset's committed snapshots on the node, oldest
        first: the copies still to make."""
        return [tuple(r) for r in self._execute(
            "SELECT snapshot, size, chunk_count, blake3 FROM snapshots WHERE device_id=? AND dataset=? AND "
            "node_id=? ORDER BY taken_at, snapshot", (device_id, dataset, node_id))]

    def switch_node(self, device_id: str, dataset: str, snapshot: str, source: str, target: str) -> str:
        """The snapshot's copy is committed on `target`: its row names `target`, and the manifest on
        `source` is to be removed, in one transaction. Returns the node whose manifest is now to go:
        `source`, or `target` if the row is gone or was not on `source` (pruned meanwhile: the copy is
        not wanted)."""
        now = time.time()
        with self._transaction():
            moved = self._execute("UPDATE snapshots SET node_id=? WHERE device_id=? AND dataset=? AND snapshot=? "
                                  "AND node_id=?", (target, device_id, dataset, snapshot, source)).rowcount
            if moved:
                doomed = source
            else:  # already switched (asked twice), or pruned meanwhile
                here = self._execute("SELECT 1 FROM snapshots WHERE device_id=? AND dataset=? AND snapshot=? AND "
                                     "node_id=?", (device_id, dataset, snapshot, target)).fetchone()
                doomed = source if here else target
            self._execute(UPSERT_PRUNING, (device_id, dataset, snapshot, doomed, now))
        return doomed
