"""StorageCore on a fake clock: its state tables, protocol violations, timers
and restore credit. Pool work runs when the test says so (tests/corenode.py)."""

import ast
import os
import re
from pathlib import Path

import blake3
import pytest

from bus.errors import RequestError
from roles.storenode.manifests import Manifest
from roles.storenode.transitions import FAILED, READ_TRANSITIONS, UPLOAD_TRANSITIONS, advance
from roles.storenode.uploads import UploadSession
from schemas import MESSAGES
from tests.corenode import CoreNode

CHUNK = 4096
ROOT = Path(__file__).parent.parent


def name_of(raw):
    return blake3.blake3(raw).digest()


def open_upload(node, tid="t-1", device="dev", chunks=1, snapshot=None):
    node.send("OPEN", transfer_id=tid, device_id=device, dataset="ds", snapshot=snapshot or tid, image_size=chunks * CHUNK,
              chunk_size=CHUNK, chunk_count=chunks)
    assert [m.t for m in node.take_sent()] == ["OPENED"]


def errors(node):
    return [(m["code"], m.get("ref"), m["reason"]) for m in node.take_sent() if m.t == "ERROR"]


# --- the tables -------------------------------------------------------------------------

def _states(table):
    return sorted({s for s, _ in table} | set(table.values()))


def _events(table):
    return sorted({e for _, e in table})


class Holder:
    def __init__(self, state):
        self.state = state


@pytest.mark.parametrize("table", [UPLOAD_TRANSITIONS, READ_TRANSITIONS], ids=["upload", "read"])
def test_every_state_and_event_moves_as_tabled_or_is_bad_state(table):
    for state in _states(table):
        for event in _events(table):
            holder = Holder(state)
            if (state, event) in table:
                assert advance(holder, table, event, "broker") == table[(state, event)] == holder.state
            else:
                with pytest.raises(RequestError) as info:
                    advance(holder, table, event, "broker")
                assert info.value.code == "bad_state"
                assert event in info.value.reason and state in info.value.reason and "broker" in info.value.reason
                assert holder.state == table.get((state, "violation"), FAILED)


def test_the_tables_message_events_are_declared_for_the_node():
    for table in (UPLOAD_TRANSITIONS, READ_TRANSITIONS):
        for event in _events(table):
            if event.isupper():
                assert "node" in MESSAGES[event].receivers, event


def _to_committing(node, tid="t-1"):
    open_upload(node, tid)
    node.send("QUERY", transfer_id=tid, start=0, hashes=[None])
    node.send("COMMIT", transfer_id=tid, image_blake3=None)
    assert [m.t for m in node.take_sent()] == ["MISSING"]
    assert node.core.uploads[tid].state == "committing"  # the check waits on the store pool


def _to_waiting_on_peer(node, tid="t-1"):
    raw = os.urandom(CHUNK)
    open_upload(node, "t-peer", snapshot="peer")
    node.send("QUERY", transfer_id="t-peer", start=0, hashes=[name_of(raw)])
    assert [list(m["missing"]) for m in node.take_sent()] == [[0]]
    open_upload(node, tid)
    node.send("QUERY", transfer_id=tid, start=0, hashes=[name_of(raw)])
    node.send("COMMIT", transfer_id=tid, image_blake3=None)
    assert [list(m["missing"]) for m in node.take_sent()] == [[]]  # asked once per device
    assert node.core.uploads[tid].state == "waiting_on_peer"
    return raw


def _to_failed(node, tid="t-1"):
    open_upload(node, tid)
    node.send("QUERY", transfer_id=tid, start=3, hashes=[None])
    [(code, ref, _)] = errors(node)
    assert (code, ref) == ("bad_state", "QUERY")
    assert node.core.uploads[tid].state == FAILED


@pytest.mark.parametrize("reach", [_to_committing, _to_waiting_on_peer, _to_failed])
@pytest.mark.parametrize("t", ["QUERY", "CHUNK", "COMMIT"])
def test_a_message_the_table_refuses_is_bad_state_naming_type_state_and_peer(tmp_path, reach, t):
    node = CoreNode(tmp_path)
    reach(node)
    state = node.core.uploads["t-1"].state
    raw = b"x" * CHUNK
    fields = {"QUERY": dict(start=0, hashes=[None]), "COMMIT": dict(image_blake3=None),
              "CHUNK": dict(payload=[raw], hash=name_of(raw), raw_len=CHUNK, codec="raw")}[t]
    node.send(t, transfer_id="t-1", **fields)
    [(code, ref, reason)] = errors(node)
    assert (code, ref) == ("bad_state", t)
    assert t in reason and state in reason and "broker" in reason
    assert node.core.uploads["t-1"].state == FAILED
    node.send("ABORT", transfer_id="t-1")
    assert "t-1" not in node.core.uploads


def test_a_violation_fails_the_session_and_frees_what_it_was_to_send(tmp_path):
    node = CoreNode(tmp_path)
    _to_waiting_on_peer(node)
    # the upload asked for the shared chunk breaks the protocol: the one waiting on it cannot commit
    node.send("QUERY", transfer_id="t-peer", start=7, hashes=[None])
    got = errors(node)
    assert [(c, r) for c, r, _ in got] == [("commit_failed", "COMMIT"), ("bad_state", "QUERY")]
    assert node.core.uploads["t-peer"].state == FAILED
    assert "t-1" not in node.core.uploads
    assert node.core.in_flight.statistics() == (0, 0)


def test_a_waiting_commit_goes_on_when_the_peer_stores_the_chunk(tmp_path):
    node = CoreNode(tmp_path)
    raw = _to_waiting_on_peer(node)
    node.send("CHUNK", payload=[raw], transfer_id="t-peer", hash=name_of(raw), raw_len=CHUNK, codec="raw")
    node.settle()
    sent = node.take_sent()
    assert [m.t for m in sent] == ["STORED", "COMMITTED"]
    assert sent[1]["transfer_id"] == "t-1" and sent[1]["image_blake3"] == name_of(raw)
    assert node.core.in_flight.statistics() == (0, 0)


def test_query_slices_are_answered_in_order_whatever_order_the_pool_answers(tmp_path):
    node = CoreNode(tmp_path)
    owned = [os.urandom(CHUNK) for _ in range(4)]
    for raw in owned:
        node.chunks.put(name_of(raw), CHUNK, "raw", raw)
        node.owners.add("dev", name_of(raw))
    fresh = os.urandom(CHUNK)
    open_upload(node, chunks=5)
    node.send("QUERY", transfer_id="t-1", start=0, hashes=[name_of(r) for r in owned[:2]])
    node.send("QUERY", transfer_id="t-1", start=2, hashes=[name_of(owned[2]), name_of(fresh)])
    node.send("QUERY", transfer_id="t-1", start=4, hashes=[name_of(owned[3])])
    node.chunks.path_for(name_of(owned[3])).unlink()  # gone from disk: asked again
    assert not node.sent and len(node.store) == 3
    while node.store:
        node._run(node.store.pop())  # last submitted first
    answers = [(m["start"], list(m["missing"])) for m in node.take_sent()]
    assert answers == [(0, []), (2, [3]), (4, [4])]


def test_a_commit_behind_pending_slices_waits_for_them(tmp_path):
    node = CoreNode(tmp_path)
    raw = os.urandom(CHUNK)
    node.chunks.put(name_of(raw), CHUNK, "raw", raw)
    node.owners.add("dev", name_of(raw))
    open_upload(node)
    node.send("QUERY", transfer_id="t-1", start=0, hashes=[name_of(raw)])
    node.send("COMMIT", transfer_id="t-1", image_blake3=name_of(raw))
    assert not node.sent
    node.settle()
    assert [m.t for m in node.take_sent()] == ["MISSING", "COMMITTED"]
    assert node.manifests.load("dev", "ds", "t-1").chunks == (name_of(raw),)


# --- timers --------------------------------------------------------------------------------

def test_the_idle_sweep_fires_on_the_fake_clock(tmp_path):
    node = CoreNode(tmp_path, idle_s=10.0)
    open_upload(node, "t-idle")
    _to_committing(node, "t-busy")
    node.advance(6.0)
    node.send("QUERY", transfer_id="t-idle", start=0, hashes=[None])  # activity moves its deadline
    node.take_sent()
    node.advance(6.0)
    assert set(node.core.uploads) == {"t-idle", "t-busy"}
    assert node.core.next_deadline() is not None
    node.advance(5.0)
    assert set(node.core.uploads) == {"t-busy"}, "an idle upload is forgotten, a committing one is not"
    node.advance(60.0)
    assert set(node.core.uploads) == {"t-busy"}


def test_space_is_refreshed_on_the_pool_and_reported(tmp_path):
    node = CoreNode(tmp_path)
    assert node.core.heartbeat_message(node.now)["free_bytes"] == 1 << 40
    node.advance(1.0)
    assert [s.key for s in node.store] == [("space",), ("reap",)]  # the write-shaped copies go with it
    node.settle()
    free, used = node.chunks.space()
    beat = node.core.heartbeat_message(node.now)
    assert (beat["free_bytes"], beat["used_bytes"]) == (free, used)
    assert node.core.register_message(node.now)["free_bytes"] == free


# --- restores ------------------------------------------------------------------------------

def test_restores_never_exceed_credit_and_hold_one_ready_block(tmp_path):
    node = CoreNode(tmp_path)
    chunks = [os.urandom(CHUNK), None, os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)]
    names = []
    for raw in chunks:
        names.append(None if raw is None else name_of(raw))
        if raw is not None:
            node.chunks.put(names[-1], CHUNK, "raw", raw)
    image = b"".join(raw or bytes(CHUNK) for raw in chunks)
    node.manifests.save(Manifest("dev", "ds", "s1", len(image), CHUNK, name_of(image), tuple(names)))
    window = CHUNK + 100
    node.send("READ", transfer_id="r-1", device_id="dev", dataset="ds", snapshot="s1", window=window)
    granted, used, blocks = window, 0, []
    for _ in range(1000):
        assert len(node.store) + len(node.image) <= 1, "one read at a time per restore"
        session = node.core.pump.sessions.get("r-1")
        assert session is None or session.ready is None or session.state == "waiting_credit"
        for m in node.take_sent():
            if m.t == "BLOCK":
                used += len(m.payload[0]) if m.payload else 0
                assert used <= granted
                blocks.append(m["index"])
        if len(blocks) == len(chunks):
            break
        if not node.run_store():
            assert node.core.pump.sessions["r-1"].state == "waiting_credit"
            granted += CHUNK
            node.send("CREDIT", transfer_id="r-1", bytes=CHUNK)
    assert blocks == [0, 1, 2, 3, 4]
    assert "r-1" not in node.core.pump.sessions
    node.send("CREDIT", transfer_id="r-1", bytes=CHUNK)  # late credit for a finished restore
    assert not node.take_sent()


def test_a_restore_of_what_is_not_stored_is_not_found(tmp_path):
    node = CoreNode(tmp_path)
    node.send("READ", transfer_id="r-1", device_id="dev", dataset="ds", snapshot="nope", window=CHUNK)
    node.settle()
    assert [(c, r) for c, r, _ in errors(node)] == [("not_found", "READ")]
    assert not len(node.core.pump)


def test_not_registered_closes_sessions_and_registers_again(tmp_path):
    node = CoreNode(tmp_path)
    open_upload(node)
    node.send("ERROR", code="not_registered", reason="who are you")
    assert [m.t for m in node.take_sent()] == ["READY"]
    assert not node.core.uploads


def test_a_malformed_message_is_answered_with_its_code(tmp_path):
    from bus.errors import RemoteProtocolError
    node = CoreNode(tmp_path)
    node._take(node.core.malformed(("broker", None), RemoteProtocolError("junk", "bad_header"), node.now))
    assert [(c, r) for c, r, _ in errors(node)] == [("bad_header", None)]


# --- layering ---------------------------------------------------------------------------

def test_the_core_reads_no_clock_and_imports_no_zmq():
    for name in ("core", "commits", "uploads", "restores", "imagehash", "transitions", "gc", "background"):
        source = (ROOT / "roles/storenode" / f"{name}.py").read_text()
        tree = ast.parse(source)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"zmq", "time", "os", "threading"}, name
        assert "now()" not in source and "monotonic" not in source, name


def test_upload_state_is_assigned_only_in_the_transitions_table():
    for path in (ROOT / "roles/storenode").glob("*.py"):
        if path.name != "transitions.py":
            assert not re.search(r"\bstate\s*=(?!=)", path.read_text()), path
    assert UploadSession("t", "d", "ds", "s", CHUNK, CHUNK, 1).state == "open"


def test_upload_sessions_per_device_are_capped_on_the_node(tmp_path):
    from roles.storenode.core import DEVICE_SESSIONS_MAX

    node = CoreNode(tmp_path)
    for i in range(DEVICE_SESSIONS_MAX):
        open_upload(node, f"t-{i}", device="evil")
    node.send("OPEN", transfer_id="t-over", device_id="evil", dataset="ds", snapshot="s", image_size=CHUNK,
              chunk_size=CHUNK, chunk_count=1)
    assert [code for code, _, _ in errors(node)] == ["over_budget"]
    assert "t-over" not in node.core.uploads
    open_upload(node, "t-honest", device="honest")  # another device is not refused
    node.send("ABORT", transfer_id="t-0")
    node.take_sent()
    open_upload(node, "t-again", device="evil")  # one closed: room again
