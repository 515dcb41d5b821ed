"""End to end, metrics: a real Prometheus server scrapes the broker, two
storage nodes and the agent (each with `metrics_listen` on a free loopback
port, every second), and what its HTTP API answers matches what happened:
the commits counted, each dataset's lag (time() - its newest commit) under a
minute after a commit, the bytes the broker received equal to the agents'
`bytes_sent` (`--once --json`, then a replicating agent's own counter), the
bytes the nodes stored equal to them too.

Needs Debian's `prometheus` (tests/requirements-debian.txt; `make test`
installs it as root). Without it the test skips, naming the reason, unless
CI=true (as CI runs), where that is a failure: CI must not skip it.
"""

from __future__ import annotations

import pytest

from roles.localprocs import free_ports
from roles.sampleimages import MiB, generate_image
from tests.needs import unavailable
from tests.promserver import PrometheusServer, why_unavailable
from tests.test_unit_metrics import dashboard_exprs

DEVICE = "office-1"
DATASETS = ("fileserver", "sql")
SIZE = 12 * MiB
LIMIT_BITS = 1_000_000_000  # the agent's `limit: 1Gbit`


@pytest.fixture
def prometheus(tmp_path):
    reason = why_unavailable()
    if reason:
        unavailable("a Prometheus server", reason)
    server = PrometheusServer(tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.stop()


def random_image(cluster, dataset: str, snapshot: str, seed: int) -> None:
    """Incompressible, no chunk shared with another image: each chunk travels and is stored exactly once."""
    path = cluster.dataset_dir(DEVICE, dataset) / f"{snapshot}.img"
    generate_image(str(path), SIZE, seed=seed, zero_fraction=0.0, text_fraction=0.0)


def test_prometheus_scrapes_every_role_and_the_values_match_what_happened(cluster, prometheus):
    broker_at, node_a_at, node_b_at, agent_at = (f"127.0.0.1:{p}" for p in free_ports(4))
    prometheus.start({"broker": [broker_at], "storage": [node_a_at, node_b_at], "agent": [agent_at]})
    cluster.start_broker(metrics_listen=broker_at)
    cluster.start_storage("node-a", metrics_listen=node_a_at)
    cluster.start_storage("node-b", metrics_listen=node_b_at)

    def wait_until(expr: str, check, what: str, timeout_s: float = 60):
        def holds():
            value = prometheus.value(expr)
            return value is not None and check(value)
        cluster.wait_for(holds, timeout_s, f"{what} ({expr})")

    wait_until('sum(up{job=~"broker|storage"})', lambda v: v == 3, "broker and both nodes scraped")
    wait_until('speedsync_storage_nodes{state="alive"}', lambda v: v == 2, "two nodes alive")

    # 1. `agent --once`: two datasets, one snapshot each
    for seed, dataset in enumerate(DATASETS, start=1):
        random_image(cluster, dataset, "s1", seed)
    config = cluster.agent_config(DEVICE, [{"name": d, "path": cluster.dataset_dir(DEVICE, d)} for d in DATASETS],
                                  metrics_listen=agent_at, limit="1Gbit")
    rc, doc, stderr = cluster.run_agent_once(config)
    assert rc == 0, stderr
    assert {t["state"] for t in doc["transfers"]} == {"committed"}
    sent_once = sum(t["bytes_sent"] for t in doc["transfers"])
    chunks_once = sum(t["chunks_sent"] for t in doc["transfers"])
    assert sent_once > SIZE  # incompressible: at least the images' bytes travelled

    wait_until("speedsync_snapshots_committed_total", lambda v: v == 2, "both commits counted")
    wait_until("speedsync_received_bytes_total", lambda v: v == sent_once, f"{sent_once} bytes received")
    wait_until("sum(speedsync_storage_stored_bytes_total)", lambda v: v == sent_once, "the same bytes stored")
    wait_until("sum(speedsync_storage_chunks)", lambda v: v == chunks_once, f"{chunks_once} chunks on the nodes")
    lag = f'time() - speedsync_dataset_last_commit_timestamp_seconds{{device="{DEVICE}"}}'
    wait_until(f"count(({lag}) < 60)", lambda v: v == len(DATASETS), "each dataset's lag under a minute")
    assert {m["dataset"] for m, _ in prometheus.query(lag)} == set(DATASETS)
    assert prometheus.value('speedsync_devices{state="known"}') == 1
    assert prometheus.value('speedsync_transfers_finished_total{state="committed"}') == 2
    assert prometheus.value('sum(speedsync_node_free_bytes)') > 0
    catalog = {s["dataset"]: s["committed_at"] for s in cluster.catalog(DEVICE)}
    first_commit = {m["dataset"]: v for m, v in
                    prometheus.query(f'speedsync_dataset_last_commit_timestamp_seconds{{device="{DEVICE}"}}')}
    assert first_commit == pytest.approx(catalog, abs=1e-3)  # the catalog's own committed_at

    # 2. the same agent replicating: caught up at start, then one more snapshot arrives
    cluster.start_agent(config)
    wait_until('up{job="agent"}', lambda v: v == 1, "the agent scraped")
    wait_until("speedsync_agent_connected", lambda v: v == 1, "the agent welcomed")
    wait_until("sum(speedsync_agent_dataset_behind_snapshots)", lambda v: v == 0, "nothing behind")
    agent_lag = "time() - speedsync_agent_dataset_last_commit_timestamp_seconds"
    wait_until(f"count(({agent_lag}) < 60)", lambda v: v == len(DATASETS), "the agent's lag under a minute")
    assert prometheus.value("speedsync_agent_limit_bits_per_second") == LIMIT_BITS
    wait_until('speedsync_devices{state="connected"}', lambda v: v == 1, "the broker counts it connected")

    random_image(cluster, "fileserver", "s2", seed=3)
    wait_until("speedsync_snapshots_committed_total", lambda v: v == 3, "the third commit counted", 120)
    wait_until("speedsync_agent_snapshots_committed_total", lambda v: v == 1, "the agent's commit counted")
    sent_since = prometheus.value("speedsync_agent_sent_bytes_total")
    assert sent_since >= SIZE
    wait_until("speedsync_received_bytes_total", lambda v: v == sent_once + sent_since,
               "received = what both agent runs sent")
    wait_until("sum(speedsync_storage_stored_bytes_total)", lambda v: v == sent_once + sent_since,
               "stored = what both agent runs sent")
    newest = f'speedsync_dataset_last_commit_timestamp_seconds{{device="{DEVICE}",dataset="fileserver"}}'
    wait_until(newest, lambda v: v > first_commit["fileserver"], "fileserver's newest commit moved on")
    wait_until(f"count(({lag}) < 60)", lambda v: v == len(DATASETS), "each dataset's lag under a minute again")
    assert prometheus.value('speedsync_dataset_last_commit_timestamp_seconds{dataset="sql"}') == \
        first_commit["sql"]
    wait_until('speedsync_agent_dataset_behind_snapshots{dataset="fileserver"}', lambda v: v == 0,
               "the agent caught up again")
    # every query of the shipped Grafana dashboard is valid PromQL, and the fleet's panels have data
    variables = {"$rpo_seconds": "900", "$top_datasets": "20", "$job": ".*"}
    for expr in dashboard_exprs():
        for name, value in variables.items():
            expr = expr.replace(name, value)
        prometheus.query(expr)  # raises unless Prometheus accepts it
    for expr in ('speedsync_devices{state="connected"}', "speedsync_node_free_bytes", "speedsync_transfers",
                 f"topk(20, {lag})"):
        assert prometheus.query(expr), f"the dashboard's {expr} has no data"
