"""End to end, a real broker whose catalog is a real PostgreSQL (catalog_url; issue 14, must-show 4).

Uploads commit, `list` shows them, a restore is identical. Then the server is stopped for about
20 s (pg_ctl stop -m fast: every session ended, connections refused): no process dies, an offer
made meanwhile parks `catalog_unavailable` with the server's error as its reason, status keeps
answering and shows broker.catalog unavailable. Once the server is started again the broker
reconnects by itself, the parked snapshot commits, and every listed snapshot restores identical;
`speedsync prune --dry-run` reads the same catalog.
Without PostgreSQL (tests/pgserver.py) the test skips, or fails under CI=true.
"""

from __future__ import annotations

import time

from roles.sampleimages import generate_image
from tests.harness import MiB, assert_restores, uploads_of

OUTAGE_S = 20


def test_a_postgresql_catalog_outage_parks_offers_and_everything_commits_once_it_is_back(
        pg_server, pg_url, cluster, tmp_path):
    # retention runs at start (nothing to prune yet), then not again within the test
    cluster.start_broker(catalog_url=pg_url, retention={"keep_last": 1}, prune_interval_ms=3600000)
    cluster.start_storage("node-a")
    directory = cluster.dataset_dir("office-1", "fs")
    images = {"s1": generate_image(str(directory / "s1.img"), 2 * MiB, seed=140)}
    cfg = cluster.agent_config("office-1", [{"name": "fs", "path": directory}])
    rc, doc, log = cluster.run_agent_once(cfg)
    assert rc == 0, log
    assert [(r["dataset"], r["snapshot"]) for r in cluster.catalog()] == [("fs", "s1")]
    assert_restores(cluster, cfg, "fs", "s1", images["s1"], tmp_path)

    pg_server.stop()
    stopped_at = time.monotonic()
    try:
        images["s2"] = generate_image(str(directory / "s2.img"), 2 * MiB, seed=141)
        agent = cluster.start_agent_once(cfg)

        def parked():
            status = cluster.try_status()
            if not status:
                return None
            attempts = [t for t in uploads_of(status, "office-1", "fs", "s2") if t["state"] == "parked"]
            return (attempts[0], status["broker"]["catalog"]) if attempts else None

        upload, catalog = cluster.wait_for(parked, OUTAGE_S, "the offer of s2 parked while the catalog is down")
        assert upload["reason"].startswith("catalog_unavailable: "), upload
        assert "postgresql" in upload["reason"], upload
        assert catalog["available"] is False and catalog["reason"].startswith("postgresql"), catalog
        # the rest of the outage: status answers throughout, nobody dies, the agent waits
        while time.monotonic() - stopped_at < OUTAGE_S:
            catalog = cluster.status()["broker"]["catalog"]
            assert catalog["available"] is False, catalog
            assert cluster.running("broker") and cluster.node_alive("node-a") and agent.poll() is None
            time.sleep(0.5)
        assert [r["snapshot"] for r in cluster.status()["transfers"] if r.get("state") == "committed"
                and r["snapshot"] == "s2"] == []
    finally:
        pg_server.start()

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)
    assert rc == 0, log
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s2", "committed")], doc
    catalog = cluster.status()["broker"]["catalog"]
    assert catalog["available"] is True and catalog["outages"] >= 1, catalog
    listed = [(r["dataset"], r["snapshot"]) for r in cluster.catalog()]
    assert listed == [("fs", "s1"), ("fs", "s2")]
    for _, snapshot in listed:  # the catalog and the node agree
        assert_restores(cluster, cfg, "fs", snapshot, images[snapshot], tmp_path)
    dry = cluster.run("prune", "--config", cluster.root / "configs" / "broker.yaml", "--dry-run", "--json")
    assert dry.rc == 0, str(dry)
    assert [r["snapshot"] for r in dry.json["prune"]] == ["s1"]  # read from PostgreSQL, nothing removed
    assert len(cluster.catalog()) == 2
