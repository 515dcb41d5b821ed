"""The node's image thread is shared by device in bounded turns (roles/storenode/imageturns.py):
a device that names a terabyte of zero chunks does not hold another device's commit, and
what it queued stays O(1) in memory. Pure, then through the real StorageCore (tests/corenode.py)."""

import blake3

from roles.storenode.imageturns import IN_FLIGHT, TURN_BYTES, ImageTurns
from tests.corenode import CoreNode

BIG = 16 * 1024 * 1024  # the largest chunk: one nil name is 16 MiB of zeros to hash
TiB = 1 << 40


class Recorder:
    """Stands for ImageHashes: records what each turn would hash."""

    def __init__(self):
        self.calls = []

    def feed(self, tid, pieces):
        self.calls.append(("feed", tid, sum(p[3] for p in pieces)))

    def finish(self, tid, manifest):
        self.calls.append(("finish", tid, 0))

    def drop(self, tid):
        self.calls.append(("drop", tid, 0))


def run_all(turns, recorder):
    """Run turns as the one image thread would (in submission order) until nothing is left."""
    pending = list(turns.submits())
    while pending:
        effect = pending.pop(0)
        effect.fn(*effect.args)
        turns.done()
        pending.extend(turns.submits())


def test_a_commit_waits_behind_at_most_one_turn_of_a_device_hashing_a_terabyte_of_zeros():
    recorder = Recorder()
    turns = ImageTurns(recorder)
    for q in range(TiB // (4096 * BIG)):  # 16 QUERYs of 4,096 nil names
        turns.feed("mallory", "t-evil", [(q * 4096 + i, None, None, BIG) for i in range(4096)])
    # a terabyte of zeros queued is one task of one run, not 65,536 pieces
    assert turns.statistics().tasks_queued == 1
    first = turns.submits()
    assert len(first) == IN_FLIGHT  # the thread is kept busy with mallory's turns meanwhile
    turns.feed("honest", "t-good", [(0, b"n" * 32, b"x" * 1000, 1000)])
    turns.finish("honest", "t-good", manifest=None)
    pending = list(first)
    while pending:
        effect = pending.pop(0)
        effect.fn(*effect.args)
        turns.done()
        if recorder.calls[-1][0] == "finish":
            break
        pending.extend(turns.submits())
    evil = [c for c in recorder.calls if c[1] == "t-evil"]
    assert [c[0] for c in recorder.calls if c[1] == "t-good"] == ["feed", "finish"]
    # the honest feed and finish each waited for at most IN_FLIGHT of mallory's turns
    assert len(evil) <= IN_FLIGHT * 2, recorder.calls
    assert all(c[2] <= TURN_BYTES for c in evil)


def test_every_zero_byte_is_fed_in_order_across_turns_and_a_drop_forgets_what_is_queued():
    recorder = Recorder()
    turns = ImageTurns(recorder, turn_bytes=10)
    turns.feed("d", "t-1", [(0, None, None, 7), (1, None, None, 7), (2, b"a" * 32, None, 4), (3, None, None, 25)])
    run_all(turns, recorder)
    assert sum(c[2] for c in recorder.calls) == 7 + 7 + 4 + 25
    assert all(c[2] <= 10 for c in recorder.calls if c[0] == "feed")
    recorder.calls.clear()
    turns.feed("d", "t-2", [(0, None, None, 1000)])
    turns.drop("d", "t-2")
    run_all(turns, recorder)
    assert recorder.calls == [("drop", "t-2", 0)]


def test_chunk_bytes_queued_per_device_are_capped_then_read_back_by_name():
    turns = ImageTurns(Recorder(), raw_max=2500, in_flight_max=0)  # nothing runs: all stays queued
    turns.feed("d", "t-1", [(i, bytes([i]) * 32, b"x" * 1000, 1000) for i in range(5)])
    assert turns.statistics().raw_bytes_queued == 2000  # the third piece would pass the cap: its bytes dropped
    turns.feed("other", "t-2", [(0, b"o" * 32, b"y" * 1000, 1000)])
    assert turns.statistics().raw_bytes_queued == 3000  # another device's cap is its own


def test_the_real_core_commits_an_honest_upload_while_another_device_queued_64_GiB_of_zeros(tmp_path):
    node = CoreNode(tmp_path)
    count = 4096
    node.send("OPEN", transfer_id="t-evil", device_id="mallory", dataset="ds", snapshot="s", image_size=count * BIG,
              chunk_size=BIG, chunk_count=count)
    node.send("QUERY", transfer_id="t-evil", start=0, hashes=[None] * count)
    raw = b"honest data" * 300
    name = blake3.blake3(raw).digest()
    node.send("OPEN", transfer_id="t-good", device_id="honest", dataset="ds", snapshot="s", image_size=len(raw),
              chunk_size=4096, chunk_count=1)
    node.send("QUERY", transfer_id="t-good", start=0, hashes=[name])
    while node.run_store():
        pass
    node.send("CHUNK", payload=[raw], transfer_id="t-good", hash=name, raw_len=len(raw), codec="raw")
    while node.run_store():
        pass
    node.send("COMMIT", transfer_id="t-good", image_blake3=blake3.blake3(raw).digest())
    evil_bytes = 0  # mallory's zeros the image thread hashes before the honest commit
    while not any(m.t == "COMMITTED" for m in node.sent):
        if node.image and node.image[0].key == ("hash", "t-evil"):
            evil_bytes += sum(piece[3] for piece in node.image[0].args[1])
            # checked before the turn runs: without turns the first one would be all 64 GiB (half a minute)
            # each of the honest tasks (its feed, its finish) waits behind at most IN_FLIGHT turns
            assert evil_bytes <= IN_FLIGHT * 3 * TURN_BYTES, "the honest commit waits behind mallory's zeros"
        assert node.run_store() or node.run_image(), [m.t for m in node.sent]
    committed = next(m for m in node.sent if m.t == "COMMITTED")
    assert committed["transfer_id"] == "t-good" and committed["image_blake3"] == blake3.blake3(raw).digest()
    # mallory's 64 GiB are still queued (a turn of 32 MiB each), not hashed before the commit
    assert node.core.image_turns.statistics().devices_waiting == 1

