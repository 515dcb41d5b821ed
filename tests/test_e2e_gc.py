"""End to end: garbage collection on a storage node racing real uploads (issue 12, part 3).

GC runs every 100 ms, and each of its slices is slowed (`fault_gc_slice_ms`) so that a run lasts long
enough for uploads to negotiate, store and commit in the middle of it. The broker keeps `keep_last: 1`
and prunes every 100 ms, so each commit sends the node a PRUNE for the snapshot before it, and the
next uploads share chunks with snapshots just pruned. What must hold: every upload commits, the catalog
ends with the newest snapshot alone, it restores identical, the scrub is clean, and the node's chunk
files (and its `chunks` in status) fall to exactly what its manifest references.
"""

from __future__ import annotations

import random

from roles.sampleimages import generate_image, mutate_chunks
from tests.harness import MiB, assert_restores, assert_scrub_clean, chunk_names

CHUNK = 16 * 1024
IMAGE = 4 * MiB
CHUNKS = IMAGE // CHUNK


def chunk_files(store) -> set:
    return {bytes.fromhex(p.name) for p in (store / "chunks").glob("*/*") if len(p.name) == 64}


def names_of(path) -> set:
    return {n for n in chunk_names(path, CHUNK) if n is not None}


def node_entry(cluster) -> dict:
    (entry,) = [n for n in cluster.status()["storage"] if n["node_id"] == "node-a"]
    return entry


def start_pruning(cluster, slice_ms: int) -> None:
    """A broker keeping the newest snapshot only, pruning every 100 ms; a node collecting every 100 ms."""
    cluster.start_broker(retention={"keep_last": 1}, prune_interval_ms=100)
    cluster.start_storage("node-a", gc_interval_ms=100, fault_gc_slice_ms=slice_ms)


def upload(cluster, cfg, expect: list) -> None:
    rc, doc, log = cluster.run_agent_once(cfg)
    assert rc == 0, log
    assert sorted((t["snapshot"], t["state"]) for t in doc["transfers"]) == [(s, "committed") for s in expect]


def assert_converged(cluster, cfg, kept: dict, tmp_path) -> None:
    """Once quiet, the store holds exactly what the kept snapshots reference, status says so, every
    kept snapshot restores identical and the scrub is clean."""
    store = cluster.node_dir("node-a")
    live = set().union(*(names_of(path) for path, _ in kept.values()))
    cluster.wait_for(lambda: {s["snapshot"] for s in cluster.catalog("office-1")} == set(kept), 30,
                     "the catalog pruned to the newest")
    cluster.wait_for(lambda: not cluster.status()["broker"]["retention"]["pending_manifests"], 30,
                     "the pruned manifests removed")
    runs = node_entry(cluster)["gc_runs"]
    cluster.wait_for(lambda: node_entry(cluster)["gc_runs"] >= runs + 2, 30, "two more GC runs, after the uploads")
    assert chunk_files(store) == live
    entry = node_entry(cluster)
    assert entry["chunks"] == len(live) and entry["gc_freed_bytes"] > 0, entry
    for snapshot, (_, digest) in kept.items():
        assert_restores(cluster, cfg, "ds", snapshot, digest, tmp_path)
    assert assert_scrub_clean(cluster, "node-a")["chunks_checked"] == len(live)


def test_seeded_rounds_of_uploads_sharing_chunks_with_snapshots_just_pruned(cluster, tmp_path):
    """Three seeded rounds of two uploads, each made from a snapshot of any round before (most of them
    pruned by then), while retention prunes and GC runs."""
    rng = random.Random(12)
    start_pruning(cluster, slice_ms=3)
    directory = cluster.dataset_dir("office-1", "ds")
    cfg = cluster.agent_config("office-1", [{"name": "ds", "path": directory, "chunk_size": CHUNK}])
    images = {"s00": (directory / "s00.img", generate_image(str(directory / "s00.img"), IMAGE, seed=12,
                                                              zero_fraction=0.05, text_fraction=0.3))}
    upload(cluster, cfg, ["s00"])
    for round_ in range(1, 4):
        bases = list(images.values())
        made = []
        for k in range(2):
            snapshot = f"s{round_}{k}"
            base, _ = rng.choice(bases)
            path = directory / f"{snapshot}.img"
            digest = mutate_chunks(str(base), str(path), rng.sample(range(CHUNKS), CHUNKS // 4), CHUNK,
                                   seed=rng.randrange(1 << 30))
            images[snapshot] = (path, digest)
            made.append(snapshot)
        upload(cluster, cfg, made)
    newest = max(images)  # written last: the newest mtime (or the same second, and the greatest name)
    assert_converged(cluster, cfg, {newest: images[newest]}, tmp_path)


def test_a_kill_9_of_the_node_in_the_middle_of_a_gc_run_loses_nothing(cluster, tmp_path):
    """The node is killed half-way through the sweep of a pruned snapshot's chunks while an upload
    that shares some of them runs; after the restart the upload commits and the next runs converge."""
    start_pruning(cluster, slice_ms=30)  # a sweep of 256 slices: 8 s to kill it in
    directory = cluster.dataset_dir("office-1", "ds")
    cfg = cluster.agent_config("office-1", [{"name": "ds", "path": directory, "chunk_size": CHUNK}])
    s0 = directory / "s0.img"
    generate_image(str(s0), IMAGE, seed=5, zero_fraction=0.05, text_fraction=0.3)
    upload(cluster, cfg, ["s0"])
    kept = {}
    for k, base in enumerate((s0, directory / "s1.img")):
        path = directory / f"s{k + 1}.img"
        kept[path.stem] = (path, mutate_chunks(str(base), str(path), range(k, CHUNKS, 3), CHUNK, seed=k))
    only_dropped = sorted(names_of(s0) - set().union(*(names_of(p) for p, _ in kept.values())),
                          key=lambda n: n.hex())
    store = cluster.node_dir("node-a")
    first, last = (store / "chunks" / n.hex()[:2] / n.hex() for n in (only_dropped[0], only_dropped[-1]))

    cluster.start_agent_once(cfg)  # s1's commit has s0 pruned, and GC sweeps its chunks while s2 uploads
    # the sweep goes chunks/00 .. chunks/ff: the first of these gone and the last not yet is mid-run
    cluster.wait_for(lambda: not first.exists() and last.exists(), 20, "a sweep half-way through",
                     interval_s=0.005)
    cluster.kill9("node-a")
    assert last.exists()
    cluster.storage_config("node-a", gc_interval_ms=100, fault_gc_slice_ms=3)  # the runs after: quicker
    cluster.restart("node-a")
    rc, doc, log = cluster.finish_agent("agent-office-1")
    assert rc == 0, log
    assert sorted((t["snapshot"], t["state"]) for t in doc["transfers"]) == [("s1", "committed"),
                                                                            ("s2", "committed")]
    assert_converged(cluster, cfg, {"s2": kept["s2"]}, tmp_path)
