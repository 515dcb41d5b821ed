"""Retention, applied by the broker (a mixin of the Controller; DESIGN.md "Lifecycle").

Theory of operation. At start and every `prune_interval_ms`, the catalog
pool applies the policy (roles/retention.py) to every dataset in one
transaction: the rows it does not keep leave `snapshots` and enter `pruning`.
Then each pruned snapshot's node is sent PRUNE, removes the manifest durably
and answers PRUNED, and only then does the entry leave `pruning`. A crash
between the two steps leaves the entry in `pruning`: it is sent again at the
next run, and to a node when it registers, so a re-run converges; a node
answers PRUNED for a manifest that is already gone. The catalog goes first,
so no restore or LIST ever sees a snapshot whose manifest may be half
removed; the node's garbage collection later frees the chunks no manifest
references.

Snapshots being uploaded or restored are protected (the set is taken when the
run is handed to the pool; the pool is the catalog's only thread, so a restore
that looks a snapshot up after the run finds it gone, cleanly). No message from
a device can prune: PRUNE is only ever sent by the broker, to nodes.
"""

from __future__ import annotations

from collections import defaultdict

from loguru import logger

from bus.effects import Submit
from roles.controller.catalog import unavailable_reason
from schemas import make


class PruneSide:
    """Controller methods for retention; state in `self.prune_state` (a PruneState)."""

    def prune_due(self) -> None:
        state = self.prune_state
        if not self.config.retention or state.running or self.now < state.next_at:
            return
        state.running = True
        state.next_at = self.now + self.config.prune_interval_ms / 1000
        protected = frozenset(t.key for t in self.transfers.values())
        self.out.append(Submit("catalog", ("prune",), self.store.prune, (self.config.retention, protected)))

    def prune_applied(self, result, error) -> None:
        state = self.prune_state
        state.running = False
        if error is not None:
            reason = unavailable_reason(error) or repr(error)
            state.last_error = reason
            logger.error("retention run failed (tried again in {:g}s): {}", self.config.prune_interval_ms / 1000,
                         reason)
            return
        if result is None:  # another broker of the controller holds this run (catalog maintenance lock)
            state.skipped += 1
            return
        state.last_error = None
        state.runs += 1
        state.last_run_at = self.wall_clock() if self.wall_clock is not None else None
        fresh = [key for key in result if key not in state.pending]
        state.pruned_total += len(fresh)
        if fresh:
            logger.info("retention pruned {} snapshot(s) from the catalog", len(fresh))
        state.pending = set(result)
        for node_id, keys in state.by_node().items():
            self.send_prunes(node_id, keys)

    def send_prunes(self, node_id: str, keys=None) -> None:
        """PRUNE to the node for each of its pruned snapshots not yet confirmed (none if it is away)."""
        node = self.registry.nodes_by_id.get(node_id)
        if node is None:
            return
        for device, dataset, snapshot in keys if keys is not None else self.prune_state.by_node().get(node_id, ()):
            self.send(node, make("PRUNE", device_id=device, dataset=dataset, snapshot=snapshot))

    def node_PRUNED(self, node, msg, frames) -> None:
        key = (msg["device_id"], msg["dataset"], msg["snapshot"], node.node_id)
        if key not in self.prune_state.pending:
            return  # not ours to confirm (answered twice, or another node's)
        self.prune_state.confirming.append(key)
        if not self.prune_state.confirm_in_flight:
            self.confirm_prunes()

    def confirm_prunes(self) -> None:
        state = self.prune_state
        keys, state.confirming = state.confirming, []
        if keys:
            state.confirm_in_flight = True
            self.out.append(Submit("catalog", ("pruned", tuple(keys)), self.store.pruned, (keys,)))

    def prunes_confirmed(self, keys: tuple, error) -> None:
        state = self.prune_state
        state.confirm_in_flight = False
        if error is None:
            state.pending.difference_update(keys)
        else:  # still in `pruning`: the next run sends PRUNE again and the node answers again
            logger.error("recording {} removed manifest(s) failed: {}", len(keys), error)
        self.confirm_prunes()

    def prune_status(self) -> dict:
        state = self.prune_state
        by_node = {node_id: len(keys) for node_id, keys in state.by_node().items()}
        return {"enabled": bool(self.config.retention), "interval_ms": self.config.prune_interval_ms,
                "runs": state.runs, "last_run_at": state.last_run_at, "pruned_total": state.pruned_total,
                "pending_manifests": dict(by_node), "last_error": state.last_error,
                "runs_skipped": state.skipped}


class PruneState:
    def __init__(self):
        self.next_at = 0.0  # the first run is due at start
        self.running = False
        self.runs = 0
        self.skipped = 0  # runs another broker of the controller held (a shared catalog's maintenance lock)
        self.last_run_at: float | None = None
        self.pruned_total = 0
        self.last_error: str | None = None
        self.pending: set = set()  # (device, dataset, snapshot, node): a manifest to remove from a node
        self.confirming: list = []  # PRUNED keys to record
        self.confirm_in_flight = False

    def by_node(self) -> dict[str, list]:
        """The pending manifests grouped by node: one pass over them, per run or registration."""
        grouped = defaultdict(list)
        for key in self.pending:
            grouped[key[3]].append(key[:3])
        return grouped

    def next_due(self, enabled: bool) -> float | None:
        return self.next_at if enabled and not self.running else None
