"""End to end: `kill -9` of every role, and restarts (issue 4, items 1-4).

A crash is SIGKILL (`Cluster.kill9`): no handler runs, nothing is flushed.
The restarted role runs the same command line on the same config, ports and
data (`Cluster.restart`). What must hold afterwards: every snapshot ends
committed and restores byte for byte; what the cloud already held is not
sent again (at most one credit window is lost to a crash); no damaged or
partial chunk stays on a worker's disk (the scrub is clean); the catalog
keeps everything it had.
"""

from __future__ import annotations

import os
import random
import shutil

import blake3

from roles.sampleimages import generate_image, mutate_chunks
from roles.appliance.chunker import compress
from tests.harness import (MiB, TcpRelay, assert_restores, assert_scrub_clean, chunk_names, partial_files,
                           uploads_of)

TRANSFER_WINDOW = 8 * MiB  # the broker's transfer_window default: most payload bytes one upload has in flight
# Protocol bytes around the payload, per chunk per run: its name in a QUERY slice,
# the CHUNK header and ZMTP framing (about 120 bytes), with room to spare.
OVERHEAD_PER_CHUNK = 256
OVERHEAD_FIXED = 64 * 1024  # HELLO, OFFER, COMMIT, heartbeats, ZMTP greetings


def compressed_size(path, chunk_size: int = MiB, level: int = 1) -> int:
    """Payload bytes a clean upload sends: each distinct non-zero chunk once, compressed as the agent does."""
    seen, total = set(), 0
    with open(path, "rb") as f:
        while raw := f.read(chunk_size):
            if raw.count(0) == len(raw):
                continue
            name = blake3.blake3(raw).digest()
            if name in seen:
                continue
            seen.add(name)
            total += len(compress(raw, level)[1])
    return total


def bytes_done(cluster, device_id: str) -> int:
    status = cluster.try_status()
    if not status:
        return 0
    return max((t["bytes_done"] for t in status["transfers"] if t["device_id"] == device_id
                and t.get("kind", "upload") == "upload" and t["state"] == "active"), default=0)


# --- 1. the agent ------------------------------------------------------------------------------------


def test_agent_killed_mid_transfer_resumes_and_sends_at_most_one_window_again(cluster, tmp_path):
    """kill -9 of the agent half-way through 512 MiB; the restarted agent completes it, the image
    restores identical, and everything the agent put on the wire over both runs (counted by a
    relay between it and the broker) is at most the image's compressed size plus one window."""
    cluster.start()
    directory = cluster.dataset_dir("office-1", "fileserver")
    image = directory / "20240101T0000.img"
    size = 512 * MiB
    digest = generate_image(str(image), size, seed=41)
    compressed = compressed_size(image)
    names = chunk_names(image)
    relay = TcpRelay(cluster.frontend)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}], brokers=[relay.endpoint])

    cluster.start_agent_once(cfg)
    cluster.wait_for(lambda: relay.up >= compressed // 2, 120, "half the image on the wire",
                     interval_s=0.01)
    cluster.kill9("agent-office-1")
    first_run_up = relay.up
    assert first_run_up < compressed, "the first run finished before it was killed"
    journal = cluster.root / "var" / "office-1" / "journal.sqlite3"
    assert journal.exists(), "the agent keeps no journal"

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    (t,) = doc["transfers"]
    assert (t["dataset"], t["snapshot"], t["state"]) == ("fileserver", "20240101T0000", "committed"), t
    total_up = relay.up
    print(f"compressed image {compressed} B; on the wire: {first_run_up} B before the kill, "
          f"{total_up - first_run_up} B after, total {total_up} B (bound {compressed + TRANSFER_WINDOW} B + overhead)")
    overhead = OVERHEAD_FIXED + 2 * OVERHEAD_PER_CHUNK * len(names)
    assert total_up <= compressed + TRANSFER_WINDOW + overhead, (
        f"the agent put {total_up} bytes on the wire over both runs ({first_run_up} before the kill, "
        f"{total_up - first_run_up} after); compressed image {compressed}, window {TRANSFER_WINDOW}")
    # The broker's own count of payload bytes it received for this snapshot (every attempt) agrees.
    payload = sum(u["bytes_sent"] for u in uploads_of(cluster.status(), "office-1", "fileserver", "20240101T0000"))
    assert payload <= compressed + TRANSFER_WINDOW, f"{payload} payload bytes for {compressed} compressed"
    # The second run really resumed: it sent what the first had not, not the whole image again.
    assert t["bytes_sent"] <= compressed - first_run_up + TRANSFER_WINDOW + overhead, t
    (entry,) = cluster.catalog("office-1")
    assert entry["blake3"] == digest and entry["size"] == size
    relay.close()
    assert_restores(cluster, cfg, "fileserver", "20240101T0000", digest, tmp_path)


# --- 2. a storage worker ----------------------------------------------------------------------------------


def test_storage_killed_mid_transfer_restarts_and_the_transfer_completes_with_a_clean_scrub(cluster, tmp_path):
    """kill -9 of the worker while chunks are being written (its disk is slowed so writes are under
    way): temporary files are left; the restarted worker removes them, the agent's upload resumes
    and commits, the image restores identical, and the scrub finds no damaged or partial chunk."""
    cluster.start(fault_write_rate="40MB")
    directory = cluster.dataset_dir("office-1", "fileserver")
    size = 96 * MiB
    digest = generate_image(str(directory / "s1.img"), size, seed=42, zero_fraction=0.1, text_fraction=0.2)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    store = cluster.node_dir("node-a")

    cluster.start_agent_once(cfg)
    cluster.wait_for(lambda: bytes_done(cluster, "office-1") >= size // 3, 60, "a third of the image stored")
    cluster.wait_for(lambda: partial_files(store), 10, "a chunk being written", interval_s=0.005)
    cluster.kill9("node-a")
    left_by_crash = partial_files(store)
    assert left_by_crash, "the crash left no temporary file: nothing was being written"
    cluster.wait_for(lambda: any(t["state"] == "parked" and "node-a" in t["reason"]
                                 for t in uploads_of(cluster.status(), "office-1", "fileserver", "s1")), 20,
                     "the upload parked while its node is gone")
    cluster.restart("node-a")
    # the crash's own files: the resumed upload may already be writing new ones
    assert not [p for p in left_by_crash if p.exists()], "the crash's temporary files survived the restart"

    rc, doc, log = cluster.finish_agent("agent-office-1")

    assert rc == 0, log
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s1", "committed")]
    (entry,) = cluster.catalog("office-1")
    assert entry["blake3"] == digest and entry["node_id"] == "node-a"
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
    report = assert_scrub_clean(cluster, "node-a")
    assert report["chunks_checked"] == len({n for n in chunk_names(directory / "s1.img") if n})
    assert report["manifests_checked"] == 1
    assert not partial_files(store)


# --- 3. the broker ----------------------------------------------------------------------------------------


def catalog_keys(entries: list[dict]) -> set:
    return {(s["device_id"], s["dataset"], s["snapshot"], s["blake3"]) for s in entries}


def active_upload(cluster, device_id: str, dataset: str, at_least: int) -> bool:
    status = cluster.try_status() or {"transfers": []}
    return any(t["state"] == "active" and t["bytes_done"] >= at_least and t["dataset"] == dataset
               for t in uploads_of(status, device_id, dataset, "s1"))


def test_broker_killed_mid_transfer_restarts_on_its_ports_and_everything_completes(secure_cluster, tmp_path):
    """kill -9 of the broker (CURVE on, as shipped) while two devices upload to one worker; restarted
    on the same ports, agents (one --once, one replicating) and the worker reconnect by themselves,
    every transfer completes without starting over, and `list` shows everything it showed before
    the crash plus the new snapshots."""
    cluster = secure_cluster
    cluster.start(devices=("office-1", "office-2"), fault_write_rate="15MB")
    dirs = {(dev, ds): cluster.dataset_dir(dev, ds) for dev, ds in
            (("office-1", "fileserver"), ("office-1", "sql"), ("office-2", "vm"))}
    digests = {("office-1", "fileserver", "s1"): generate_image(str(dirs[("office-1", "fileserver")] / "s1.img"),
                                                                8 * MiB, seed=50)}
    relays = {device: TcpRelay(cluster.frontend) for device in ("office-1", "office-2")}
    cfg1 = cluster.agent_config("office-1", [{"name": ds, "path": dirs[("office-1", ds)]}
                                             for ds in ("fileserver", "sql")], brokers=[relays["office-1"].endpoint])
    cfg2 = cluster.agent_config("office-2", [{"name": "vm", "path": dirs[("office-2", "vm")]}],
                                brokers=[relays["office-2"].endpoint], scan_interval_ms=300)
    rc, _, stderr = cluster.run_agent_once(cfg1)
    assert rc == 0, stderr
    before = cluster.catalog()
    assert catalog_keys(before) == {(*k, v) for k, v in digests.items()}

    # New snapshots: an incremental and a new dataset for office-1 (--once), a new dataset for
    # office-2 (a replicating agent that runs on through the crash).
    staging = tmp_path / "s2.img"
    digests[("office-1", "fileserver", "s2")] = mutate_chunks(str(dirs[("office-1", "fileserver")] / "s1.img"),
                                                              str(staging), [1, 5], seed=3)
    shutil.move(staging, dirs[("office-1", "fileserver")] / "s2.img")
    for (device, dataset), seed in ((("office-1", "sql"), 51), (("office-2", "vm"), 52)):
        digests[(device, dataset, "s1")] = generate_image(str(dirs[(device, dataset)] / "s1.img"), 64 * MiB,
                                                          seed=seed, zero_fraction=0.1)
    relays["office-1"].up = 0  # count from here: the new snapshots only
    cluster.start_agent_once(cfg1)
    cluster.start_agent(cfg2)
    cluster.wait_for(lambda: active_upload(cluster, "office-1", "sql", 4 * MiB)
                     and active_upload(cluster, "office-2", "vm", 4 * MiB), 60, "both devices' uploads under way")
    cluster.kill9("broker")
    cluster.restart("broker")
    listed = {(e["device_id"], e["dataset"]) for e in cluster.catalog()}
    assert not listed & {("office-1", "sql"), ("office-2", "vm")}, "the crash did not interrupt the uploads"

    # Recovery takes a re-registration and one re-offer (parked uploads are offered again every 2 s).
    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)
    assert rc == 0, log
    assert {(t["dataset"], t["snapshot"]): t["state"] for t in doc["transfers"]} == \
        {("fileserver", "s2"): "committed", ("sql", "s1"): "committed"}
    cluster.wait_for(lambda: ("office-2", "vm", "s1") in {(s["device_id"], s["dataset"], s["snapshot"])
                                                          for s in cluster.catalog()}, 60,
                     "office-2's replicating agent to commit after the crash")
    after = cluster.catalog()
    assert catalog_keys(before) <= catalog_keys(after), "the restarted broker lost catalog entries"
    assert catalog_keys(after) == {(*k, v) for k, v in digests.items()}
    status = cluster.status()
    assert [(n["node_id"], n["alive"]) for n in status["storage"]] == [("node-a", True)]
    assert {a["device_id"] for a in status["agents"] if a["connected"]} >= {"office-2"}
    # Resumed, not started over: what each agent put on the wire over the attempts before and after
    # the crash is at most the new data, compressed, plus one window.
    sql = next(t for t in doc["transfers"] if t["dataset"] == "sql")
    assert sql["bytes_sent"] <= compressed_size(dirs[("office-1", "sql")] / "s1.img") + TRANSFER_WINDOW, sql
    vm_image = dirs[("office-2", "vm")] / "s1.img"
    vm_bound = compressed_size(vm_image) + TRANSFER_WINDOW + OVERHEAD_FIXED + 4 * OVERHEAD_PER_CHUNK * 64
    assert relays["office-2"].up <= vm_bound, f"office-2 sent {relays['office-2'].up} bytes, bound {vm_bound}"
    for relay in relays.values():
        relay.close()
    cfg1 = cluster.agent_config("office-1", [{"name": ds, "path": dirs[("office-1", ds)]}
                                             for ds in ("fileserver", "sql")])
    cfg2 = cluster.agent_config("office-2", [{"name": "vm", "path": dirs[("office-2", "vm")]}],
                                config_name="office-2-restore")
    for (device, dataset, snapshot), digest in digests.items():
        assert_restores(cluster, cfg1 if device == "office-1" else cfg2, dataset, snapshot, digest, tmp_path)
    assert_scrub_clean(cluster, "node-a")


def test_after_a_broker_restart_an_interrupted_upload_resumes_on_the_worker_that_holds_its_chunks(cluster, tmp_path):
    """Two workers; the broker is killed while the first snapshot of a dataset uploads to one of
    them. The restarted broker (whose catalog has no entry for that dataset yet) must send the
    resumed upload to the worker that holds its chunks: only what is missing travels again."""
    cluster.start(nodes=("node-a", "node-b"), fault_write_rate="15MB")
    directory = cluster.dataset_dir("office-1", "sql")
    image = directory / "s1.img"
    digest = generate_image(str(image), 64 * MiB, seed=53, zero_fraction=0.1, text_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "sql", "path": directory}])
    cluster.start_agent_once(cfg)
    (first,) = cluster.wait_for(lambda: [t for t in uploads_of(cluster.try_status() or {"transfers": []},
                                                               "office-1", "sql", "s1")
                                         if t["state"] == "active" and t["bytes_done"] >= 16 * MiB], 60,
                                "a quarter of the upload stored")
    cluster.kill9("broker")
    cluster.restart("broker")

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)

    assert rc == 0, log
    (t,) = doc["transfers"]
    (entry,) = cluster.catalog()
    assert entry["node_id"] == first["node_id"], (
        f"the upload began on {first['node_id']} ({first['bytes_done']} bytes stored there) and was "
        f"committed on {entry['node_id']} after the broker restart")
    assert t["bytes_sent"] <= compressed_size(image) + TRANSFER_WINDOW, t
    assert entry["blake3"] == digest
    assert_restores(cluster, cfg, "sql", "s1", digest, tmp_path)


# --- 4. chaos ------------------------------------------------------------------------------------------------

CHAOS_EVENTS = 10
CHAOS_SEED = int(os.environ.get("SPEEDSYNC_CHAOS_SEED", "20240404"))


def stored_bytes(cluster, nodes) -> int:
    """Bytes of whole chunk files on the workers' disks: grows as replication progresses."""
    total = 0
    for node in nodes:
        for dirpath, _dirs, files in os.walk(cluster.node_dir(node) / "chunks"):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if not f.endswith(".partial"))
    return total


def test_ten_seeded_kill_and_restart_events_across_all_roles_lose_nothing(secure_cluster, tmp_path):
    """Ten kill -9 + restart events, each of a role drawn by a seeded RNG (every role at least once),
    each once the workers have stored a few more MiB (so the crashes land mid-replication), while two
    replicating agents upload five datasets and new snapshots appear. Every snapshot ends committed
    once in the catalog, restores identical, and the scrub of each worker is clean.
    Replay a run with SPEEDSYNC_CHAOS_SEED=<the seed printed>."""
    seed = CHAOS_SEED
    print(f"chaos seed {seed} (SPEEDSYNC_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    cluster = secure_cluster
    nodes = ("node-a", "node-b")
    layout = {"office-1": ("fileserver", "sql", "mail"), "office-2": ("vm", "web")}
    # Short watchdogs (broker stall_timeout_ms, agent reply_timeout_ms) so that a lost message
    # costs seconds, not the default minutes.
    cluster.enroll("office-1", "device")
    cluster.enroll("office-2", "device")
    for node in nodes:
        cluster.enroll(node, "node")
    cluster.start_broker(stall_timeout_ms=5000)
    for node in nodes:
        cluster.start_storage(node, fault_write_rate="20MB")
    expected: dict[tuple, str] = {}
    configs = {}
    for d, (device, datasets) in enumerate(layout.items()):
        for i, dataset in enumerate(datasets):
            directory = cluster.dataset_dir(device, dataset)
            expected[(device, dataset, "s1")] = generate_image(str(directory / "s1.img"), 24 * MiB,
                                                               seed=seed % 10000 + 10 * d + i, zero_fraction=0.1,
                                                               text_fraction=0.3)
        configs[device] = cluster.agent_config(device, [{"name": ds, "path": cluster.dataset_dir(device, ds)}
                                                        for ds in datasets],
                                               scan_interval_ms=300, reply_timeout_ms=5000)
        cluster.start_agent(configs[device])

    roles = ["broker", *nodes, *(f"agent-{device}" for device in layout)]
    schedule = rng.sample(roles, len(roles)) + [rng.choice(roles) for _ in range(CHAOS_EVENTS - len(roles))]
    rng.shuffle(schedule)
    new_snapshot_at = {3, 6}  # after these events, some datasets get an incremental snapshot
    print(f"chaos schedule: {schedule}")
    mark = stored_bytes(cluster, nodes)
    for number, role in enumerate(schedule, start=1):
        step = rng.randint(1, 6) * MiB
        cluster.wait_for(lambda: stored_bytes(cluster, nodes) >= mark + step, 60,
                         f"{step // MiB} MiB more stored before event {number} (seed {seed}, {role} next)")
        cluster.kill9(role)
        cluster.restart(role)
        mark = stored_bytes(cluster, nodes)
        if number in new_snapshot_at:
            for device, datasets in layout.items():
                dataset = rng.choice(datasets)
                directory = cluster.dataset_dir(device, dataset)
                name = f"s{number}"
                staging = tmp_path / f"{device}-{dataset}-{name}.img"
                expected[(device, dataset, name)] = mutate_chunks(
                    str(directory / "s1.img"), str(staging), sorted(rng.sample(range(24), 4)), seed=number)
                shutil.move(staging, directory / f"{name}.img")

    def catalog_complete():
        listed = cluster.try_catalog()
        return listed is not None and {(s["device_id"], s["dataset"], s["snapshot"]) for s in listed} \
            == set(expected) and listed

    listed = cluster.wait_for(catalog_complete, 90, f"every snapshot committed (seed {seed})")
    assert len(listed) == len(expected)
    assert {(s["device_id"], s["dataset"], s["snapshot"]): s["blake3"] for s in listed} == expected, f"seed {seed}"
    for (device, dataset, snapshot), digest in sorted(expected.items()):
        assert_restores(cluster, configs[device], dataset, snapshot, digest, tmp_path)
    for node in nodes:
        assert_scrub_clean(cluster, node)
