"""Prometheus metrics of the three roles (DESIGN.md "Fleet operations —
contract", Metrics): Prometheus text at http://<metrics_listen>/metrics.

Theory of operation. prometheus_client's HTTP server answers scrapes on a
thread of its own, from a CollectorRegistry private to the process (so two
roles in one test process never mix). That thread never sees a core: the
role's loop thread *publishes* into the registry's metric objects (each
guarded by prometheus_client's own lock) when `Publisher.tick(now)`, called
from the driver's turn, finds a second gone by. A scrape sees values at most
a second old and never makes the loop wait; a process without
`metrics_listen` builds none of this.

- Counters are copies of counts the core keeps where the event happens
  (the `statistics()` of each core): the publisher adds the difference since
  its last publish, so `speedsync_snapshots_committed_total` is exactly the
  catalog rows written and `speedsync_received_bytes_total` exactly the
  CHUNK payload bytes the broker accepted.
- Gauges are set from counts and figures (devices, nodes, transfers by
  state, node space, per-dataset times).
- Per-dataset last-commit times change on commits only; the broker's are
  published as they change (`LastCommits.changed_since`), never by a walk
  over every dataset.

Cardinality (series per process; what a Prometheus must hold):
- broker: `speedsync_dataset_last_commit_timestamp_seconds` one per
  (device, dataset) in the catalog, no more (10,000 devices with 3 datasets
  each: 30,000 series); `speedsync_node_*` one per storage node seen since
  start; `speedsync_errors_total` one per error code (bus/errors.py CODES);
  transfers one per state; the rest constant.
- agent: one series per configured dataset for the two per-dataset gauges.
- storage: constant.
Every process also exports prometheus_client's `process_*` (CPU seconds,
resident memory, open fds), read from /proc at scrape time.

No zmq here: the publishers take a core and read what it declares.
"""

from __future__ import annotations

import math

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

from roles.config import parse_listen

PUBLISH_INTERVAL_S = 1.0
# Live states of a broker transfer (roles/controller/transfers.py), plus offers parked: always exported, 0 or not.
TRANSFER_STATES = ("checking", "opening", "active", "committing", "recording", "restoring", "parked")

prometheus_client.disable_created_metrics()  # no `_created` series beside every counter


class MetricsServer:
    """The /metrics HTTP server on its own thread; `close()` stops it."""

    def __init__(self, listen: str, registry: CollectorRegistry):
        host, port, _ = parse_listen(listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics_listen {listen}: {exc.strerror or exc}") from None
        self.listen = listen

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Off:
    """What a role without `metrics_listen` ticks and closes: nothing."""

    def tick(self, now: float) -> list:
        return []

    def close(self) -> None:
        pass


def start(publisher_cls, listen: str, *args):
    """The role's publisher, serving on `listen` (OSError if it cannot bind), or `Off()` when listen is empty."""
    return publisher_cls(listen, *args).start() if listen else Off()


class Publisher:
    """One role's metrics: `tick(now)` from the loop thread publishes once
    every PUBLISH_INTERVAL_S (and at the first tick); `close()` stops the server."""

    def __init__(self, listen: str):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._copied: dict = {}  # (metric, labels) -> the count last published
        self._next_publish = -math.inf
        self._listen = listen
        self.server: MetricsServer | None = None

    def start(self) -> "Publisher":
        self.server = MetricsServer(self._listen, self.registry)
        return self

    def tick(self, now: float) -> list:
        """For the driver's on_turn: returns no effects."""
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_INTERVAL_S
            self.publish()
        return []

    def publish(self) -> None:  # pragma: no cover - each role's
        raise NotImplementedError

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # --- helpers -----------------------------------------------------------------------

    def gauge(self, name: str, doc: str, labels=()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def counter(self, name: str, doc: str, labels=()) -> Counter:
        """`name` without `_total`: prometheus_client adds it."""
        return Counter(name, doc, labels, registry=self.registry)

    def copy(self, counter: Counter, value: int, *labels: str) -> None:
        """Make `counter` (with `labels`) equal the core's count `value` (which only grows)."""
        key = (counter, labels)
        delta = value - self._copied.get(key, 0)
        if delta > 0:
            (counter.labels(*labels) if labels else counter).inc(delta)
            self._copied[key] = value


class BrokerMetrics(Publisher):
    def __init__(self, listen: str, controller, figures=dict):
        """`controller`: roles.controller.core.Controller; `figures()`: the driver's own counters."""
        super().__init__(listen)
        self.controller = controller
        self.figures = figures
        self._commits_seen = 0
        self.devices = self.gauge("speedsync_devices", "Devices: connected now, and known since start", ["state"])
        self.nodes = self.gauge("speedsync_storage_nodes", "Storage nodes: alive, and lost (seen, now silent)",
                                ["state"])
        self.transfers = self.gauge("speedsync_transfers", "Transfers in progress by state (parked: offers "
                                    "waiting for a node)", ["state"])
        self.finished = self.counter("speedsync_transfers_finished", "Transfers ended, by final state", ["state"])
        self.received = self.counter("speedsync_received_bytes", "CHUNK payload bytes received from agents "
                                     "(compressed, as they travelled)")
        self.committed = self.counter("speedsync_snapshots_committed", "Snapshots committed (catalog rows written)")
        self.errors = self.counter("speedsync_errors", "ERROR replies sent and reports received, by code", ["code"])
        self.free = self.gauge("speedsync_node_free_bytes", "Free bytes on a storage node's filesystem "
                               "(last reported)", ["node"])
        self.used = self.gauge("speedsync_node_used_bytes", "Used bytes on a storage node's filesystem "
                               "(last reported)", ["node"])
        self.node_up = self.gauge("speedsync_node_up", "1 while a storage node is alive, 0 once lost", ["node"])
        self.node_damaged = self.gauge("speedsync_node_damaged_chunks", "Chunks a storage node's verification "
                                       "found damaged, not yet healed (last reported)", ["node"])
        self.last_commit = self.gauge("speedsync_dataset_last_commit_timestamp_seconds",
                                      "Wall-clock time of the newest commit of each dataset (alert on "
                                      "time() - x > RPO)", ["device", "dataset"])
        self.sessions = self.gauge("speedsync_agent_sessions", "Agent connections registered")
        self.dropped = self.counter("speedsync_dropped_messages", "Messages dropped: peer gone, queue full, "
                                    "or invalid frames")
        self.catalog_up = self.gauge("speedsync_catalog_available", "1 while the catalog can record, 0 while a "
                                     "full or failing data_dir holds its writes")
        self.catalog_waiting = self.gauge("speedsync_catalog_rows_waiting", "Snapshots committed on their node "
                                          "whose catalog row is not yet durable (their agents not yet told)")

    def publish(self) -> None:
        core = self.controller
        stats = core.statistics()
        self.devices.labels("connected").set(stats.devices_connected)
        self.devices.labels("known").set(stats.devices_known)
        self.nodes.labels("alive").set(stats.nodes)
        self.nodes.labels("lost").set(stats.nodes_lost)
        self.sessions.set(stats.agents)
        by_state = core.transfers_by_state()
        for state in (*TRANSFER_STATES, *(s for s in by_state if s not in TRANSFER_STATES)):
            self.transfers.labels(state).set(by_state.get(state, 0))
        for state, count in core.finished_by_state.items():
            self.copy(self.finished, count, state)
        self.copy(self.received, stats.received_bytes)
        self.copy(self.committed, stats.snapshots_committed)
        for code, count in core.errors_by_code.items():
            self.copy(self.errors, count, code)
        for node_id, alive, free, used in core.node_figures():
            self.free.labels(node_id).set(free)
            self.used.labels(node_id).set(used)
            self.node_up.labels(node_id).set(1 if alive else 0)
            self.node_damaged.labels(node_id).set(core.storage_report(node_id)["damaged_chunks"])
        commits = core.last_commits
        for (device_id, dataset), at in commits.changed_since(self._commits_seen):
            self.last_commit.labels(device_id, dataset).set(at)
        self._commits_seen = commits.updates
        self.copy(self.dropped, self.figures().get("dropped_messages", 0))
        self.catalog_up.set(1 if core.catalog_health.available else 0)
        self.catalog_waiting.set(len(core.rows_waiting) + len(core.batch_in_flight))


class StorageMetrics(Publisher):
    def __init__(self, listen: str, core):
        """`core`: roles.storenode.core.StorageCore."""
        super().__init__(listen)
        self.core = core
        self.chunks = self.gauge("speedsync_storage_chunks", "Chunk files in the store")
        self.used = self.gauge("speedsync_storage_used_bytes", "Used bytes of the store's filesystem")
        self.free = self.gauge("speedsync_storage_free_bytes", "Free bytes of the store's filesystem")
        self.stored = self.counter("speedsync_storage_stored_bytes", "Payload bytes written to new chunk files "
                                   "(as they travelled; a chunk already stored writes nothing)")
        self.received = self.counter("speedsync_storage_chunks_received", "Chunks verified and acknowledged "
                                     "(STORED), new or already stored")
        self.commits = self.counter("speedsync_storage_commits", "Snapshots committed on this node")
        self.blocks = self.counter("speedsync_storage_blocks_sent", "Restore blocks sent")
        self.errors = self.counter("speedsync_storage_errors_sent", "ERROR replies sent to the broker")
        self.uploads = self.gauge("speedsync_storage_uploads", "Uploads open on this node")
        self.reads = self.gauge("speedsync_storage_restores", "Restores streaming from this node")
        self.pending = self.gauge("speedsync_storage_store_pending", "Store-pool tasks queued or running")
        self.gc_runs = self.counter("speedsync_storage_gc_runs", "Garbage collection runs completed")
        self.gc_freed = self.counter("speedsync_storage_gc_freed_bytes", "Chunk file bytes garbage collection "
                                     "deleted")
        self.gc_deleted = self.counter("speedsync_storage_gc_deleted_chunks", "Unreferenced chunk files "
                                       "garbage collection deleted")
        self.damaged = self.gauge("speedsync_storage_damaged_chunks", "Chunks found damaged by verification "
                                  "(quarantined, not yet healed by an upload of the same data)")
        self.damaged_snapshots = self.gauge("speedsync_storage_damaged_snapshots", "Committed snapshots with "
                                            "damaged chunks (status names them)")
        self.verified = self.counter("speedsync_storage_verified_snapshots", "Snapshots re-verified (background "
                                     "and devices' VERIFY)")
        self.verify_read = self.counter("speedsync_storage_verify_read_bytes", "Chunk-file bytes read by "
                                        "verification")

    def publish(self) -> None:
        stats = self.core.statistics()
        self.chunks.set(stats.chunks_on_disk)
        self.used.set(stats.used_bytes)
        self.free.set(stats.free_bytes)
        self.copy(self.stored, stats.stored_bytes)
        self.copy(self.received, stats.chunks_stored)
        self.copy(self.commits, stats.commits)
        self.copy(self.blocks, stats.blocks_sent)
        self.copy(self.errors, stats.errors_sent)
        self.uploads.set(stats.uploads)
        self.reads.set(stats.reads)
        self.pending.set(stats.store_pending)
        self.copy(self.gc_runs, stats.gc_runs)
        self.copy(self.gc_freed, stats.gc_freed_bytes)
        self.copy(self.gc_deleted, stats.gc_deleted_chunks)
        verifier = self.core.verifier
        self.damaged.set(verifier.damaged_chunks)
        self.damaged_snapshots.set(len(verifier.damaged))
        self.copy(self.verified, verifier.verified_snapshots)
        self.copy(self.verify_read, verifier.bytes_read)


class AgentMetrics(Publisher):
    def __init__(self, listen: str, core):
        """`core`: roles.appliance.core.AgentCore."""
        super().__init__(listen)
        self.core = core
        self._commits_seen = -1  # the journal is read at the first publish, then after each commit
        self._datasets: set = set()
        self.behind = self.gauge("speedsync_agent_dataset_behind_snapshots", "Snapshots of a dataset queued or "
                                 "uploading", ["dataset"])
        self.last_commit = self.gauge("speedsync_agent_dataset_last_commit_timestamp_seconds",
                                      "Wall-clock time of the newest commit of each dataset", ["dataset"])
        self.sent = self.counter("speedsync_agent_sent_bytes", "CHUNK payload bytes sent (compressed, as they "
                                 "travelled)")
        self.limit = self.gauge("speedsync_agent_limit_bits_per_second", "The bandwidth limit in force "
                                "(+Inf: unlimited)")
        self.committed = self.counter("speedsync_agent_snapshots_committed", "Snapshots the cloud committed")
        self.connected = self.gauge("speedsync_agent_connected", "1 while a broker has welcomed the agent")
        self.active = self.gauge("speedsync_agent_active_transfers", "Uploads in progress")
        self.queued = self.gauge("speedsync_agent_queued_snapshots", "Snapshots waiting to upload")
        self.in_flight = self.gauge("speedsync_agent_in_flight_bytes", "Bytes sent, not yet acknowledged")

    def publish(self) -> None:
        core = self.core
        stats = core.statistics()
        behind = core.behind_snapshots()
        datasets = set(behind)
        for gone in self._datasets - datasets:  # no longer configured (a reload)
            for gauge in (self.behind, self.last_commit):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        for dataset, count in behind.items():
            self.behind.labels(dataset).set(count)
        if stats.commits != self._commits_seen or datasets != self._datasets:
            self._commits_seen, self._datasets = stats.commits, datasets
            for dataset, at in core.last_commit_times().items():
                if dataset in behind:
                    self.last_commit.labels(dataset).set(at)
        self.copy(self.sent, stats.sent_total)
        self.copy(self.committed, stats.commits)
        self.limit.set(math.inf if stats.rate is None else stats.rate * 8)
        self.connected.set(1 if stats.welcomed else 0)
        self.active.set(stats.active)
        self.queued.set(stats.queued)
        self.in_flight.set(stats.in_flight)
