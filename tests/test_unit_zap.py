"""CURVE admission: the ZAP answer against RFC 27's frame layouts, the key
directories' scans and their differences (bus.keyring), and the ZAP thread
with real CURVE handshakes on loopback (bus.security.ZapHandler)."""

from __future__ import annotations

import os

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from bus import zap
from bus.keyring import KeyFileError, KeyScanner, read_public
from bus.security import ZapHandler, load_keypair, make_client, make_server

KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))
TABLE = {"devices": {KEY_A: "office-1"}, "nodes": {KEY_B: "node-a"}}


def request(domain=b"devices", mechanism=b"CURVE", credentials=(KEY_A,), version=b"1.0", request_id=b"7"):
    """A ZAP request as RFC 27 lays it out: version, request id, domain, address, identity, mechanism, credentials."""
    return [version, request_id, domain, b"127.0.0.1", b"", mechanism, *credentials]


def test_a_listed_key_is_admitted_with_its_name_as_user_id():
    reply, reason = zap.answer(request(), TABLE)
    # RFC 27 reply: version, request id, status code, status text, user id, metadata
    assert reply == [b"1.0", b"7", b"200", b"OK", b"office-1", b""] and reason == "admitted"


@pytest.mark.parametrize("req, status, reason", [
    (request(credentials=(KEY_B,)), b"400", "key"),  # a node's key on the devices' socket
    (request(credentials=(bytes(32),)), b"400", "key"),
    (request(domain=b"operators"), b"400", "domain"),
    (request(domain=b""), b"400", "domain"),
    (request(mechanism=b"NULL", credentials=()), b"400", "mechanism"),
    (request(mechanism=b"PLAIN", credentials=(b"user", b"pass")), b"400", "mechanism"),
    (request(credentials=(KEY_A[:31],)), b"500", "malformed"),
    (request(credentials=(KEY_A, KEY_A)), b"500", "malformed"),
    (request(version=b"2.0"), b"500", "malformed"),
    (request()[:5], b"500", "malformed"),
])
def test_anything_else_is_refused_with_no_user_id(req, status, reason):
    reply, why = zap.answer(req, TABLE)
    assert len(reply) == 6 and reply[0] == b"1.0" and reply[1] == b"7"
    assert reply[2] == status and reply[4] == b"" and why == reason


def test_a_request_without_an_id_still_gets_a_well_formed_refusal():
    assert zap.answer([b"1.0"], TABLE)[0] == [b"1.0", b"", b"500", b"malformed request", b"", b""]
    assert zap.answer([], TABLE)[0][2] == b"500"


# --- key directories ---------------------------------------------------------------------

def keygen(directory, name) -> bytes:
    os.makedirs(directory, exist_ok=True)
    public, _ = zmq.auth.create_certificates(str(directory), name)
    os.remove(f"{directory}/{name}.key_secret")
    return read_public(public)


@pytest.fixture
def dirs(tmp_path):
    out = {d: str(tmp_path / d) for d in ("devices", "nodes", "operators", "admins")}
    for d in out.values():
        os.makedirs(d)
    return out


def test_a_scan_tables_every_key_and_a_rescan_gives_only_the_difference(dirs):
    a = keygen(dirs["devices"], "office-1")
    n = keygen(dirs["nodes"], "node-a")
    alice = keygen(dirs["operators"], "alice")
    root = keygen(dirs["admins"], "root")
    scanner = KeyScanner(dirs)
    first = scanner.scan(strict=True)
    assert first.keys.zap == {"devices": {a: "office-1"}, "nodes": {n: "node-a"},
                              "operators": {alice: "alice", root: "root"}}
    assert first.changes["admins"] == ({"root"}, set()) and first.problems == []
    assert scanner.scan().changes == {}
    b = keygen(dirs["devices"], "office-2")
    os.remove(f"{dirs['operators']}/alice.key")
    result = scanner.scan()
    assert result.changes == {"devices": ({"office-2"}, set()), "operators": (set(), {"alice"})}
    assert result.keys.zap["devices"] == {a: "office-1", b: "office-2"}
    assert result.keys.names("operators") == {"root"} and result.keys.names("admins") == {"root"}


def test_a_replaced_key_is_removed_and_added_and_an_admin_is_an_operator(dirs):
    keygen(dirs["devices"], "office-1")
    keygen(dirs["operators"], "alice")
    scanner = KeyScanner(dirs)
    scanner.scan(strict=True)
    os.remove(f"{dirs['devices']}/office-1.key")
    new = keygen(dirs["devices"], "office-1")
    assert scanner.scan().changes == {"devices": ({"office-1"}, {"office-1"})}
    assert scanner.last.zap["devices"] == {new: "office-1"}
    # alice made an admin (her key in both): no conflict, no change for the status socket
    with open(f"{dirs['operators']}/alice.key") as src, open(f"{dirs['admins']}/alice.key", "w") as dst:
        dst.write(src.read())
    result = scanner.scan()
    assert result.changes == {"admins": ({"alice"}, set())} and result.problems == []


def test_a_key_listed_for_two_roles_stops_the_start_and_is_refused_for_both_on_a_rescan(dirs, tmp_path):
    key = keygen(dirs["devices"], "office-1")
    with open(f"{dirs['devices']}/office-1.key") as src:
        text = src.read()
    with open(f"{dirs['nodes']}/node-a.key", "w") as f:
        f.write(text)
    with pytest.raises(KeyFileError, match="listed for 2 identities"):
        KeyScanner(dirs).scan(strict=True)
    os.remove(f"{dirs['nodes']}/node-a.key")
    scanner = KeyScanner(dirs)
    scanner.scan(strict=True)
    with open(f"{dirs['nodes']}/node-a.key", "w") as f:
        f.write(text)
    result = scanner.scan()
    assert result.changes == {"devices": (set(), {"office-1"})}
    assert key not in result.keys.zap["devices"] and key not in result.keys.zap["nodes"]
    assert len(result.problems) == 1 and "node-a.key" in result.problems[0] and "office-1.key" in result.problems[0]


def test_an_unreadable_file_keeps_its_key_and_a_new_one_waits_and_a_lost_directory_keeps_its_keys(dirs):
    key = keygen(dirs["devices"], "office-1")
    scanner = KeyScanner(dirs)
    scanner.scan(strict=True)
    with open(f"{dirs['devices']}/office-1.key", "w") as f:
        f.write("half a copy")
    with open(f"{dirs['devices']}/office-2.key", "w") as f:
        f.write("")
    result = scanner.scan()
    assert result.changes == {} and result.keys.zap["devices"] == {key: "office-1"} and len(result.problems) == 2
    # at start a malformed file is that one key refused, named, and the others load
    fresh = KeyScanner(dirs)
    keygen(dirs["devices"], "office-3")
    started = fresh.scan(strict=True)
    assert set(started.keys.zap["devices"].values()) == {"office-3"}
    assert sorted(p.split(":")[0] for p in started.skipped) == sorted(
        f"cannot load public key {dirs['devices']}/office-{i}.key" for i in (1, 2))
    os.remove(f"{dirs['devices']}/office-3.key")
    os.rename(dirs["devices"], dirs["devices"] + ".moved")
    result = scanner.scan()
    assert result.changes == {} and result.keys.zap["devices"] == {key: "office-1"} and result.problems


def test_a_rescan_reads_only_the_files_that_changed(dirs):
    for i in range(50):
        keygen(dirs["devices"], f"dev-{i}")
    scanner = KeyScanner(dirs)
    scanner.scan(strict=True)
    assert scanner.files_read == 50
    assert scanner.scan().changes == {} and scanner.files_read == 50
    keygen(dirs["devices"], "dev-new")
    assert scanner.scan().changes == {"devices": ({"dev-new"}, set())}
    assert scanner.files_read == 51


# --- the ZAP thread, with real handshakes ----------------------------------------------------

def test_the_zap_thread_admits_listed_keys_and_a_swapped_table_refuses_new_handshakes(tmp_path):
    ctx = zmq.Context()
    try:
        for name in ("broker", "office-1", "mallory"):
            zmq.auth.create_certificates(str(tmp_path), name)
        broker, office, mallory = (load_keypair(tmp_path / f"{n}.key_secret") for n in ("broker", "office-1",
                                                                                           "mallory"))
        handler = ZapHandler(ctx, {"devices": {z85.decode(office.public): "office-1"}})
        server = ctx.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        make_server(server, broker, "devices")
        port = server.bind_to_random_port("tcp://127.0.0.1")

        def hello(keys, timeout_ms=1000):
            client = ctx.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            make_client(client, keys, broker.public)
            client.connect(f"tcp://127.0.0.1:{port}")
            client.send(b"hi")
            try:
                if server.poll(timeout_ms):
                    routing, frame = server.recv_multipart(copy=False)
                    return frame.get("User-Id")
                return None
            finally:
                client.close()

        assert hello(office) == "office-1"
        assert hello(mallory, timeout_ms=300) is None
        handler.install({"devices": {}})
        assert hello(office, timeout_ms=300) is None
        handler.install({"devices": {z85.decode(mallory.public): "mallory"}})
        assert hello(mallory) == "mallory"
        counts = handler.statistics()
        assert counts["admitted"] == 2 and counts["key"] >= 2
        server.close()
        handler.stop()
    finally:
        ctx.term()
