"""Background verification's scheduler and slices (roles/storenode/background.py,
verifyrun.py), with a real chunk and manifest store in tmp_path and a fake `now`;
and the agent's verify_interval key."""

from __future__ import annotations

import blake3
import pytest

from bus.errors import RequestError
from roles.chunkdata import HEADER
from roles.config import AgentConfig, ConfigError, StorageConfig, load
from roles.storenode.background import Verifier
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.manifests import Manifest, ManifestStore
from roles.storenode.verifyrun import load_state

CHUNK = 4096


def put_snapshot(chunks, manifests, device, dataset, snapshot, blocks: list) -> Manifest:
    names, hasher = [], blake3.blake3()
    for block in blocks:
        if block is None:
            names.append(None)
            hasher.update(bytes(CHUNK))
            continue
        name = blake3.blake3(block).digest()
        chunks.put(name, len(block), "raw", block)
        names.append(name)
        hasher.update(block)
    manifest = Manifest(device, dataset, snapshot, CHUNK * len(blocks), CHUNK, hasher.digest(), tuple(names))
    manifests.save(manifest)
    return manifest


def rot(chunks, name: bytes) -> None:
    path = chunks.path_for(name)
    blob = bytearray(path.read_bytes())
    blob[HEADER.size + 7] ^= 0x40
    path.write_bytes(bytes(blob))


class Node:
    def __init__(self, root, interval_s=100.0, read_limit=CHUNK * 4, saved=(None, [])):
        self.root = root
        self.chunks, self.manifests = ChunkStore(root), ManifestStore(root)
        self.now = 0.0
        self.v = Verifier(self.chunks, self.manifests, root, read_limit=read_limit, interval_s=interval_s, now=0.0,
                          saved=saved)
        self.answers = []

    def turn(self) -> bool:
        """Run what is due now (slice and saves) to completion; False if nothing was due."""
        submits = self.v.on_time(self.now)
        if not submits:
            return False
        for s in submits:
            result = s.fn(*s.args)
            effects, answers = self.v.completed(s.key, result, None, self.now)
            self.answers += answers
            for e in effects:
                e.fn(*e.args)
        return True

    def until_idle(self, limit=200) -> None:
        """Advance `now` to each due time until the pass is over."""
        for _ in range(limit):
            due = self.v.next_due()
            if due is None or due > self.now + 50:
                return
            self.now = max(self.now, due)
            self.turn()
        raise AssertionError("never idle")


def blocks(seed: int, n: int) -> list:
    return [bytes([seed, i]) * (CHUNK // 2) for i in range(n)]


def test_a_pass_reads_every_snapshot_at_the_read_limit_and_the_next_is_due_within_the_interval(tmp_path):
    node = Node(tmp_path, interval_s=100.0, read_limit=CHUNK * 4)
    put_snapshot(node.chunks, node.manifests, "d1", "ds", "s1", blocks(1, 8))
    put_snapshot(node.chunks, node.manifests, "d1", "ds", "s2", [None, *blocks(2, 3)])
    started = []
    while node.v.passes == 0:
        due = node.v.next_due()
        node.now = max(node.now, due)
        started.append(node.now)
        node.turn()
    assert node.v.verified_snapshots == 2 and node.v.damaged == {}
    file_bytes = 11 * (CHUNK + HEADER.size)
    assert node.v.bytes_read == file_bytes
    # paced: the pass took as long as its bytes at the limit (each slice waits for the last one's bytes)
    assert node.now == pytest.approx(file_bytes / (CHUNK * 4), rel=0.1)
    assert node.v.next_due() == pytest.approx(100.0 - node.v.last_pass_s)
    assert (tmp_path / "verify.state").exists()


def test_rot_is_quarantined_named_refused_to_restore_and_healed_by_a_fresh_chunk_file(tmp_path):
    node = Node(tmp_path)
    manifest = put_snapshot(node.chunks, node.manifests, "d1", "ds", "s1", blocks(3, 4))
    put_snapshot(node.chunks, node.manifests, "d1", "ds", "s2", blocks(3, 4)[1:])  # shares chunks 1..3
    victim = manifest.chunks[2]
    rot(node.chunks, victim)
    node.until_idle()
    assert set(node.v.damaged) == {("d1", "ds", "s1"), ("d1", "ds", "s2")}
    assert node.v.damaged_chunks == 1 and not node.chunks.has(victim)
    assert (tmp_path / "quarantine" / victim.hex()).exists()
    report = node.v.report()
    assert [(d["snapshot"], d["chunks"]) for d in report["damaged"]] == [("s1", [victim.hex()]),
                                                                         ("s2", [victim.hex()])]
    with pytest.raises(RequestError) as refused:
        node.v.refuse_read("d1", "ds", "s1")
    assert refused.value.code == "damaged"
    node.v.refuse_read("d1", "ds", "other")  # no record: not refused

    saves = node.v.chunk_written(victim)
    assert saves and node.v.damaged == {} and node.v.chunk_written(victim) == []
    node.v.refuse_read("d1", "ds", "s1")


def test_a_device_request_goes_ahead_answers_match_or_mismatch_and_is_one_at_a_time(tmp_path):
    node = Node(tmp_path, interval_s=None)  # no background order: requests only
    good = put_snapshot(node.chunks, node.manifests, "d1", "ds", "s1", blocks(5, 3))
    node.v.request("v1", "d1", "ds", "s1", good.image_blake3)
    with pytest.raises(RequestError) as busy:
        node.v.request("v2", "d1", "ds", "s1", good.image_blake3)
    assert busy.value.code == "over_budget"
    node.until_idle()
    assert node.answers == [("v1", True, "verified: every chunk and the image blake3")]
    node.v.request("v3", "d1", "ds", "s1", b"\x01" * 32)  # the local image is another one
    node.v.request("v4", "d2", "ds", "nothing", b"\x01" * 32)
    node.until_idle()
    assert [(a[0], a[1]) for a in node.answers[1:]] == [("v3", False), ("v4", False)]
    assert "another image blake3" in node.answers[1][2] and "not stored" in node.answers[2][2]
    assert node.v.passes == 0  # the background never ran


def test_the_cursor_and_the_damage_survive_a_restart_and_the_damaged_are_checked_first(tmp_path):
    node = Node(tmp_path)
    bad = put_snapshot(node.chunks, node.manifests, "d1", "a", "s1", blocks(6, 2))
    put_snapshot(node.chunks, node.manifests, "d1", "b", "s1", blocks(7, 2))
    put_snapshot(node.chunks, node.manifests, "d1", "c", "s1", blocks(8, 2))
    rot(node.chunks, bad.chunks[0])
    while node.v.cursor != ("d1", "b", "s1"):
        node.now = max(node.now, node.v.next_due())
        node.turn()
    cursor, damaged = load_state(tmp_path)
    assert cursor == ("d1", "b", "s1") and [d[0] for d in damaged] == [("d1", "a", "s1")]

    again = Node(tmp_path, saved=(cursor, damaged))
    assert set(again.v.damaged) == {("d1", "a", "s1")}
    again.now = again.v.next_due()
    again.turn()  # the damaged snapshot first: still damaged, the cursor unmoved
    assert again.v.cursor == ("d1", "b", "s1") and set(again.v.damaged) == {("d1", "a", "s1")}
    again.until_idle()
    assert again.v.passes == 1 and again.v.verified_snapshots == 2  # the recheck and d1/c/s1


def test_verify_keys_are_validated(tmp_path):
    bad = tmp_path / "storage.yaml"
    bad.write_text("insecure: true\nverify_read_limit: lots\n")
    with pytest.raises(ConfigError, match="verify_read_limit"):
        load(StorageConfig, bad)
    bad.write_text("insecure: true\nverify_interval_ms: 5\n")
    with pytest.raises(ConfigError, match="verify_interval_ms"):
        load(StorageConfig, bad)
    agent = tmp_path / "agent.yaml"
    agent.write_text("insecure: true\nverify_interval: soon\n")
    with pytest.raises(ConfigError, match="verify_interval"):
        load(AgentConfig, agent)
    agent.write_text("insecure: true\nverify_interval: 12h\n")
    assert load(AgentConfig, agent).verify_interval == 12 * 3600


def test_the_damage_of_a_snapshot_no_longer_stored_is_forgotten_at_the_end_of_a_pass(tmp_path):
    node = Node(tmp_path)
    bad = put_snapshot(node.chunks, node.manifests, "d1", "ds", "s1", blocks(9, 2))
    rot(node.chunks, bad.chunks[1])
    node.until_idle()
    assert set(node.v.damaged) == {("d1", "ds", "s1")}
    (tmp_path / "manifests" / "d1" / "ds" / "s1.manifest").unlink()  # pruned
    node.now = node.v.next_due()
    node.until_idle()
    assert node.v.damaged == {} and node.v.passes == 2


class Recorder:
    """A second connection of the device: keeps what the broker says to it."""

    def __init__(self):
        self.got: list = []

    def handle(self, msg) -> list:
        self.got.append(msg)
        return []


def test_the_broker_sends_a_devices_verify_to_the_node_holding_it_one_at_a_time(tmp_path):
    from bus.effects import Send
    from schemas import make
    from tests.test_unit_cores import BROKER, Router, image_of

    image = image_of(12, 4)
    router = Router(tmp_path, {"fs": image})
    router.run_until(lambda: router.agent.done)
    router.restorer = Recorder()
    digest = blake3.blake3(image).digest()
    router.take("restorer", [Send(BROKER, make("HELLO", device_id="office-1")),
                             Send(BROKER, make("VERIFY", req=7, dataset="fs", snapshot="s1", image_blake3=digest)),
                             Send(BROKER, make("VERIFY", req=8, dataset="fs", snapshot="s1", image_blake3=digest))])
    router.run_until(lambda: any(m.t == "VERIFIED" for m in router.restorer.got))
    answers = [(m.t, m.get("req"), m.get("match"), m.get("code")) for m in router.restorer.got if m.t != "WELCOME"]
    assert answers == [("ERROR", 8, None, "over_budget"), ("VERIFIED", 7, True, None)], answers

    rot(router.chunks, router.manifests.load("office-1", "fs", "s1").chunks[5])
    router.take("restorer", [Send(BROKER, make("VERIFY", req=9, dataset="fs", snapshot="s1", image_blake3=digest)),
                             Send(BROKER, make("VERIFY", req=10, dataset="nope", snapshot="s1",
                                               image_blake3=digest))])
    router.run_until(lambda: sum(m.t in ("VERIFIED", "ERROR") for m in router.restorer.got) >= 4)
    late = [(m.t, m.get("req"), m.get("match"), m.get("code")) for m in router.restorer.got[-2:]]
    # the second is refused at once (one at a time), then the first finds the rot
    assert late == [("ERROR", 10, None, "over_budget"), ("VERIFIED", 9, False, None)], late
    assert set(router.node.verifier.damaged) == {("office-1", "fs", "s1")}
