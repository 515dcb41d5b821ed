"""End to end: disks that fail or fill, links that drop, bytes that rot (issue 4, items 5 and 7).

Faults are components chosen by config, as a user would switch them on:
a storage worker's `fault_fail_at_write` (the Nth write fails with EIO, once)
and `fault_disk_capacity` (writes past it fail with ENOSPC; restarting the
worker without it gives the space back), an agent's `fault_link_drop_rate`.
Rot is a byte flipped in a chunk file after commit. What must hold: the
upload is parked with its reason in status, never failed for good; no chunk
is acknowledged before it is whole on disk; everything completes once the
fault is gone; the scrub names what rotted and a restore of it fails cleanly.
"""

from __future__ import annotations

import shutil

import blake3

from roles.sampleimages import generate_image, mutate_chunks
from tests.harness import (MiB, RawClient, assert_restores, assert_scrub_clean, chunk_names, distinct_nonzero_chunks,
                           partial_files, uploads_of)

ENOSPC_REASON = "no_space: store failed: No space left on device"
CHUNK_HEADER = 8  # roles/storenode/chunkstore.py: magic, format, codec, raw length


def chunk_file(cluster, node_id: str, name: bytes):
    hexname = name.hex()
    return cluster.node_dir(node_id) / "chunks" / hexname[:2] / hexname


def parked_with(cluster, device_id: str, dataset: str, snapshot: str, text: str) -> list[dict]:
    status = cluster.try_status() or {"transfers": []}
    return [t for t in uploads_of(status, device_id, dataset, snapshot)
            if t["state"] == "parked" and text in t.get("reason", "")]


# --- 5. a disk that fills up, or fails ---------------------------------------------------------------


def test_a_full_disk_parks_the_upload_with_its_reason_and_it_completes_once_space_is_back(cluster, tmp_path):
    cluster.start(fault_disk_capacity="12MB")
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), 32 * MiB, seed=70, zero_fraction=0.0, text_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    agent = cluster.start_agent_once(cfg)

    (parked,) = cluster.wait_for(lambda: parked_with(cluster, "office-1", "fileserver", "s1", "No space")[:1], 60,
                                 "the upload parked for a full disk")
    assert parked["reason"] == ENOSPC_REASON, parked
    assert parked["node_id"] == "node-a"
    # Parked, not failed: the agent keeps offering it (it does not give up, it does not exit).
    cluster.wait_for(lambda: len(uploads_of(cluster.status(), "office-1", "fileserver", "s1")) >= 2, 30,
                     "the agent to offer the parked upload again")
    assert agent.poll() is None, "the agent gave up on a full disk"
    attempts = uploads_of(cluster.status(), "office-1", "fileserver", "s1")
    # each attempt ran into the full disk: parked, or parked and then offered again ("resumed")
    assert all(a["reason"] == ENOSPC_REASON for a in attempts if a["state"] in ("parked", "resumed")), attempts
    assert not [a for a in attempts if a["state"] in ("failed", "committed")], attempts
    assert not cluster.catalog(), "a snapshot was committed on a full disk"
    # Whatever reached the disk is whole: no damaged chunk, no temporary file, and no more than fits.
    stored_before = assert_scrub_clean(cluster, "node-a")["chunks_checked"]
    assert 0 < stored_before <= 12 * 10**6 // (MiB + CHUNK_HEADER)
    assert not partial_files(cluster.node_dir("node-a"))

    cluster.terminate("node-a")
    cluster.start_storage("node-a")  # the same worker and data, without the capacity limit: space is back

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)
    assert rc == 0, log
    (t,) = doc["transfers"]
    assert t["state"] == "committed", t
    assert t["chunks_sent"] >= 32, t
    (entry,) = cluster.catalog()
    assert entry["blake3"] == digest
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
    assert assert_scrub_clean(cluster, "node-a")["chunks_checked"] == 32


def test_a_disk_error_mid_transfer_parks_the_upload_and_it_completes_by_itself(cluster, tmp_path):
    cluster.start(fault_fail_at_write=12)  # the 12th write fails with EIO, once
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), 32 * MiB, seed=71, zero_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    (t,) = doc["transfers"]
    assert t["state"] == "committed", t
    attempts = uploads_of(cluster.status(), "office-1", "fileserver", "s1")
    reasons = [a.get("reason", "") for a in attempts]
    assert any(r.startswith("storage_error: store failed: ") and "disk error" in r for r in reasons), attempts
    assert [a["state"] for a in attempts].count("committed") == 1, attempts
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
    report = assert_scrub_clean(cluster, "node-a")
    assert report["chunks_checked"] == distinct_nonzero_chunks(directory / "s1.img")
    assert not partial_files(cluster.node_dir("node-a"))


def test_no_chunk_is_acknowledged_before_it_is_whole_on_disk_when_the_disk_fills(cluster, zctx):
    """A raw uploader checks the worker's disk at the moment each STORED arrives: the chunk file
    is there under its name, whole and verifying. Chunks refused for a full disk leave no file."""
    capacity = 6 * 10**6  # five 1 MiB chunk files fit, the sixth does not
    cluster.start(fault_disk_capacity=str(capacity))
    chunks = [blake3.blake3(f"speedsync/ack/{i}".encode()).digest(length=MiB) for i in range(12)]
    names = [blake3.blake3(c).digest() for c in chunks]
    by_name = dict(zip(names, chunks))
    client = RawClient(zctx, cluster.frontend)
    client.hello("office-9")
    client.send("OFFER", req=1, dataset="ack", snapshot="s1", image_size=len(chunks) * MiB, chunk_size=MiB,
                chunk_count=len(chunks))
    tid = client.expect("ACCEPT")["transfer_id"]
    client.send("QUERY", transfer_id=tid, start=0, hashes=names)
    unsent = list(names)
    credit, acked, refused, parked_error = 0, [], [], None
    while parked_error is None:
        msg = client.receive(20)
        assert msg is not None, f"no answer; acked {len(acked)}, refused {len(refused)}"
        if msg.t == "MISSING":
            assert msg["missing"] == list(range(len(chunks)))
        elif msg.t == "CREDIT":
            credit += msg["bytes"]
        elif msg.t == "STORED":
            path = chunk_file(cluster, "node-a", msg["hash"])
            blob = path.read_bytes() if path.exists() else b""  # looked at the instant the ack arrived
            assert blob[CHUNK_HEADER:] == by_name[msg["hash"]], f"STORED {msg['hash'].hex()[:16]} is not whole on disk"
            acked.append(msg["hash"])
        elif msg.t == "ERROR":
            assert msg["code"] == "no_space", dict(msg.fields)  # a full disk: parked until room appears
            if msg.get("hash") is not None:
                refused.append(msg["hash"])
            if msg.get("ref") == "OFFER" or "No space" in msg["reason"]:
                parked_error = msg
        while unsent and credit >= MiB:
            name = unsent.pop(0)
            client.send("CHUNK", payload=[by_name[name]], transfer_id=tid, hash=name, raw_len=MiB, codec="raw")
            credit -= MiB
    client.close()
    cluster.wait_for(lambda: not partial_files(cluster.node_dir("node-a")), 10, "writes under way to end")

    assert "No space left on device" in parked_error["reason"]
    assert refused, "no chunk was refused"
    on_disk = {p.name for p in (cluster.node_dir("node-a") / "chunks").rglob("*") if p.is_file()}
    assert {n.hex() for n in acked} <= on_disk
    assert not {n.hex() for n in refused} & on_disk, "a refused chunk left a file under its name"
    assert len(on_disk) <= capacity // (MiB + CHUNK_HEADER)
    assert not partial_files(cluster.node_dir("node-a"))
    assert any(t["state"] == "parked" and t["reason"] == ENOSPC_REASON
               for t in uploads_of(cluster.status(), "office-9", "ack", "s1"))
    assert_scrub_clean(cluster, "node-a")


# --- a link that drops and delays ------------------------------------------------------------------------


def test_a_lossy_link_costs_retries_not_data(cluster, tmp_path):
    """5% of what the agent sends is lost, the rest delayed: short watchdogs notice the silence,
    the upload is offered again and completes; the image restores identical."""
    cluster.start_broker(stall_timeout_ms=1500)
    cluster.start_storage("node-a")
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), 16 * MiB, seed=72)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}], fault_link_drop_rate=0.05,
                               fault_link_delay_ms=5, fault_seed=9, reply_timeout_ms=1500)

    rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=120)

    assert rc == 0, stderr
    assert [t["state"] for t in doc["transfers"]] == ["committed"], doc
    attempts = uploads_of(cluster.status(), "office-1", "fileserver", "s1")
    assert len(attempts) >= 2, f"nothing was lost, so nothing was shown: {attempts}"
    (entry,) = cluster.catalog()
    assert entry["blake3"] == digest
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)


# --- 7. rot after commit --------------------------------------------------------------------------------


def flip_a_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(CHUNK_HEADER + (path.stat().st_size - CHUNK_HEADER) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def test_scrub_finds_a_chunk_rotted_after_commit_names_its_snapshots_and_restores_fail_cleanly(cluster, tmp_path):
    cluster.start()
    fs = cluster.dataset_dir("office-1", "fileserver")
    other = cluster.dataset_dir("office-1", "sql")
    digests = {("fileserver", "s1"): generate_image(str(fs / "s1.img"), 16 * MiB, seed=73, zero_fraction=0.0),
               ("sql", "s1"): generate_image(str(other / "s1.img"), 8 * MiB, seed=74, zero_fraction=0.0)}
    staging = tmp_path / "s2.img"
    digests[("fileserver", "s2")] = mutate_chunks(str(fs / "s1.img"), str(staging), [0, 1], seed=1)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": fs}, {"name": "sql", "path": other}])
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    shutil.move(staging, fs / "s2.img")
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    assert len(cluster.catalog()) == 3
    # A chunk both fileserver snapshots share (index 5: s2 changed only 0 and 1) rots on disk.
    shared = chunk_names(fs / "s1.img")[5]
    assert shared == chunk_names(fs / "s2.img")[5] and shared not in chunk_names(other / "s1.img")
    victim = chunk_file(cluster, "node-a", shared)
    flip_a_byte(victim)

    out = tmp_path / "out" / "fileserver-s1.img"
    out.parent.mkdir()
    before_scrub = cluster.restore(cfg, "fileserver", "s1", out)
    assert before_scrub.rc == 1, str(before_scrub)
    assert "damaged" in before_scrub.stderr.splitlines()[-1], str(before_scrub)
    assert not list(out.parent.iterdir()), "a failed restore left a file"

    result = cluster.scrub("node-a")

    assert result.rc == 1, str(result)
    report = result.json
    assert [c["chunk"] for c in report["damaged_chunks"]] == [shared.hex()]
    assert report["damaged_chunks"][0]["reason"], report
    quarantined = report["damaged_chunks"][0]["quarantined_to"]
    assert not victim.exists() and (cluster.node_dir("node-a") / "quarantine" / shared.hex()).exists()
    assert quarantined.endswith(f"quarantine/{shared.hex()}")
    affected = {(a["device_id"], a["dataset"], a["snapshot"]): a["chunks"] for a in report["affected_snapshots"]}
    assert affected == {("office-1", "fileserver", "s1"): [shared.hex()],
                        ("office-1", "fileserver", "s2"): [shared.hex()]}, report
    assert report["problems"] >= 3
    text = cluster.run("storage", "--config", cluster.root / "configs" / "node-a.yaml", "--scrub")
    assert text.rc == 1  # already quarantined: the scrub still names what the snapshots lack
    assert "office-1/fileserver/s1" in text.stdout and "office-1/fileserver/s2" in text.stdout, str(text)

    for snapshot in ("s1", "s2"):
        out = tmp_path / "out" / f"fileserver-{snapshot}.img"
        failed = cluster.restore(cfg, "fileserver", snapshot, out)
        assert failed.rc == 1, str(failed)
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("speedsync restore: ") and "Traceback" not in failed.stderr, str(failed)
        assert not list(out.parent.iterdir()), f"the failed restore of {snapshot} left a file"
    assert_restores(cluster, cfg, "sql", "s1", digests[("sql", "s1")], tmp_path)  # unaffected

    # A later upload of the same chunk heals both snapshots.
    shutil.copyfile(fs / "s1.img", tmp_path / "s3.img")
    shutil.move(tmp_path / "s3.img", fs / "s3.img")
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, f"a new snapshot holding the quarantined chunk (s3 = s1) could not be uploaded:\n{stderr}"
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s3", "committed")]
    for snapshot in ("s1", "s2"):
        assert_restores(cluster, cfg, "fileserver", snapshot, digests[("fileserver", snapshot)], tmp_path)
    assert_scrub_clean(cluster, "node-a")
