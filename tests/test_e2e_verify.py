"""Background verification on storage nodes and the agent's `verify` action,
with real processes (DESIGN.md "Lifecycle", Verification).

A chunk rotted on disk after commit is found by the node with no command
run, quarantined and named (device, dataset, snapshot) in the broker's
status and in the node's `speedsync_storage_damaged_chunks`; a restore of
the snapshot fails `damaged` and writes no file; an upload of the same data
heals it. The agent's verify reports a match for an intact snapshot and a
mismatch for a damaged one, in its status' `last_verified`.
"""

from __future__ import annotations

import shutil
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from roles.localprocs import free_ports
from roles.sampleimages import generate_image
from tests.harness import MiB, assert_restores, chunk_names
from tests.test_e2e_client import agent_status
from tests.test_e2e_faults import chunk_file, flip_a_byte


def node_gauge(listen: str, name: str) -> float | None:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def storage_entry(cluster, node_id: str = "node-a") -> dict:
    return next(n for n in cluster.status()["storage"] if n["node_id"] == node_id)


def test_background_verification_finds_rot_names_it_refuses_its_restore_and_an_upload_heals_it(cluster, tmp_path):
    metrics_at = f"127.0.0.1:{free_ports(1)[0]}"
    cluster.start(verify_interval_ms=300, metrics_listen=metrics_at)
    fs = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(fs / "s1.img"), 6 * MiB, seed=81, zero_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": fs}])
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    cluster.wait_for(lambda: storage_entry(cluster)["verified_snapshots"] >= 1, 20, "a background verify of s1")
    assert storage_entry(cluster)["damaged"] == [] and node_gauge(metrics_at, "speedsync_storage_damaged_chunks") == 0

    victim_name = chunk_names(fs / "s1.img")[3]
    victim = chunk_file(cluster, "node-a", victim_name)
    flip_a_byte(victim)

    # no command run: the node's next pass finds it
    cluster.wait_for(lambda: storage_entry(cluster)["damaged"], 20, "the rot found by background verification")
    entry = storage_entry(cluster)
    assert [(d["device_id"], d["dataset"], d["snapshot"], d["chunks"]) for d in entry["damaged"]] == [
        ("office-1", "fileserver", "s1", [victim_name.hex()])], entry
    assert entry["damaged_chunks"] == 1 and entry["verify_bytes_read"] > 0
    assert not victim.exists() and (cluster.node_dir("node-a") / "quarantine" / victim_name.hex()).exists()
    cluster.wait_for(lambda: node_gauge(metrics_at, "speedsync_storage_damaged_chunks") == 1, 10,
                     "the damaged-chunks gauge")

    out = tmp_path / "out" / "s1.img"
    out.parent.mkdir()
    failed = cluster.restore(cfg, "fileserver", "s1", out)
    assert failed.rc == 1, str(failed)
    assert "damaged" in failed.stderr.strip().splitlines()[-1], str(failed)
    assert not list(out.parent.iterdir()), "a refused restore left a file"

    # the same data uploaded again (a new snapshot id) stores the chunk afresh: s1 is whole again
    shutil.copyfile(fs / "s1.img", tmp_path / "s2.img")
    shutil.move(tmp_path / "s2.img", fs / "s2.img")
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s2", "committed")]
    cluster.wait_for(lambda: storage_entry(cluster)["damaged"] == [], 10, "s1 healed in status")
    cluster.wait_for(lambda: node_gauge(metrics_at, "speedsync_storage_damaged_chunks") == 0, 10, "gauge healed")
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)


def test_the_agents_verify_reports_a_match_for_an_intact_snapshot_and_a_mismatch_for_a_damaged_one(cluster,
                                                                                                      tmp_path):
    cluster.start()  # background verification at its default (a week): only the agent's verify reads
    fs = cluster.dataset_dir("office-1", "fileserver")
    sql = cluster.dataset_dir("office-1", "sql")
    generate_image(str(fs / "s1.img"), 4 * MiB, seed=82, zero_fraction=0.0)
    generate_image(str(sql / "s1.img"), 4 * MiB, seed=83, zero_fraction=0.0)
    datasets = [{"name": "fileserver", "path": fs}, {"name": "sql", "path": sql}]
    cfg = cluster.agent_config("office-1", datasets, verify_interval="1s")
    rc, _, stderr = cluster.run_agent_once(cfg)  # --once does not verify
    assert rc == 0, stderr
    flip_a_byte(chunk_file(cluster, "node-a", chunk_names(sql / "s1.img")[1]))

    cluster.start_agent(cfg)

    def verified():
        status = agent_status(cluster, "office-1")
        if status is None:
            return None
        last = {d["name"]: d["last_verified"] for d in status["datasets"]}
        return last if all(last.values()) else None

    last = cluster.wait_for(verified, 20, "both datasets verified by the cloud")
    assert last["fileserver"]["snapshot"] == "s1" and last["fileserver"]["match"] is True, last
    assert last["sql"]["snapshot"] == "s1" and last["sql"]["match"] is False, last
    assert "damaged" in last["sql"]["reason"], last
    entry = storage_entry(cluster)
    cluster.wait_for(lambda: storage_entry(cluster)["damaged_snapshots"] == 1, 10, "the damage in broker status")
    entry = storage_entry(cluster)
    assert [(d["dataset"], d["snapshot"]) for d in entry["damaged"]] == [("sql", "s1")], entry
