"""Node drain, run by the broker (a mixin of the Controller; DESIGN.md "Lifecycle", Drain).

Theory of operation. `speedsync drain` (an admin key) records the node in the
catalog's `drains` table; from then on placement gives it no new dataset.
Its datasets move one at a time, each in three steps:

1. The dataset's placement moves to the node placement chooses among the
   others (durable first), so its next snapshots go there.
2. Each of its committed snapshots still on the drained node, oldest first,
   is copied: the drained node sends it to the new node as an upload's
   sender would (copyout.py; QUERY, so only chunks the new node lacks for
   the device travel, CHUNK under the new node's credit, shared with uploads
   as any upload's, COMMIT), through this broker. The new node verifies
   every chunk against its name and the whole image against the catalog's
   blake3 before it commits.
3. Once committed there, the catalog row names the new node and the old
   manifest enters `pruning` (one transaction, drainrecords.py); PRUNE
   removes it from the drained node, whose garbage collection then frees the
   chunks. A snapshot being restored from the drained node keeps its
   manifest there until the restore ends.

A dataset is moved when no snapshot of it is left on the drained node and no
upload of it is open there; the node is `drained` when no dataset is left.
Uploads go on meanwhile: those opened on the drained node before the move
finish there, and their snapshots are copied after them. What is left to do is
always read again from the catalog, so a broker restarted mid-drain resumes
where the catalog says, and a copy cut short is made again (the new node
dedups what it already has; a manifest it committed is the same content again).
A copy that fails (a node away, a refusal) is tried again after DRAIN_RETRY_S;
status shows why.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field

from loguru import logger

from bus.effects import Submit
from bus.errors import RequestError
from roles.controller.catalog import unavailable_reason
from roles.controller.placement import choose_node
from roles.controller.transfers import CATALOG, NODE, SOURCE, Transfer, advance, count_in
from roles.geometry import ImageGeometry
from schemas import make

DRAIN_TICK_S = 0.5
DRAIN_RETRY_S = 5.0


@dataclass
class DrainJob:
    node_id: str
    state: str  # "draining" | "drained"
    datasets_total: int
    datasets_moved: int = 0
    snapshots_copied: int = 0
    bytes_copied: int = 0  # CHUNK payload bytes the copies sent
    work: deque | None = None  # (device, dataset, placed on) still to move, as last read from the catalog
    current: tuple | None = None  # (device, dataset) moving now
    target: str | None = None  # its new node
    rows: deque | None = None  # its snapshots still on the drained node: (snapshot, size, chunk_count, blake3)
    copy_id: str | None = None
    busy: bool = False  # a catalog call of this drain is in flight
    retry_at: float = 0.0
    waiting: str | None = None  # why it is not moving now
    deferred_prunes: list = field(default_factory=list)  # (device, dataset, snapshot): being restored here

    def status(self) -> dict:
        current = None
        if self.current is not None:
            current = {"device_id": self.current[0], "dataset": self.current[1], "target": self.target,
                       "snapshots_left": len(self.rows) if self.rows is not None else None}
        left = len(self.work) if self.work is not None else None
        return {"node_id": self.node_id, "state": self.state, "datasets_total": self.datasets_total,
                "datasets_moved": self.datasets_moved, "datasets_left": left,
                "snapshots_copied": self.snapshots_copied, "bytes_copied": self.bytes_copied,
                "current": current, "waiting": self.waiting}


class DrainSide:
    """Controller methods for drains; state in `self.drains` (node id -> DrainJob)."""

    def init_drains(self, drains=()) -> None:
        """`drains`: (node, state, datasets_total) as the catalog holds them (`store.drains()`)."""
        self.drains: dict[str, DrainJob] = {}
        for node_id, state, total in drains:
            self.drains[node_id] = DrainJob(node_id, state, total)
            self.placement.closed.add(node_id)
        self.drain_next_at = 0.0

    # --- the operator's commands (status socket) ------------------------------------------

    def status_DRAIN(self, peer, msg, frames) -> None:
        if not self.config.insecure and self.identify(frames) not in self.admins:
            raise RequestError("drain and undrain need an admin key (admin_keys)", "forbidden")
        node_id = msg["node_id"]
        if msg.get("undrain"):
            self.out.append(Submit("catalog", ("drain-end", peer, node_id), self.store.end_drain, (node_id,)))
            return
        known = node_id in self.registry.nodes_by_id or node_id in self.registry.lost_nodes
        if not known and self.index.datasets_on(node_id) == 0:
            raise RequestError(f"no storage node {node_id} is known", "not_found")
        self.out.append(Submit("catalog", ("drain-start", peer, node_id), self.store.start_drain, (node_id,)))

    def drain_started(self, peer, node_id: str, result, error) -> None:
        if error is not None:
            self.reply_error(peer, self.drain_catalog_error(error), ref="DRAIN")
            return
        state, total = result
        job = self.drains.get(node_id)
        if job is None or job.state != state:
            job = self.drains[node_id] = DrainJob(node_id, state, total)
            logger.info("draining storage node {}: {} dataset(s) to move", node_id, total)
        self.placement.closed.add(node_id)
        self.send(peer, make("DRAIN_REPLY", drain=job.status()))

    def drain_ended(self, peer, node_id: str, result, error) -> None:
        if error is not None:
            self.reply_error(peer, self.drain_catalog_error(error), ref="DRAIN")
            return
        job = self.drains.pop(node_id, None)
        self.placement.closed.discard(node_id)
        if job is not None and job.copy_id is not None:
            t = self.transfers.get(job.copy_id)
            if t is not None:
                self.copy_end(t, "aborted", "undrained")
        if job is not None:
            logger.info("storage node {} undrained: it takes new datasets again", node_id)
        self.send(peer, make("DRAIN_REPLY", drain={"node_id": node_id, "state": "undrained",
                                                   "was": job.state if job else None}))

    def drain_catalog_error(self, error) -> RequestError:
        reason = unavailable_reason(error)
        if reason is not None:
            return RequestError(f"the catalog cannot record it now: {reason}", "catalog_unavailable")
        return RequestError(repr(error), "internal")

    def drain_status(self, node_id: str) -> dict:
        job = self.drains.get(node_id)
        return {} if job is None else {"drain": job.status()}

    # --- the steps ------------------------------------------------------------------------

    def drains_due(self) -> None:
        if not self.drains or self.now < self.drain_next_at:
            return
        self.drain_next_at = self.now + DRAIN_TICK_S
        for job in list(self.drains.values()):
            self.send_deferred_prunes(job)
            self.drain_step(job)

    def drain_deadline(self) -> float | None:
        return self.drain_next_at if any(j.state == "draining" or j.deferred_prunes
                                         for j in self.drains.values()) else None

    def drain_step(self, job: DrainJob) -> None:
        if job.state != "draining" or job.busy or job.copy_id is not None or self.now < job.retry_at:
            return
        node_id = job.node_id
        if job.work is None:
            self.drain_ask(job, ("drain-list", node_id), self.store.datasets_to_move, (node_id,))
            return
        if job.current is None:
            if not job.work:
                self.drain_ask(job, ("drain-done", node_id), self.store.drain_done, (node_id,))
                return
            device, dataset, placed = job.work[0]
            job.current, job.rows = (device, dataset), None
            job.target = placed if placed != node_id else None
        device, dataset = job.current
        if job.target is None:
            nodes = self.registry.nodes_by_id
            try:
                target = choose_node(None, nodes, self.placement.datasets_on, 0, self.placement.closed)
            except RequestError as exc:
                self.drain_wait(job, f"{exc.code}: {exc.reason}")
                return
            self.drain_ask(job, ("drain-place", node_id, target), self.store.move_placement,
                           (device, dataset, target))
            return
        if job.rows is None:
            self.drain_ask(job, ("drain-rows", node_id), self.store.snapshots_on, (device, dataset, node_id))
            return
        if not job.rows:
            job.rows = None  # read again: an upload that was open on the drained node may have committed
            return
        source, target = self.registry.nodes_by_id.get(node_id), self.registry.nodes_by_id.get(job.target)
        if source is None or target is None:
            self.drain_wait(job, f"node {node_id if source is None else job.target} is not connected")
            return
        self.start_copy(job, source, *job.rows[0])

    def drains_node_ready(self) -> None:
        """A node (re)registered: a drain waiting for one, or retrying a copy it broke, goes on now."""
        for job in self.drains.values():
            if job.waiting is not None:
                job.retry_at = self.now

    def drain_ask(self, job: DrainJob, key: tuple, fn, args: tuple) -> None:
        job.busy = True
        self.out.append(Submit("catalog", key, fn, args))

    def drain_wait(self, job: DrainJob, why: str) -> None:
        if job.waiting != why:
            logger.warning("drain of {} waits: {}", job.node_id, why)
        job.waiting, job.retry_at = why, self.now + DRAIN_RETRY_S

    def drain_answered(self, key: tuple, result, error) -> None:
        """A catalog call of a drain came back."""
        job = self.drains.get(key[1])
        if job is None:
            return  # undrained meanwhile
        job.busy = False
        if error is not None:
            self.drain_wait(job, f"catalog: {unavailable_reason(error) or repr(error)}")
            return
        kind = key[0]
        if kind == "drain-list":
            job.work = deque(result)
            if job.current is not None and (not job.work or job.work[0][:2] != job.current):
                job.current = None
        elif kind == "drain-done":
            job.state, job.waiting = "drained", None
            logger.info("storage node {} drained: {} dataset(s) moved", job.node_id, job.datasets_moved)
        elif kind == "drain-place":
            job.target = key[2]
            self.index.move(*job.current, job.target)
            logger.info("drain of {}: {}/{} moves to {}", job.node_id, *job.current, job.target)
        elif kind == "drain-rows":
            job.rows = deque(result)
            if not job.rows:
                self.dataset_maybe_moved(job)
        self.drain_step(job)

    def dataset_maybe_moved(self, job: DrainJob) -> None:
        """No snapshot of the dataset is left on the drained node: it has moved, unless an upload of it
        still open there may commit one (its row, recorded on the catalog's one thread after this answer,
        is read at the next look)."""
        device, dataset = job.current
        open_there = any(t.kind == "upload" and t.node_id == job.node_id and t.device_id == device
                         and t.dataset == dataset for t in self.transfers.values())
        if open_there:
            job.rows = None
            self.drain_wait(job, f"an upload of {device}/{dataset} is still open on {job.node_id}")
            job.retry_at = self.now + DRAIN_TICK_S
            return
        job.work.popleft()
        job.current = job.rows = job.target = None
        job.datasets_moved += 1
        job.waiting = None

    # --- one copy -------------------------------------------------------------------------

    def start_copy(self, job: DrainJob, source, snapshot: str, size: int, chunk_count: int, blake3: bytes) -> None:
        device, dataset = job.current
        t = Transfer(f"c-{uuid.uuid4().hex[:16]}", "copy", device, dataset, snapshot, job.target, None, 0,
                     image_size=size, chunk_count=chunk_count, started_at=self.now, last_progress=self.now,
                     source_node=job.node_id, image_blake3=blake3)
        t.ledger.device = device
        self.transfers[t.transfer_id] = t
        count_in(t, self.live_by_state)
        source.transfers.add(t.transfer_id)
        job.copy_id, job.waiting = t.transfer_id, None
        self.stalls.schedule(t.transfer_id, self.now + self.stall_s)
        self.send(source, make("COPY", transfer_id=t.transfer_id, device_id=device, dataset=dataset,
                               snapshot=snapshot, image_blake3=blake3))

    def copy_from(self, node, msg) -> Transfer:
        """The source node's copy, moved by the table."""
        t = self.transfers.get(msg["transfer_id"])
        if t is None or t.kind != "copy" or t.source_node != node.node_id:
            raise RequestError(f"no copy {msg['transfer_id']} from this node", "unknown_transfer")
        try:
            advance(t, SOURCE, msg.t, node.node_id)
        except RequestError as exc:
            self.copy_end(t, "error", exc.reason)
            raise
        return t

    def copy_image(self, node, msg) -> None:
        t = self.copy_from(node, msg)
        geometry_ok = ImageGeometry(msg["image_size"], msg["chunk_size"]).chunk_count == msg["chunk_count"]
        if not geometry_ok or (msg["image_size"], msg["chunk_count"], msg["image_blake3"]) != (
                t.image_size, t.chunk_count, t.image_blake3):
            exc = RequestError("the node's manifest disagrees with the catalog's row", "catalog_mismatch")
            self.copy_end(t, "failed", exc.reason)
            raise exc
        target = self.registry.nodes_by_id.get(t.node_id)
        if target is None:
            self.copy_end(t, "failed", f"node {t.node_id} is not connected")
            return
        t.chunk_size = msg["chunk_size"]
        t.window = t.ledger.window = max(self.config.transfer_window, 2 * t.chunk_size + 65536)
        target.transfers.add(t.transfer_id)
        target.reserved_bytes += t.image_size
        self.send(target, make("OPEN", transfer_id=t.transfer_id, device_id=t.device_id, dataset=t.dataset,
                               snapshot=t.snapshot, image_size=t.image_size, chunk_size=t.chunk_size,
                               chunk_count=t.chunk_count))

    def node_QUERY(self, node, msg, frames) -> None:
        t = self.copy_from(node, msg)
        self.forward(self.node_of(t), frames, msg.t)

    def node_CHUNK(self, node, msg, frames) -> None:
        t = self.copy_from(node, msg)
        wire_len = self.pass_chunk(t, msg, frames)
        job = self.drains.get(t.source_node)
        if job is not None:
            job.bytes_copied += wire_len

    def node_COMMIT(self, node, msg, frames) -> None:
        self.pass_commit(self.copy_from(node, msg), frames)

    def copy_committed(self, t: Transfer, msg) -> None:
        """The target committed the copy, verified: the catalog switches the row."""
        if msg["image_blake3"] != t.image_blake3:
            self.copy_end(t, "failed", "the committed copy's image blake3 is not the catalog's")
            return
        self.out.append(Submit("catalog", ("drain-switch", t.transfer_id), self.store.switch_node,
                               (t.device_id, t.dataset, t.snapshot, t.source_node, t.node_id)))

    def copy_switched(self, tid: str, doomed, error) -> None:
        t = self.transfers.get(tid)
        if t is None:
            return
        if error is not None:
            self.copy_end(t, "failed", f"catalog: {unavailable_reason(error) or repr(error)}")
            return
        advance(t, CATALOG, "recorded")
        key = (t.device_id, t.dataset, t.snapshot)
        self.prune_state.pending.add((*key, doomed))
        job = self.drains.get(t.source_node)
        restored_there = any(r.kind == "restore" and r.key == key and r.node_id == doomed
                             for r in self.transfers.values())
        if job is not None and restored_there:
            job.deferred_prunes.append((key, doomed))
        else:
            self.send_prunes(doomed, [key])
        if job is not None:
            job.snapshots_copied += 1
            if job.rows and job.rows[0][0] == t.snapshot:
                job.rows.popleft()
        self.copy_end(t, "committed", "copied")

    def send_deferred_prunes(self, job: DrainJob) -> None:
        if not job.deferred_prunes:
            return
        live = {(r.key, r.node_id) for r in self.transfers.values() if r.kind == "restore"}
        still = []
        for key, node_id in job.deferred_prunes:
            if (key, node_id) in live:
                still.append((key, node_id))
            else:
                self.send_prunes(node_id, [key])
        job.deferred_prunes = still

    def copy_end(self, t: Transfer, state: str, reason: str) -> None:
        """End a copy: both nodes forget it; its job goes on (a failure: after DRAIN_RETRY_S)."""
        if t.finished:
            return
        source = self.registry.nodes_by_id.get(t.source_node)
        target = self.registry.nodes_by_id.get(t.node_id)
        opened = target is not None and t.transfer_id in target.transfers
        if source is not None:
            self.send(source, make("ABORT", transfer_id=t.transfer_id))
            source.transfers.discard(t.transfer_id)
        if opened:
            if state == "failed":  # finish tells the node of the other ends
                self.send(target, make("ABORT", transfer_id=t.transfer_id))
            target.reserved_bytes = max(0, target.reserved_bytes - t.image_size)
        self.finish(t, state, reason)
        job = self.drains.get(t.source_node)
        if job is not None and job.copy_id == t.transfer_id:
            job.copy_id = None
            if state != "committed":
                self.drain_wait(job, f"copy of {t.dataset}/{t.snapshot} {state}: {reason}")
            else:
                self.drain_step(job)

    def copies_of_node_lost(self, node_id: str, reason: str) -> None:
        for t in [t for t in self.transfers.values() if t.kind == "copy" and t.source_node == node_id]:
            self.copy_end(t, "failed", f"node {node_id}: {reason}")
