"""End to end: CurveZMQ, identity from the key, per-device isolation, hostile ids (issue 4, item 6).

The cluster runs as shipped: CURVE on every socket, keys written by the real
`keygen` command, the broker admitting the device, node and operator keys
listed in its directories before it started (`Cluster.enroll`). Strangers
(an unlisted key, no key, a key of the wrong kind) never complete a
handshake, so they get no answer at all and leave no trace in status. A
listed device may act only as the device its key names: naming another
device gets ERROR forbidden, identical whether or not the thing named
exists, so nothing leaks. Ids that could become paths are refused with
ERROR bad_id, and no file appears outside the data directories.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import zmq

from roles.sampleimages import generate_image
from bus.security import load_keypair, load_public
from tests.harness import (MiB, RawClient, TcpRelay, assert_restores, chunk_names, distinct_nonzero_chunks,
                           uploads_of)

NO_ANSWER_S = 1.0  # a CURVE handshake on loopback takes milliseconds; silence this long is a refusal
BAD_IDS = ["../x", "a/b", "", "x" * 129, "..", "../../../../../../tmp/speedsync-escape", "a\x00b", ".hidden"]


def raw_header(**fields) -> bytes:
    """A header the schema would refuse to build (make() validates), packed by hand."""
    return msgpack.packb({"v": 1, **fields}, use_bin_type=True)


@pytest.fixture
def cluster(secure_cluster, tmp_path):
    """A CURVE cluster with office-1 and office-2 listed; office-2 has replicated private/s1."""
    c = secure_cluster
    c.start(devices=("office-1", "office-2"))
    directory = c.dataset_dir("office-2", "private")
    c.private_digest = generate_image(str(directory / "s1.img"), 8 * MiB, seed=80, zero_fraction=0.0,
                                      text_fraction=0.0)
    c.private_image = directory / "s1.img"
    rc, _, stderr = c.run_agent_once(c.agent_config("office-2", [{"name": "private", "path": directory}]))
    assert rc == 0, stderr
    return c


def curve(cluster, key_name: str):
    return load_keypair(cluster.keys / f"{key_name}.key_secret"), load_public(cluster.keys / "broker.key")


def files_outside_data_dirs(cluster) -> set:
    """Every path under the test's directory except the roles' data dirs and logs, and the siblings of it."""
    data = {cluster.root / "var", cluster.logs}
    inside = {p for p in cluster.root.rglob("*") if not any(p == d or d in p.parents for d in data)}
    return inside | set(cluster.root.parent.iterdir())


def test_a_key_not_listed_cannot_handshake_or_learn_anything(cluster, zctx, tmp_path):
    before = cluster.status()
    cluster.keygen("mallory")  # a well-formed key pair the broker has never been told about
    # The real agent with mallory's key (claiming to be office-2): no WELCOME, so it gives up, exit 1.
    directory = cluster.dataset_dir("mallory", "private")
    generate_image(str(directory / "s1.img"), MiB, seed=81)
    cfg = cluster.agent_config("office-2", [{"name": "private", "path": directory}], key_name="mallory",
                               config_name="mallory", connect_timeout_ms=1000, state_dir=str(tmp_path / "mallory"))
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 1 and "no broker answered" in stderr, stderr
    assert [t["state"] for t in doc["transfers"]] == ["failed"], doc
    out = tmp_path / "stolen.img"
    result = cluster.restore(cfg, "private", "s1", out)
    assert result.rc == 1 and not out.exists() and not list(tmp_path.glob(".stolen.img*")), str(result)
    # Raw sockets: an unlisted key, no CURVE at all, a node's key on the agents' socket and a
    # device's key on the workers' socket. Not one byte of protocol comes back.
    strangers = [
        (cluster.frontend, curve(cluster, "mallory"), [raw_header(t="HELLO", device_id="office-2"),
                                                       raw_header(t="LIST", device_id="office-2")]),
        (cluster.frontend, None, [raw_header(t="HELLO", device_id="office-2"), raw_header(t="LIST")]),
        (cluster.frontend, curve(cluster, "node-a"), [raw_header(t="HELLO", device_id="node-a")]),
        (cluster.backend, curve(cluster, "office-1"), [raw_header(t="READY", node_id="office-1", window=MiB,
                                                                  free_bytes=0, used_bytes=0)]),
        (cluster.status_endpoint, curve(cluster, "mallory"), [raw_header(t="STATUS"), raw_header(t="LIST")]),
        (cluster.status_endpoint, None, [raw_header(t="STATUS")]),
    ]
    clients = []
    for endpoint, keys, frames in strangers:
        client = RawClient(zctx, endpoint, curve=keys)
        for frame in frames:
            client.send_frames([frame])
        clients.append(client)
    poller = zmq.Poller()  # all of them at once, for NO_ANSWER_S: any answer at all fails the test
    for client in clients:
        poller.register(client.sock, zmq.POLLIN)
    answered = dict(poller.poll(NO_ANSWER_S * 1000))
    for client, (endpoint, _, _) in zip(clients, strangers):
        assert client.sock not in answered, f"a stranger on {endpoint} got an answer"
        client.close()
    # The commands, with a key that is no operator's: mallory's, and a device's.
    for key_name, command in (("mallory", "status"), ("office-1", "list")):
        result = cluster.run(command, "--broker", cluster.status_endpoint, "--json", "--timeout-ms", "1000",
                             *cluster.operator_args(key_name))
        assert result.rc == 1 and result.stdout == "", str(result)
    # The broker saw nothing it would count or show.
    after = cluster.status()
    assert {a["device_id"] for a in after["agents"]} == {a["device_id"] for a in before["agents"]} == {"office-2"}
    assert after["broker"]["errors_by_code"] == before["broker"]["errors_by_code"] == {}
    assert [n["node_id"] for n in after["storage"]] == ["node-a"]
    assert [(s["device_id"], s["dataset"], s["snapshot"]) for s in cluster.catalog()] == \
        [("office-2", "private", "s1")]


def test_a_listed_device_may_act_only_as_itself_and_learns_nothing_of_another(cluster, zctx, tmp_path):
    office1 = RawClient(zctx, cluster.frontend, curve=curve(cluster, "office-1"))
    # The key decides who speaks: office-1's key cannot say HELLO as office-2.
    office1.send("HELLO", device_id="office-2")
    office1.expect_error("forbidden")
    office1.hello("office-1")
    # Naming office-2 in OFFER, RESTORE or LIST is forbidden, and the refusal is the same whether
    # what is named exists (private/s1) or not (nothing/s9): it tells nothing.
    refusals = {}
    for dataset, snapshot in (("private", "s1"), ("nothing", "s9")):
        office1.send("OFFER", req=1, device_id="office-2", dataset=dataset, snapshot=snapshot, image_size=8 * MiB,
                     chunk_size=MiB, chunk_count=8)
        offer = office1.expect_error("forbidden")
        office1.send("RESTORE", req=2, device_id="office-2", dataset=dataset, snapshot=snapshot, window=MiB)
        restore = office1.expect_error("forbidden")
        refusals[dataset] = (offer["reason"], restore["reason"])
        assert "office-1" in offer["reason"] and dataset not in offer["reason"] + restore["reason"]
    assert refusals["private"] == refusals["nothing"]
    office1.send("LIST", device_id="office-2")
    office1.expect_error("forbidden")
    # In its own namespace, office-2's dataset is simply not there.
    office1.send("RESTORE", req=3, dataset="private", snapshot="s1", window=MiB)
    assert office1.expect_error("not_found")["req"] == 3
    office1.send("LIST")
    assert office1.expect("LIST_REPLY")["snapshots"] == []
    office1.close()
    # Likewise a storage worker's key names one node: node-a's key cannot register node-b.
    impostor = RawClient(zctx, cluster.backend, curve=curve(cluster, "node-a"))
    impostor.send("READY", node_id="node-b", window=MiB, free_bytes=1 << 40, used_bytes=0)
    impostor.expect_error("forbidden")
    impostor.close()
    assert [(n["node_id"], n["alive"]) for n in cluster.status()["storage"]] == [("node-a", True)]

    # The real commands, as office-1 claiming office-2 in its config: refused, nothing restored.
    impostor = cluster.agent_config("office-2", [{"name": "private", "path": cluster.dataset_dir("office-1", "x")}],
                                    key_name="office-1", config_name="impostor", connect_timeout_ms=1000,
                                    state_dir=str(tmp_path / "imp"))
    out = tmp_path / "stolen.img"
    result = cluster.restore(impostor, "private", "s1", out)
    assert result.rc == 1 and not out.exists() and not list(tmp_path.glob(".stolen.img*")), str(result)

    # Negotiation is per device: office-1 offering the very image office-2 stored must send every
    # chunk of it (it cannot learn the cloud holds it). Its traffic, captured by a relay, is ciphertext.
    directory = cluster.dataset_dir("office-1", "copy")
    (directory / "s1.img").write_bytes(cluster.private_image.read_bytes())
    relay = TcpRelay(cluster.frontend, keep_up=64 * MiB)
    cfg = cluster.agent_config("office-1", [{"name": "copy", "path": directory}], brokers=[relay.endpoint])
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    (t,) = doc["transfers"]
    assert t["chunks_sent"] == distinct_nonzero_chunks(directory / "s1.img") == 8, t
    captured = bytes(relay.captured)
    relay.close()
    assert relay.up >= 8 * MiB and len(captured) == relay.up, "the relay did not see the upload"
    assert b"CURVE" in captured[:64], "not a CURVE greeting"
    image = (directory / "s1.img").read_bytes()
    for offset in range(0, 8 * MiB, MiB):
        assert image[offset + 4096:offset + 4096 + 64] not in captured, "image bytes crossed the wire in clear"
    # (CURVE's own handshake commands, HELLO and INITIATE among them, are plaintext names by design.)
    for clear in (b"office-1", b"OFFER", b"QUERY", b"CHUNK", b"transfer_id"):
        assert clear not in captured, f"{clear!r} crossed the wire in clear"
    assert_restores(cluster, cfg, "copy", "s1", cluster.private_digest, tmp_path)
    assert {(s["device_id"], s["dataset"]) for s in cluster.catalog()} == {("office-2", "private"),
                                                                            ("office-1", "copy")}


def test_ids_that_could_become_paths_are_refused_and_no_file_appears_outside_data_dirs(cluster, zctx, tmp_path):
    cfg = cluster.agent_config("office-1", [{"name": "fs", "path": cluster.dataset_dir("office-1", "fs")}])
    out = tmp_path / "out" / "restored.img"
    out.parent.mkdir()
    before = files_outside_data_dirs(cluster)
    node_files_before = {p for p in cluster.node_dir("node-a").rglob("*")}
    fresh = RawClient(zctx, cluster.frontend, curve=curve(cluster, "office-1"))
    for bad in BAD_IDS:  # refused before the session exists: the schema checks ids first
        fresh.send_frames([raw_header(t="HELLO", device_id=bad)])
        fresh.expect_error("bad_id")
    fresh.close()
    client = RawClient(zctx, cluster.frontend, curve=curve(cluster, "office-1"))
    client.hello("office-1")
    sent = 0
    for bad in BAD_IDS:
        requests = [
            dict(t="OFFER", req=1, dataset=bad, snapshot="s1", image_size=MiB, chunk_size=MiB, chunk_count=1),
            dict(t="OFFER", req=2, dataset="fs", snapshot=bad, image_size=MiB, chunk_size=MiB, chunk_count=1),
            dict(t="OFFER", req=3, device_id=bad, dataset="fs", snapshot="s1", image_size=MiB, chunk_size=MiB,
                 chunk_count=1),
            dict(t="RESTORE", req=4, dataset=bad, snapshot="s1", window=MiB),
            dict(t="RESTORE", req=5, dataset="private", snapshot=bad, window=MiB),
            dict(t="LIST", device_id=bad),
            dict(t="QUERY", transfer_id=bad, start=0, hashes=[]),
            dict(t="COMMIT", transfer_id=bad, image_blake3=None),
        ]
        for fields in requests:
            client.send_frames([raw_header(**fields)])
            client.expect_error("bad_id")
            sent += 1
    client.close()
    # The operator socket refuses them too.
    for bad in ("../x", "a/b"):
        result = cluster.run("list", "--broker", cluster.status_endpoint, "--device", bad, "--json",
                             *cluster.operator_args())
        assert result.rc != 0 and result.stdout == "", str(result)
    # And the real restore command, asked for such a dataset, writes nothing anywhere.
    for bad in ("../x", "a/b", "../../../../../../tmp/speedsync-escape"):
        result = cluster.restore(cfg, bad, "s1", out)
        assert result.rc != 0 and not list(out.parent.iterdir()), str(result)
        result = cluster.restore(cfg, "private", bad, out)
        assert result.rc != 0 and not list(out.parent.iterdir()), str(result)

    status = cluster.status()
    assert status["broker"]["errors_by_code"].get("bad_id", 0) >= sent + len(BAD_IDS)
    assert not [t for t in status["transfers"] if t["device_id"] == "office-1"], "a refused request left a transfer"
    after = files_outside_data_dirs(cluster)
    assert after == before, f"files appeared outside the data dirs: {after - before}"
    assert {p for p in cluster.node_dir("node-a").rglob("*")} == node_files_before, "the worker's disk changed"
    assert not Path("/tmp/speedsync-escape").exists()
    # office-2's data is untouched and still restores.
    assert_restores(cluster, cluster.root / "configs" / "agent-office-2.yaml", "private", "s1",
                    cluster.private_digest, tmp_path)
