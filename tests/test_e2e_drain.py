"""End to end: draining a storage node (issue 12, part 5; DESIGN.md "Lifecycle", Drain).

Two devices' datasets live on node-a; node-b joins empty and node-a is drained with the real
`speedsync drain` command while new snapshots upload. node-b writes slowly (`fault_write_rate`), so
the drain lasts long enough for uploads, and a kill -9 of the broker then of node-b, to land in the
middle of it.
What must hold: every dataset moves, the catalog names node-b for every snapshot, node-a ends with no
manifest and (after its garbage collection) no chunk, and every snapshot restores identical.
"""

from __future__ import annotations

import json

from roles.sampleimages import generate_image, mutate_chunks
from tests.attacker import curve
from tests.harness import MiB, RawClient, assert_restores

CHUNK = 64 * 1024
IMAGE = 2 * MiB
CHUNKS = IMAGE // CHUNK
DEVICES = {"office-1": ("fs", "sql"), "office-2": ("fs",)}


def drain(cluster, node_id: str, *keys) -> dict:
    result = cluster.run("drain", "--broker", cluster.status_endpoint, node_id, "--json",
                         *(keys or cluster.operator_args()))
    assert result.rc == 0, str(result)
    return result.json


def drain_of(cluster, node_id: str = "node-a") -> dict | None:
    (entry,) = [n for n in cluster.status()["storage"] if n["node_id"] == node_id]
    return entry.get("drain")


def write_snapshots(cluster, images: dict, round_: int) -> dict:
    """Round 0: a first image per dataset; later rounds: a quarter of the chunks rewritten."""
    configs = {}
    for device, datasets in DEVICES.items():
        entries = []
        for k, dataset in enumerate(datasets):
            directory = cluster.dataset_dir(device, dataset)
            path = directory / f"s{round_}.img"
            seed = 100 * round_ + 10 * k + len(device)
            if round_ == 0:
                digest = generate_image(str(path), IMAGE, seed=seed, zero_fraction=0.1, text_fraction=0.3)
            else:
                base = directory / f"s{round_ - 1}.img"
                digest = mutate_chunks(str(base), str(path), range(round_, CHUNKS, 4), CHUNK, seed=seed)
            images[(device, dataset, path.stem)] = digest
            entries.append({"name": dataset, "path": directory, "chunk_size": CHUNK})
        configs[device] = cluster.agent_config(device, entries)
    return configs


def upload_all(cluster, configs: dict) -> None:
    for device, cfg in configs.items():
        rc, doc, log = cluster.run_agent_once(cfg)
        assert rc == 0, log
        assert all(t["state"] == "committed" for t in doc["transfers"]), doc


def start(cluster, images: dict) -> dict:
    """node-a holds two rounds of every dataset; node-b joins, writing slowly."""
    cluster.start_broker()
    cluster.start_storage("node-a", gc_interval_ms=200)
    configs = write_snapshots(cluster, images, 0)
    upload_all(cluster, configs)
    configs = write_snapshots(cluster, images, 1)
    upload_all(cluster, configs)
    cluster.start_storage("node-b", fault_write_rate=MiB)
    return configs


def assert_drained(cluster, images: dict, configs: dict, tmp_path) -> None:
    cluster.wait_for(lambda: (drain_of(cluster) or {}).get("state") == "drained", 120, "node-a drained")
    rows = cluster.catalog()
    assert {(r["device_id"], r["dataset"], r["snapshot"]) for r in rows} == set(images)
    assert {r["node_id"] for r in rows} == {"node-b"}, rows
    manifests = cluster.node_dir("node-a") / "manifests"
    cluster.wait_for(lambda: not list(manifests.rglob("*.manifest")), 30, "node-a's manifests removed")
    cluster.wait_for(lambda: not list((cluster.node_dir("node-a") / "chunks").glob("*/*")), 30,
                     "node-a's chunks collected")
    cluster.wait_for(lambda: [n["chunks"] for n in cluster.status()["storage"] if n["node_id"] == "node-a"] == [0],
                     30, "node-a reports no chunk")
    for (device, dataset, snapshot), digest in images.items():
        assert_restores(cluster, configs[device], dataset, snapshot, digest, tmp_path)


def test_a_drain_while_uploads_run_moves_every_dataset_and_leaves_the_node_empty(cluster, tmp_path):
    images: dict = {}
    configs = start(cluster, images)
    started = drain(cluster, "node-a")
    assert started["state"] == "draining" and started["datasets_total"] == 3, started
    assert drain(cluster, "node-a")["state"] == "draining"  # asked again: the same drain
    configs = write_snapshots(cluster, images, 2)  # uploads while it drains
    for cfg in configs.values():
        cluster.start_agent_once(cfg)
    for cfg in configs.values():
        rc, doc, log = cluster.finish_agent(cfg.stem)
        assert rc == 0, log
    during = drain_of(cluster)
    assert_drained(cluster, images, configs, tmp_path)
    after = drain_of(cluster)
    assert after["datasets_moved"] == 3 and after["snapshots_copied"] >= 6 and after["bytes_copied"] > 0, after
    assert during is not None, "status shows the drain"
    # a drained node takes no new dataset; undrained, it does again
    directory = cluster.dataset_dir("office-3", "new")
    images[("office-3", "new", "s0")] = generate_image(str(directory / "s0.img"), IMAGE, seed=7)
    configs["office-3"] = cluster.agent_config("office-3", [{"name": "new", "path": directory, "chunk_size": CHUNK}])
    upload_all(cluster, {"office-3": configs["office-3"]})
    assert {r["node_id"] for r in cluster.catalog("office-3")} == {"node-b"}
    undone = cluster.run("undrain", "--broker", cluster.status_endpoint, "node-a", "--json", *cluster.operator_args())
    assert undone.rc == 0 and json.loads(undone.stdout)["state"] == "undrained", str(undone)
    assert drain_of(cluster) is None


def test_a_kill_9_of_the_broker_mid_drain_is_followed_by_a_drain_that_completes(cluster, tmp_path):
    images: dict = {}
    configs = start(cluster, images)
    drain(cluster, "node-a")
    cluster.wait_for(lambda: (drain_of(cluster) or {}).get("bytes_copied", 0) > 0, 60, "a copy under way")
    assert drain_of(cluster)["state"] == "draining"
    cluster.kill9("broker")
    cluster.restart("broker")
    cluster.wait_for(lambda: cluster.try_status() is not None, 20, "the broker back")
    # the restarted broker resumes from the catalog; then the new node is killed in the middle of a copy
    cluster.wait_for(lambda: (drain_of(cluster) or {}).get("bytes_copied", 0) > 0, 60, "a copy under way again")
    resumed = drain_of(cluster)
    cluster.kill9("node-b")
    cluster.restart("node-b")
    assert_drained(cluster, images, configs, tmp_path)
    assert resumed["state"] == "draining", resumed


def test_only_an_admin_key_drains_and_a_device_cannot(secure_cluster, zctx):
    """Under CURVE: an operator key (read-only) and a device are refused and nothing changes; an unknown
    node and a bad id are refused; an admin key drains."""
    cluster = secure_cluster
    cluster.start(nodes=("node-a", "node-b"), devices=("office-1",))
    refused = cluster.run("drain", "--broker", cluster.status_endpoint, "node-a", *cluster.operator_args())
    assert refused.rc == 1 and "forbidden" in refused.stderr, str(refused)
    device = RawClient(zctx, cluster.frontend, curve=curve(cluster, "office-1"))
    device.hello("office-1")
    device.send("DRAIN", node_id="node-a")
    device.expect_error("unknown_type")
    device.close()
    assert drain_of(cluster) is None

    cluster.enroll("root", "admin")
    cluster.reload_broker()
    admin = cluster.operator_args("root")

    def refusal(node_id: str) -> str:
        result = cluster.run("drain", "--broker", cluster.status_endpoint, node_id, "--timeout-ms", "2000", *admin)
        assert result.rc != 0, str(result)
        return result.stderr

    cluster.wait_for(lambda: "not_found" in refusal("node-x"), 20, "the admin key admitted; node-x unknown")
    assert "bad_id" in refusal("../../etc")
    assert drain(cluster, "node-a", *admin)["state"] == "draining"
    cluster.wait_for(lambda: (drain_of(cluster) or {}).get("state") == "drained", 20, "an empty node drained")
