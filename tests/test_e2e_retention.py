"""End to end: retention in the broker, garbage collection on the node (issue 12, "what it must show" 1 and 3).

One dataset, 100 snapshots taken every 72 minutes over five days (their `taken_at` is the image file's
mtime, set before the agent runs), each two chunks changed from the one before. The broker keeps
`keep_last 2, keep_hourly 6, keep_daily 3` and prunes every 300 ms; the node collects garbage every
300 ms. Worked out by hand from the rule (each snapshot is in an hour of its own; day d holds snapshots
20d to 20d+19): keep_last keeps 99 and 98; hourly the next six hours, 97 to 92; daily finds day 4 held,
keeps the newest of days 3, 2 and 1 (79, 59, 39). Everything else, 89 snapshots, leaves the catalog and
the node, the node's chunk files fall to exactly what the 11 kept manifests reference, and the kept
snapshots restore identical. A device can add snapshots and never delete them: PRUNE from an agent is
refused and removes nothing.
"""

from __future__ import annotations

import calendar
import os
import time

from roles.retention import KeepRules, Snapshot, to_prune
from roles.sampleimages import generate_image, mutate_chunks
from tests.harness import RawClient, assert_restores, assert_scrub_clean, chunk_names

CHUNK = 16 * 1024
IMAGE = 256 * 1024
SNAPSHOTS = 100
STEP_S = 72 * 60
START = calendar.timegm(time.strptime("2026-11-26 00:00", "%Y-%m-%d %H:%M"))  # a Thursday, UTC
RULES = {"keep_last": 2, "keep_hourly": 6, "keep_daily": 3}
KEPT_BY_HAND = {99, 98, 97, 96, 95, 94, 93, 92, 79, 59, 39}


def name(i: int) -> str:
    return f"s{i:03d}"


def make_snapshots(directory) -> dict:
    """s000..s099, each two chunks changed from the one before, mtimes 72 minutes apart; name -> digest."""
    digests = {name(0): generate_image(str(directory / "s000.img"), IMAGE, seed=1200, zero_fraction=0.0)}
    for i in range(1, SNAPSHOTS):
        digests[name(i)] = mutate_chunks(str(directory / f"{name(i - 1)}.img"), str(directory / f"{name(i)}.img"),
                                         [(3 * i) % 16, (7 * i + 5) % 16], CHUNK, seed=1200 + i)
    for i in range(SNAPSHOTS):
        os.utime(directory / f"{name(i)}.img", (START + STEP_S * i, START + STEP_S * i))
    return digests


def manifest_path(cluster, snapshot: str):
    return cluster.node_dir("node-a") / "manifests" / "office-1" / "db" / f"{snapshot}.manifest"


def chunk_files(cluster) -> set:
    return {bytes.fromhex(p.name) for p in (cluster.node_dir("node-a") / "chunks").glob("*/*") if len(p.name) == 64}


def test_retention_keeps_exactly_what_the_rules_give_and_the_node_frees_the_rest(cluster, zctx, tmp_path):
    cluster.start_broker(retention=RULES, prune_interval_ms=300)
    cluster.start_storage("node-a", gc_interval_ms=300)
    directory = cluster.dataset_dir("office-1", "db")
    digests = make_snapshots(directory)
    cfg = cluster.agent_config("office-1", [{"name": "db", "path": directory, "chunk_size": CHUNK}])

    rc, doc, log = cluster.run_agent_once(cfg)
    assert rc == 0, log
    assert sum(t["state"] == "committed" for t in doc["transfers"]) == SNAPSHOTS, doc

    kept = {name(i) for i in KEPT_BY_HAND}
    by_rule = set(digests) - set(to_prune([Snapshot(name(i), START + STEP_S * i) for i in range(SNAPSHOTS)],
                                          KeepRules(**RULES)))
    assert by_rule == kept  # the hand-worked answer and the module's agree
    cluster.wait_for(lambda: {s["snapshot"] for s in cluster.catalog("office-1")} == kept, 30,
                     "the catalog pruned to the kept set")
    cluster.wait_for(lambda: not cluster.status()["broker"]["retention"]["pending_manifests"], 30,
                     "every pruned manifest confirmed removed")
    listed = {s["snapshot"]: s for s in cluster.catalog("office-1")}
    assert {n: s["taken_at"] for n, s in listed.items()} == {name(i): START + STEP_S * i for i in KEPT_BY_HAND}
    retention = cluster.status()["broker"]["retention"]
    assert retention["pruned_total"] == SNAPSHOTS - len(kept) and retention["runs"] >= 1, retention
    assert {n for n in digests if manifest_path(cluster, n).exists()} == kept

    live = set().union(*({c for c in chunk_names(str(directory / f"{n}.img"), CHUNK) if c} for n in kept))
    cluster.wait_for(lambda: chunk_files(cluster) == live, 30, "the node's chunks down to what the kept reference")
    for snapshot in sorted(kept):
        assert_restores(cluster, cfg, "db", snapshot, digests[snapshot], tmp_path)
    assert assert_scrub_clean(cluster, "node-a")["chunks_checked"] == len(live)

    dry = cluster.run("prune", "--config", cluster.root / "configs" / "broker.yaml", "--dry-run", "--json")
    assert dry.rc == 0 and dry.json == {"retention": True, "prune": []}, str(dry)

    # a device cannot prune: PRUNE is the broker's, to nodes; from an agent it is refused and changes nothing
    device = RawClient(zctx, cluster.frontend)
    device.hello("office-1")
    device.send("PRUNE", device_id="office-1", dataset="db", snapshot=name(99))
    device.expect_error("unknown_type")
    device.close()
    assert manifest_path(cluster, name(99)).exists()
    assert name(99) in {s["snapshot"] for s in cluster.catalog("office-1")}
