"""roles/metrics.py on the three real cores: each publisher serves a real
/metrics over HTTP (a free loopback port), and what a scrape reads equals
what the cores counted. Also: the last-commit index costs what changed, and
`metrics_listen` is parsed strictly."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roles import metrics
from roles.config import ConfigError, StorageConfig, load
from roles.controller.catalog import CatalogIndex
from roles.controller.core import Controller
from roles.controller.lastcommit import LastCommits
from roles.localprocs import free_ports
from tests.test_unit_cores import Router, image_of
from tests.test_unit_layering import closure


def scrape(publisher) -> dict:
    """{(name, sorted label items): value} from the publisher's own HTTP server."""
    with urllib.request.urlopen(f"http://{publisher.server.listen}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def served(cls, *args):
    (port,) = free_ports(1)
    return metrics.start(cls, f"127.0.0.1:{port}", *args)


def test_last_commits_finds_what_changed_without_walking_every_dataset():
    commits = LastCommits()
    commits.merge((f"dev-{i}", "fs", 1000.0 + i) for i in range(5000))
    seen = commits.updates
    assert commits.changed_since(seen) == []
    commits.record("dev-7", "fs", 9000.0)
    commits.record("dev-9", "sql", 9001.0)
    assert not commits.record("dev-9", "sql", 10.0), "an older time changes nothing"
    changed = dict(commits.changed_since(seen))
    assert changed == {("dev-7", "fs"): 9000.0, ("dev-9", "sql"): 9001.0}
    # the catalog's load at start arriving after a commit does not undo it
    commits.merge([("dev-7", "fs", 1007.0)])
    assert commits.at[("dev-7", "fs")] == 9000.0
    assert len(commits) == 5001
    assert len(commits.changed_since(0)) == 5001


def test_a_scrape_reads_what_the_three_cores_counted(tmp_path):
    images = {"fs": image_of(40, 1), "sql": image_of(23, 2)}
    router = Router(tmp_path, images)
    router.run_until(lambda: router.agent.done)
    broker = served(metrics.BrokerMetrics, router.controller, lambda: {"dropped_messages": 0})
    node = served(metrics.StorageMetrics, router.node)
    agent = served(metrics.AgentMetrics, router.agent)
    try:
        for publisher in (broker, node, agent):
            publisher.tick(router.clock.now())
        b, n, a = scrape(broker), scrape(node), scrape(agent)
    finally:
        for publisher in (broker, node, agent):
            publisher.close()

    sent = sum(router.result(name)["bytes_sent"] for name in images)
    rows = {(r["device_id"], r["dataset"]): r["committed_at"] for r in router.store.list()[0]}
    assert b[("speedsync_snapshots_committed_total", ())] == 2
    assert b[("speedsync_received_bytes_total", ())] == sent == a[("speedsync_agent_sent_bytes_total", ())]
    for (device, dataset), at in rows.items():
        assert b[("speedsync_dataset_last_commit_timestamp_seconds",
                  (("dataset", dataset), ("device", device)))] == at
    assert b[("speedsync_devices", (("state", "connected"),))] == 1
    assert b[("speedsync_devices", (("state", "known"),))] == 1
    assert b[("speedsync_storage_nodes", (("state", "alive"),))] == 1
    assert b[("speedsync_storage_nodes", (("state", "lost"),))] == 0
    assert b[("speedsync_node_free_bytes", (("node", "node-a"),))] == 1 << 40
    assert b[("speedsync_transfers", (("state", "active"),))] == 0
    assert b[("speedsync_transfers_finished_total", (("state", "committed"),))] == 2
    assert b[("speedsync_catalog_available", ())] == 1 and b[("speedsync_catalog_rows_waiting", ())] == 0
    assert "process_resident_memory_bytes" in {name for name, _ in b}

    on_disk = sum(1 for p in router.chunks.root.rglob("*") if p.is_file())
    assert n[("speedsync_storage_chunks", ())] == on_disk == router.chunks.count()
    assert n[("speedsync_storage_stored_bytes_total", ())] == sent  # every chunk new: each written once
    assert n[("speedsync_storage_commits_total", ())] == 2
    assert n[("speedsync_storage_used_bytes", ())] == router.node.statistics().used_bytes

    for name in images:
        assert a[("speedsync_agent_dataset_behind_snapshots", (("dataset", name),))] == 0
        journal_at = router.agent.journal.last_commit_times()[name]
        assert a[("speedsync_agent_dataset_last_commit_timestamp_seconds", (("dataset", name),))] == journal_at
    assert a[("speedsync_agent_limit_bits_per_second", ())] == math.inf  # limit: none
    assert a[("speedsync_agent_snapshots_committed_total", ())] == 2


def test_a_restarted_broker_loads_each_datasets_newest_commit_from_the_catalog(tmp_path):
    router = Router(tmp_path, {"fs": image_of(5, 3)})
    router.run_until(lambda: router.agent.done)
    # as the broker builds it: the index is loaded from the catalog before the loop starts
    index = CatalogIndex(router.store.placements(), router.store.newest_commits())
    fresh = Controller(router.broker_config, router.store, index)
    [row] = router.store.list()[0]
    assert fresh.last_commits.at == {("office-1", "fs"): row["committed_at"]}


def test_counters_are_published_by_difference_and_never_go_back(tmp_path):
    router = Router(tmp_path, {"fs": image_of(5, 4)})
    publisher = metrics.BrokerMetrics("127.0.0.1:1", router.controller)  # not started: no server needed
    publisher.publish()
    router.run_until(lambda: router.agent.done)
    publisher.publish()
    publisher.publish()
    value = publisher.registry.get_sample_value("speedsync_snapshots_committed_total")
    assert value == router.controller.statistics().snapshots_committed == 1


@pytest.mark.parametrize("value, expected", [("127.0.0.1:9560", "127.0.0.1:9560"), ("[::1]:9560", "[::1]:9560"),
                                             ("", "")])
def test_metrics_listen_takes_host_and_port(tmp_path, value, expected):
    path = tmp_path / "storage.yaml"
    path.write_text(f"insecure: true\nmetrics_listen: '{value}'\n")
    assert load(StorageConfig, path).metrics_listen == expected


@pytest.mark.parametrize("value", ["9560", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "tcp://127.0.0.1:9560",
                                   ":9560"])
def test_metrics_listen_refuses_what_is_not_host_and_port(tmp_path, value):
    path = tmp_path / "storage.yaml"
    path.write_text(f"insecure: true\nmetrics_listen: '{value}'\n")
    with pytest.raises(ConfigError, match="metrics_listen"):
        load(StorageConfig, path)


def test_a_port_in_use_is_an_error_naming_the_key():
    first = served(metrics.Publisher)
    try:
        with pytest.raises(OSError, match="metrics_listen"):
            metrics.start(metrics.Publisher, first.server.listen)
    finally:
        first.close()


def test_metrics_never_reach_zmq():
    assert "zmq" not in {name.split(".")[0] for name in closure("roles.metrics")}


DASHBOARD = Path(__file__).parent.parent / "configs" / "grafana" / "speedsync.json"


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", ())]


def test_the_grafana_dashboard_asks_only_for_metrics_the_roles_export():
    exported = set()
    for publisher in (metrics.BrokerMetrics("127.0.0.1:1", None), metrics.StorageMetrics("127.0.0.1:1", None),
                      metrics.AgentMetrics("127.0.0.1:1", None)):
        for family in publisher.registry.collect():
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    asked = {name for expr in dashboard_exprs() for name in re.findall(r"\b(?:speedsync|process)_[a-z_]+", expr)}
    assert asked and asked <= exported, sorted(asked - exported)
    for required in ("speedsync_devices", "speedsync_dataset_last_commit_timestamp_seconds",
                     "speedsync_received_bytes_total", "speedsync_errors_total", "speedsync_node_free_bytes",
                     "speedsync_transfers"):
        assert required in asked, required
