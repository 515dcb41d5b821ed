"""End to end: a live fuzz under CURVE that reaches every handler (issue 11).

The fuzzer holds an enrolled device key ("fuzzer") and an enrolled storage
node key ("fuzz-node"), as a compromised appliance or node would. It says
HELLO (and READY) first, so its cases reach the handlers instead of stopping
at `not_registered`, then sends seeded hostile versions of every message type
the broker accepts from agents, and of every type it accepts from nodes
(tests/fuzzcases.py `hostile`: each field at and past its limit, wrong types,
missing and extra fields, oversized, deeply nested and huge-map headers,
flipped bytes, wrong payload counts, and the transfer ids of a real device's
upload). After a BYE or a HELLO/READY case it registers again, in order on
the same connection, so every case that decodes reaches its handler.

Meanwhile a real agent replicates: its transfer ids are among the targets, it
must commit exactly what it would alone and restore byte-identical (blake3);
no role dies, status answers, and the broker's RSS grows < 64 MiB. The count
per type of cases that got past decode into a handler is printed and each must
be > 0. `bench/fuzz.py --cases N` runs the same with more cases.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

from bus.errors import CODES, RemoteProtocolError
from bus.security import load_keypair, load_public
from roles.controller.core import DISPATCH
from roles.sampleimages import generate_image
from schemas import decode
from tests.fuzzcases import Targets, hostile
from tests.harness import MiB, RawClient, assert_restores, distinct_nonzero_chunks

FUZZ_SEED = int(os.environ.get("SPEEDSYNC_FUZZ_SEED", "4040404"))
AGENT_CASES = 24_000
NODE_CASES = 12_000
ROUND = 100  # agent cases between two PING/PONG barriers (bounds what is outstanding)
MAX_BROKER_GROWTH = 64 * MiB
DECODE_CODES = {"bad_frames", "too_large", "bad_header", "bad_version", "unknown_type", "bad_field", "bad_id"}


def curve(cluster, key_name: str):
    return load_keypair(cluster.keys / f"{key_name}.key_secret"), load_public(cluster.keys / "broker.key")


class Fuzzer:
    """One registered hostile peer: sends cases, re-registers after BYE or HELLO/READY, counts replies."""

    def __init__(self, client: RawClient, side: str, name: str, register):
        self.client, self.side, self.name, self.register = client, side, name, register
        self.reached: Counter = Counter()  # type -> cases that decoded, sent on a registered session
        self.codes: Counter = Counter()  # ERROR codes it was answered with
        self.sent = 0

    def send_case(self, rng: random.Random, targets: Targets) -> None:
        t = rng.choice(sorted(DISPATCH[self.side]))
        _, frames = hostile(rng, t, targets)
        try:
            decode(frames, receiver="broker")  # the broker's own entry point: what it will accept
            decoded = True
        except RemoteProtocolError:
            decoded = False
        self.client.send_frames(frames)
        self.sent += 1
        if decoded:
            self.reached[t] += 1
            if t in ("BYE", "HELLO", "READY"):
                self.register()

    def drain(self, until=None, timeout_s: float = 0.0) -> None:
        """Read what came back (answering heartbeats); with `until(msg)`, up to the first match."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.client.receive(max(0.0, deadline - time.monotonic()) if until else 0.001)
            if msg is None:
                assert until is None, f"{self.name}: no barrier answer within {timeout_s}s"
                return
            if msg.t == "ERROR":
                assert msg["code"] in CODES and "Traceback" not in msg["reason"], msg
                self.codes[msg["code"]] += 1
                assert msg["code"] != "not_registered", f"{self.name}: a case reached no handler: {msg}"
            if until is not None and until(msg):
                return


def run_live_fuzz(cluster, zctx, seed: int, agent_cases: int, node_cases: int, victim_ids: list[str],
                  on_round=lambda sent: None) -> dict:
    """Send the cases; return {"agent": reached, "node": reached, "codes": ..., "seconds": ...}.
    `on_round(agent cases sent)` runs after each barrier."""
    rng = random.Random(seed)
    agent = RawClient(zctx, cluster.frontend, curve=curve(cluster, "fuzzer"))
    agent.hello("fuzzer")
    agent.send("OFFER", req=1, dataset="fz", snapshot="s1", image_size=65536, chunk_size=4096, chunk_count=16)
    own = [agent.expect("ACCEPT")["transfer_id"]]
    node = RawClient(zctx, cluster.backend, curve=curve(cluster, "fuzz-node"))
    ready = dict(node_id="fuzz-node", window=MiB, free_bytes=1 << 30, used_bytes=0)
    node.send("READY", **ready)
    cluster.wait_for(lambda: cluster.node_alive("fuzz-node"), 20, "the fuzzing node registered")
    agents = Fuzzer(agent, "agent", "fuzzer", lambda: agent.send("HELLO", device_id="fuzzer"))
    nodes = Fuzzer(node, "node", "fuzz-node", lambda: node.send("READY", **ready))
    agent_targets = Targets("fuzzer", victim_ids, own)
    node_targets = Targets("fuzz-node", victim_ids, own)
    started = time.monotonic()
    seq = 0
    while agents.sent < agent_cases or nodes.sent < node_cases:
        for _ in range(min(ROUND, agent_cases - agents.sent)):
            agents.send_case(rng, agent_targets)
        for _ in range(min(ROUND * node_cases // agent_cases + 1, node_cases - nodes.sent)):
            nodes.send_case(rng, node_targets)
        seq += 1
        agent.send("PING", seq=seq, sent_us=0)
        agents.drain(until=lambda m, s=seq: m.t == "PONG" and m["seq"] == s, timeout_s=30)
        nodes.drain()
        on_round(agents.sent)
    seconds = time.monotonic() - started
    agent.send("BYE")
    node.send("BYE")
    agent.close()
    node.close()
    return {"agent": agents.reached, "node": nodes.reached, "codes": agents.codes + nodes.codes,
            "seconds": seconds, "cases": agents.sent + nodes.sent}


def test_live_fuzz_under_curve_reaches_every_handler_and_a_real_agent_is_unaffected(secure_cluster, zctx,
                                                                                      tmp_path):
    cluster = secure_cluster
    seed = FUZZ_SEED
    print(f"live fuzz seed {seed} (SPEEDSYNC_FUZZ_SEED={seed} replays it)")
    cluster.enroll("fuzz-node", "node")
    # A slow disk keeps the real upload going while the fuzz runs.
    cluster.start(devices=("office-1", "fuzzer"), fault_write_rate="2MB")
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), 48 * MiB, seed=90, zero_fraction=0.2, text_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    with cluster.rss_sampler("broker") as idle:
        cluster.wait_for(lambda: len(idle.samples) >= 10, 10, "idle memory samples")
    idle_rss = max(idle.samples)
    real = cluster.start_agent_once(cfg)
    cluster.wait_for(lambda: any(t["state"] == "active" for t in cluster.transfers("office-1")), 30,
                     "the real agent's upload under way")
    victim_ids = [t["transfer_id"] for t in cluster.transfers("office-1")]
    overlapped = [0]

    def while_real_runs(sent: int) -> None:
        if real.poll() is None:
            overlapped[0] = sent

    with cluster.rss_sampler("broker", interval_s=0.1) as busy:
        result = run_live_fuzz(cluster, zctx, seed, AGENT_CASES, NODE_CASES, victim_ids, while_real_runs)
    print(f"{result['cases']} live cases in {result['seconds']:.1f}s")
    print("past decode into a handler, agent side:", dict(sorted(result["agent"].items())))
    print("past decode into a handler, node side:", dict(sorted(result["node"].items())))
    print("answers:", dict(result["codes"]))
    growth = busy.peak - idle_rss
    print(f"broker RSS idle {idle_rss / MiB:.1f} MiB, peak during the fuzz {busy.peak / MiB:.1f} MiB")

    for side in ("agent", "node"):
        missed = [t for t in DISPATCH[side] if result[side][t] == 0]
        assert not missed, f"seed {seed}: no {side} case of {missed} reached its handler"
    # a case that decodes on an unregistered session is answered not_registered: none was
    assert result["codes"]["not_registered"] == 0, result["codes"]
    handler_codes = set(result["codes"]) - DECODE_CODES
    assert {"unknown_transfer", "forbidden"} <= handler_codes, f"refusals from handlers: {result['codes']}"
    assert overlapped[0] >= AGENT_CASES // 2, f"the real upload ran during only {overlapped[0]} cases"
    assert growth < MAX_BROKER_GROWTH, f"broker RSS grew {growth / MiB:.1f} MiB during the fuzz"
    assert cluster.status()["broker"] and cluster.node_alive("node-a") and not cluster.dead_processes()

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=180)
    assert rc == 0, log
    (t,) = doc["transfers"]
    assert t["state"] == "committed" and t["chunks_sent"] == distinct_nonzero_chunks(directory / "s1.img"), t
    (entry,) = cluster.catalog("office-1")
    assert entry["blake3"] == digest
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
