"""End to end: replication, incrementals, de-duplication and placement.

Each test starts the real broker and storage workers (tests/harness.py),
runs `agent --once --json`, and checks the outcome through `status`, `list`
and `restore`: the bytes restored are the bytes written.
"""

from __future__ import annotations

import shutil

from roles.sampleimages import file_blake3, generate_image, half_zero_image, mutate_chunks
from tests.harness import MiB, chunk_names, distinct_nonzero_chunks

TRANSFER_KEYS = {"dataset", "snapshot", "state", "chunks_total", "chunks_sent", "bytes_image", "bytes_read",
                 "bytes_sent", "seconds"}


def by_key(doc: dict) -> dict:
    """The agent's JSON summary as {(dataset, snapshot): transfer}."""
    return {(t["dataset"], t["snapshot"]): t for t in doc["transfers"]}


def upload_in_status(cluster, device_id: str, dataset: str, snapshot: str) -> dict:
    found = [t for t in cluster.transfers(device_id) if (t["dataset"], t["snapshot"]) == (dataset, snapshot)
             and t.get("kind", "upload") == "upload" and t["state"] == "committed"]
    assert len(found) == 1, f"expected one committed upload of {dataset}/{snapshot}, status has {found}"
    return found[0]


def assert_restores(cluster, agent_cfg, dataset: str, snapshot: str, expected_blake3: str, tmp_path) -> None:
    out = tmp_path / "restored" / f"{dataset}-{snapshot}.img"
    out.parent.mkdir(exist_ok=True)
    result = cluster.restore(agent_cfg, dataset, snapshot, out)
    assert result.rc == 0, str(result)
    assert file_blake3(str(out)) == expected_blake3, f"restored {dataset}/{snapshot} differs from the original"
    out.unlink()


def test_full_replication_of_two_datasets_lists_and_restores_identical(cluster, tmp_path):
    cluster.start()
    size = 256 * MiB
    images = {}
    for seed, dataset in enumerate(("fileserver", "sql"), start=1):
        directory = cluster.dataset_dir("office-1", dataset)
        images[dataset] = generate_image(str(directory / "20240101T0000.img"), size, seed=seed)
    cfg = cluster.agent_config("office-1", [{"name": d, "path": cluster.dataset_dir("office-1", d)} for d in images])

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    transfers = by_key(doc)
    assert set(transfers) == {(d, "20240101T0000") for d in images}
    for (dataset, _), t in transfers.items():
        assert TRANSFER_KEYS <= set(t), t
        assert t["state"] == "committed"
        assert t["chunks_total"] == size // MiB
        assert t["bytes_image"] == t["bytes_read"] == size
        path = cluster.dataset_dir("office-1", dataset) / "20240101T0000.img"
        assert t["chunks_sent"] == distinct_nonzero_chunks(path)
        # a realistic image is 30% zeros and 40% text: far fewer bytes travel than it holds
        assert 0 < t["bytes_sent"] < size * 0.75
    listed = {(s["dataset"], s["snapshot"]): s for s in cluster.catalog()}
    assert set(listed) == set(transfers)
    for (dataset, snapshot), entry in listed.items():
        assert entry["device_id"] == "office-1"
        assert entry["size"] == size
        assert entry["blake3"] == images[dataset]
        assert entry["node_id"] == "node-a"
        assert entry["committed_at"]
    for dataset, digest in images.items():
        assert_restores(cluster, cfg, dataset, "20240101T0000", digest, tmp_path)


def _replicate_one(cluster, device_id: str, size: int, seed: int):
    directory = cluster.dataset_dir(device_id, "fileserver")
    digest = generate_image(str(directory / "s1.img"), size, seed=seed, zero_fraction=0.0, text_fraction=0.0)
    cfg = cluster.agent_config(device_id, [{"name": "fileserver", "path": directory}])
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    return cfg, digest


def test_status_and_list_report_the_contract_fields(cluster):
    cluster.start()
    _replicate_one(cluster, "office-1", 16 * MiB, seed=7)

    status = cluster.status()
    assert {"agents", "storage", "transfers", "broker"} <= set(status)
    assert [{"device_id", "connected"} <= set(a) and a["device_id"] for a in status["agents"]] == ["office-1"]
    (node,) = status["storage"]
    assert {"node_id", "alive", "free_bytes", "used_bytes"} <= set(node)
    assert node["node_id"] == "node-a" and node["alive"] and node["free_bytes"] > 0
    assert {"transfer_id", "device_id", "dataset", "snapshot", "node_id", "state", "bytes_total", "bytes_done",
            "bytes_sent"} <= set(status["transfers"][0])
    assert {"rss_bytes", "dropped_messages", "errors_by_code"} <= set(status["broker"])
    assert status["broker"]["rss_bytes"] > 0
    upload = upload_in_status(cluster, "office-1", "fileserver", "s1")
    assert upload["bytes_total"] == upload["bytes_done"] == 16 * MiB
    assert upload["node_id"] == "node-a"
    (entry,) = cluster.catalog()
    assert {"device_id", "dataset", "snapshot", "node_id", "size", "blake3", "committed_at"} <= set(entry)


def test_a_clean_replication_and_restore_count_no_errors(cluster, tmp_path):
    """Peers that did nothing wrong are never answered with ERROR, so errors_by_code stays empty."""
    cluster.start()
    cfg, digest = _replicate_one(cluster, "office-1", 16 * MiB, seed=7)
    assert cluster.status()["broker"]["errors_by_code"] == {}
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
    assert cluster.status()["broker"]["errors_by_code"] == {}, "a clean restore was answered with ERRORs"


def test_nothing_pending_and_restores_of_what_a_device_does_not_hold(cluster, tmp_path):
    cluster.start()
    cfg, _ = _replicate_one(cluster, "office-1", 4 * MiB, seed=8)
    other = cluster.agent_config("office-2", [{"name": "fileserver", "path": cluster.dataset_dir("office-2", "fs")}])

    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert (rc, doc) == (0, {"transfers": []}), stderr
    for config, snapshot in ((cfg, "s9"), (other, "s1")):  # unknown snapshot; another device's snapshot
        out = tmp_path / f"{config.stem}-{snapshot}.img"
        result = cluster.restore(config, "fileserver", snapshot, out)
        assert result.rc == 1 and "not_found" in result.stderr, str(result)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), "a refused restore left a file"


def test_incremental_snapshot_sends_exactly_the_changed_chunks(cluster, tmp_path):
    cluster.start()
    directory = cluster.dataset_dir("office-1", "fileserver")
    base = directory / "s1.img"
    generate_image(str(base), 64 * MiB, seed=11)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    assert by_key(doc)[("fileserver", "s1")]["chunks_sent"] == distinct_nonzero_chunks(base)

    changed = [0, 3, 9, 17, 30, 41, 52, 63]
    staging = tmp_path / "s2.img"
    digest = mutate_chunks(str(base), str(staging), changed, chunk_size=MiB, seed=5)
    shutil.move(staging, directory / "s2.img")  # snapshots appear by rename
    assert [i for i, (a, b) in enumerate(zip(chunk_names(base), chunk_names(directory / "s2.img"))) if a != b] \
        == changed

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    transfers = by_key(doc)
    assert set(transfers) == {("fileserver", "s2")}, "a committed snapshot was offered again"
    t = transfers[("fileserver", "s2")]
    assert t["state"] == "committed"
    assert t["chunks_sent"] == len(changed)
    assert 0 < t["bytes_sent"] <= len(changed) * MiB
    assert t["bytes_sent"] == upload_in_status(cluster, "office-1", "fileserver", "s2")["bytes_sent"]
    listed = {s["snapshot"]: s for s in cluster.catalog("office-1")}
    assert listed["s2"]["blake3"] == digest
    assert_restores(cluster, cfg, "fileserver", "s2", digest, tmp_path)


def test_zero_chunks_travel_as_nothing(cluster, tmp_path):
    cluster.start()
    directory = cluster.dataset_dir("office-2", "vm")
    digest = half_zero_image(str(directory / "s1.img"), 32 * MiB + 12345, seed=3)
    names = chunk_names(directory / "s1.img")
    nonzero = sum(1 for n in names if n is not None)
    assert 0 < nonzero < len(names)
    cfg = cluster.agent_config("office-2", [{"name": "vm", "path": directory}])

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    t = by_key(doc)[("vm", "s1")]
    assert t["chunks_total"] == len(names)
    assert t["chunks_sent"] == nonzero
    # random chunks do not compress: what travels is the nonzero chunks' bytes, no more
    assert t["bytes_sent"] <= sum(min(MiB, 32 * MiB + 12345 - i * MiB) for i, n in enumerate(names) if n)
    assert t["bytes_sent"] == upload_in_status(cluster, "office-2", "vm", "s1")["bytes_sent"]
    assert_restores(cluster, cfg, "vm", "s1", digest, tmp_path)


def _two_datasets_same_image(cluster, device_id: str, size: int):
    first, second = cluster.dataset_dir(device_id, "a"), cluster.dataset_dir(device_id, "b")
    digest = generate_image(str(first / "s1.img"), size, seed=21)
    shutil.copyfile(first / "s1.img", second / "s1.img.part")
    (second / "s1.img.part").rename(second / "s1.img")
    return first, second, digest


def test_identical_images_in_two_datasets_are_sent_once(cluster, tmp_path):
    cluster.start()
    first, second, digest = _two_datasets_same_image(cluster, "office-3", 32 * MiB)
    cfg = cluster.agent_config("office-3", [{"name": "a", "path": first, "priority": 1},
                                            {"name": "b", "path": second, "priority": 2}],
                               max_active_transfers=1)

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    transfers = by_key(doc)
    unique = distinct_nonzero_chunks(first / "s1.img")
    assert transfers[("a", "s1")]["chunks_sent"] == unique
    assert transfers[("b", "s1")]["chunks_sent"] == 0
    assert transfers[("b", "s1")]["bytes_sent"] == 0
    assert sum(t["chunks_sent"] for t in transfers.values()) == unique
    listed = {s["dataset"]: s["blake3"] for s in cluster.catalog("office-3")}
    assert listed == {"a": digest, "b": digest}
    assert_restores(cluster, cfg, "b", "s1", digest, tmp_path)


def test_identical_images_uploaded_concurrently_are_sent_once(cluster, tmp_path):
    """With two uploads side by side, storage tells the second it depends on the first's chunks."""
    cluster.start()
    first, second, digest = _two_datasets_same_image(cluster, "office-4", 32 * MiB)
    cfg = cluster.agent_config("office-4", [{"name": "a", "path": first}, {"name": "b", "path": second}],
                               max_active_transfers=2)

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    assert {s["dataset"]: s["blake3"] for s in cluster.catalog("office-4")} == {"a": digest, "b": digest}
    sent = sum(t["chunks_sent"] for t in doc["transfers"])
    assert sent == distinct_nonzero_chunks(first / "s1.img"), f"sent {sent} chunks: {doc}"


def test_datasets_spread_over_workers_and_stay_where_they_are(cluster, tmp_path):
    cluster.start(nodes=("node-a", "node-b"))
    datasets = [f"ds{i}" for i in range(4)]
    for i, dataset in enumerate(datasets):
        generate_image(str(cluster.dataset_dir("office-5", dataset) / "s1.img"), 8 * MiB, seed=100 + i)
    cfg = cluster.agent_config("office-5", [{"name": d, "path": cluster.dataset_dir("office-5", d)}
                                            for d in datasets])
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    first_nodes = {s["dataset"]: s["node_id"] for s in cluster.catalog("office-5")}
    assert set(first_nodes) == set(datasets)
    assert set(first_nodes.values()) == {"node-a", "node-b"}, f"all datasets on one worker: {first_nodes}"

    digests = {}
    for i, dataset in enumerate(datasets):
        directory = cluster.dataset_dir("office-5", dataset)
        staging = tmp_path / f"{dataset}-s2.img"
        digests[dataset] = mutate_chunks(str(directory / "s1.img"), str(staging), [1, 6], seed=i)
        shutil.move(staging, directory / "s2.img")
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    assert all(t["chunks_sent"] == 2 for t in doc["transfers"]), doc

    placed = {}
    for s in cluster.catalog("office-5"):
        placed.setdefault(s["dataset"], {})[s["snapshot"]] = s["node_id"]
    for dataset in datasets:
        assert placed[dataset] == {"s1": first_nodes[dataset], "s2": first_nodes[dataset]}, placed
    for node in ("node-a", "node-b"):
        dataset = next(d for d in datasets if first_nodes[d] == node)
        assert_restores(cluster, cfg, dataset, "s2", digests[dataset], tmp_path)


def test_restore_of_a_damaged_chunk_fails_and_leaves_no_file(cluster, tmp_path):
    """Bit rot on the worker's disk: restore exits non-zero and writes no FILE."""
    cluster.start()
    cfg, _ = _replicate_one(cluster, "office-1", 8 * MiB, seed=12)
    chunk_files = [p for p in (tmp_path / "var" / "node-a").rglob("*") if p.is_file() and p.stat().st_size > MiB]
    assert chunk_files, "no chunk file on the worker's disk"
    victim = max(chunk_files, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    out = tmp_path / "restored.img"

    result = cluster.restore(cfg, "fileserver", "s1", out)

    assert result.rc != 0, str(result)
    assert not out.exists() and not list(tmp_path.glob(".restored.img*")), "a damaged restore left a file"
