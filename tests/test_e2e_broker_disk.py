"""End to end, a real broker whose `data_dir` fills up (issue 11, "errors park, never kill").

The broker's catalog lives on a small tmpfs mounted for the test, filled to
the last byte while a snapshot is being committed: SQLite fails with a real
SQLITE_FULL. The broker keeps serving; the snapshot is held, its agent not
told COMMITTED; a new OFFER is refused `catalog_unavailable`; status names
the reason. Once the filler is removed, the held row goes in by itself and
the agent finishes with the snapshot committed and restorable.

Mounting needs root (CI runs as root). Without it the test skips, naming the
reason, unless CI=true (as CI runs) or SPEEDSYNC_REQUIRE_ROOT=1 makes that a
failure, as tests/test_e2e_link.py does for its namespaces.
"""

from __future__ import annotations

import errno
import os
import subprocess
import urllib.request

import pytest

from roles.localprocs import free_ports
from roles.sampleimages import generate_image
from tests.needs import unavailable
from tests.harness import MiB, RawClient, assert_restores, uploads_of

TMPFS_SIZE = 4 * MiB


def _unavailable(reason: str):
    unavailable("a small filesystem (tmpfs)", reason, "SPEEDSYNC_REQUIRE_ROOT")


@pytest.fixture
def broker_tmpfs(tmp_path_factory):
    """A TMPFS_SIZE tmpfs, outside the cluster's root; unmounted at teardown, also when the test fails.
    Request it before `cluster`, so that the broker is stopped before it is unmounted."""
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    path = tmp_path_factory.mktemp("broker-tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        _unavailable(f"mount -t tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # a process still holds a file there


def fill(directory) -> int:
    """Write a filler file until the filesystem refuses a single byte more; returns its size."""
    size = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        for block in (1 << 16, 4096, 1):
            while True:
                try:
                    size += f.write(b"\xff" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return size


def gauges(listen: str) -> dict:
    """The broker's catalog gauges, as a scrape reads them (published once a second)."""
    text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, _, value in (line.partition(" ") for line in text.splitlines())
            if name in ("speedsync_catalog_available", "speedsync_catalog_rows_waiting")}


def catalog_state(cluster) -> dict:
    return (cluster.try_status() or {"broker": {}})["broker"].get("catalog", {})


def test_a_full_broker_data_dir_holds_the_commit_refuses_offers_and_recovers_when_space_returns(
        broker_tmpfs, cluster, zctx, tmp_path):
    (port,) = free_ports(1)
    metrics_at = f"127.0.0.1:{port}"
    cluster.start_broker(data_dir=str(broker_tmpfs), metrics_listen=metrics_at)
    cluster.start_storage("node-a")
    directory = cluster.dataset_dir("office-1", "fs")
    first = generate_image(str(directory / "s1.img"), 2 * MiB, seed=90)
    cfg = cluster.agent_config("office-1", [{"name": "fs", "path": directory}])
    rc, doc, log = cluster.run_agent_once(cfg)
    assert rc == 0, log

    assert fill(broker_tmpfs) > 0
    second = generate_image(str(directory / "s2.img"), 2 * MiB, seed=91)
    agent = cluster.start_agent_once(cfg)

    def held():
        status = cluster.try_status()
        if not status:
            return None
        attempts = [t for t in uploads_of(status, "office-1", "fs", "s2") if t["state"] == "recording"]
        return (attempts[0], status["broker"]["catalog"]) if attempts and attempts[0]["reason"] else None

    upload, catalog = cluster.wait_for(held, 60, "s2 committed on its node and held for the full catalog")
    assert catalog["available"] is False and catalog["reason"] == "SQLITE_FULL: database or disk is full", catalog
    assert catalog["rows_waiting"] == 1, catalog
    assert upload["reason"].startswith("catalog_unavailable: SQLITE_FULL"), upload
    held_gauges = {"speedsync_catalog_available": 0.0, "speedsync_catalog_rows_waiting": 1.0}
    cluster.wait_for(lambda: gauges(metrics_at) == held_gauges, 10, "the catalog gauges showing the held row")

    # the broker serves on: status and LIST answer (the disk still serves reads), a new offer is refused
    assert cluster.running("broker") and cluster.node_alive("node-a")
    assert [(r["dataset"], r["snapshot"]) for r in cluster.catalog()] == [("fs", "s1")]
    other = RawClient(zctx, cluster.frontend)
    other.hello("office-2")
    other.send("OFFER", req=1, dataset="fs", snapshot="s1", image_size=MiB, chunk_size=MiB, chunk_count=1)
    refused = other.expect_error("catalog_unavailable")
    assert "SQLITE_FULL" in refused["reason"], dict(refused.fields)
    other.close()
    assert agent.poll() is None, "the agent finished although its snapshot's row is not durable"

    (broker_tmpfs / "filler").unlink()  # space is back
    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)
    assert rc == 0, log
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s2", "committed")], doc
    assert [(r["dataset"], r["snapshot"]) for r in cluster.catalog()] == [("fs", "s1"), ("fs", "s2")]
    catalog = catalog_state(cluster)
    assert catalog["available"] is True and catalog["rows_waiting"] == 0 and catalog["outages"] == 1, catalog
    assert cluster.status()["broker"]["errors_by_code"].get("catalog_unavailable") == 1
    cluster.wait_for(lambda: gauges(metrics_at)["speedsync_catalog_available"] == 1.0, 10, "the catalog gauge back")
    assert_restores(cluster, cfg, "fs", "s2", second, tmp_path)
    assert_restores(cluster, cfg, "fs", "s1", first, tmp_path)
