"""End to end: the seeded decoder fuzz against a live broker over a real socket (issue 4, item 8).

The cases are the in-process fuzz's (tests/fuzzcases.py), 100,000 of them,
sent from one raw DEALER to the broker's agent socket, pipelined (a bounded
number outstanding, so nothing is dropped at a high-water mark). Without
HELLO among the samples that session never registers, so every case must be
answered exactly once: an ERROR with a stable code, counted in status.
Meanwhile (for at least half the cases) a real agent replicates, and a well-behaved session keeps asking
for its catalog: the agent's upload is exactly what it would be alone, the
session's answers never change, and the broker's memory stays flat.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

from roles.sampleimages import generate_image
from bus.errors import CODES
from schemas import decode
from tests.fuzzcases import cases, valid_samples
from tests.harness import MiB, RawClient, assert_restores, distinct_nonzero_chunks, uploads_of

class WellBehavedSession(threading.Thread):
    """A registered device session on its own thread: asks for its catalog every `interval_s`,
    answers heartbeats, records every answer and how long it took, and says BYE at the end."""

    def __init__(self, ctx, endpoint: str, device_id: str, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.ctx, self.endpoint, self.device_id, self.interval_s = ctx, endpoint, device_id, interval_s
        self.answers: list = []
        self.latencies_s: list[float] = []
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.registered = threading.Event()

    def run(self) -> None:
        client = RawClient(self.ctx, self.endpoint)
        try:
            client.hello(self.device_id)
            self.registered.set()
            while not self.stopping.is_set():
                asked = time.monotonic()
                client.send("LIST")
                reply = client.receive(5)
                if reply is None or reply.t != "LIST_REPLY":
                    self.failure = f"LIST answered with {reply}"
                    return
                self.latencies_s.append(time.monotonic() - asked)
                self.answers.append(reply["snapshots"])
                self.stopping.wait(self.interval_s)
            client.send("BYE")  # an orderly goodbye: the broker stops heartbeating a closed socket
        except Exception as exc:  # reported by the test, never lost in a thread
            self.failure = repr(exc)
        finally:
            client.close()


LIVE_CASES = 100_000
FUZZ_SEED = int(os.environ.get("SPEEDSYNC_FUZZ_SEED", "4040404"))
OUTSTANDING = 1000  # cases sent and not yet answered, at most
MAX_BROKER_GROWTH = 16 * MiB


def test_live_broker_answers_100k_fuzz_cases_and_serves_a_real_agent_unaffected(cluster, zctx, tmp_path):
    seed = FUZZ_SEED
    print(f"live fuzz seed {seed} (SPEEDSYNC_FUZZ_SEED={seed} replays it)")
    # A slow disk keeps the real upload going while the fuzz runs.
    cluster.start(fault_write_rate="4MB")
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), 48 * MiB, seed=90, zero_fraction=0.2, text_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    other = cluster.dataset_dir("office-2", "mail")
    generate_image(str(other / "s1.img"), MiB, seed=91)
    rc, _, stderr = cluster.run_agent_once(cluster.agent_config("office-2", [{"name": "mail", "path": other}]))
    assert rc == 0, stderr
    expected_list = cluster.catalog("office-2")
    neighbour = WellBehavedSession(zctx, cluster.frontend, "office-2")  # its answers must not change
    neighbour.start()
    assert neighbour.registered.wait(10), neighbour.failure
    with cluster.rss_sampler("broker") as idle:
        cluster.wait_for(lambda: len(idle.samples) >= 10, 10, "idle memory samples")
    idle_rss = max(idle.samples)

    agent = cluster.start_agent_once(cfg)
    cluster.wait_for(lambda: any(t["state"] == "active" for t in cluster.transfers("office-1")), 30,
                     "the real agent's upload under way")
    fuzzer = RawClient(zctx, cluster.frontend)
    codes, answered, sent = Counter(), 0, 0
    overlapped = 0
    started = time.monotonic()
    with cluster.rss_sampler("broker", interval_s=0.1) as busy:
        for frames in cases(seed, LIVE_CASES, valid_samples(include_hello=False)):
            fuzzer.send_frames(frames)
            sent += 1
            while sent - answered >= OUTSTANDING or (sent == LIVE_CASES and answered < sent):
                assert fuzzer.sock.poll(10_000), f"seed {seed}: no answer to case {answered} of {sent} sent"
                reply = decode(fuzzer.sock.recv_multipart())
                assert reply.t == "ERROR" and reply["code"] in CODES, f"seed {seed}: {reply}"
                assert "Traceback" not in reply["reason"]
                codes[reply["code"]] += 1
                answered += 1
            if sent % 1000 == 0 and agent.poll() is None:
                overlapped = sent
    seconds = time.monotonic() - started
    fuzzer.close()
    neighbour.stopping.set()
    neighbour.join(10)
    print(f"{LIVE_CASES} live cases in {seconds:.1f}s ({LIVE_CASES / seconds:.0f}/s): {dict(codes)}")

    assert answered == LIVE_CASES
    assert codes["not_registered"] > 0 and len(codes) >= 5, codes  # valid and invalid messages alike
    assert overlapped >= LIVE_CASES // 2, f"the real upload ran during only {overlapped} cases"
    assert neighbour.failure is None, neighbour.failure
    growth = busy.peak - idle_rss
    print(f"broker RSS idle {idle_rss / MiB:.1f} MiB, peak during the fuzz {busy.peak / MiB:.1f} MiB; "
          f"good session: {len(neighbour.answers)} LISTs, slowest {max(neighbour.latencies_s) * 1000:.0f} ms")
    assert growth <= MAX_BROKER_GROWTH, f"broker RSS grew {growth / MiB:.1f} MiB during the fuzz"
    status = cluster.status()
    assert status["broker"]["dropped_messages"] == 0
    assert status["broker"]["errors_by_code"] == dict(codes), "every refusal counted, and only those"
    assert len(neighbour.answers) >= 20 and all(a == expected_list for a in neighbour.answers), \
        (expected_list, [a for a in neighbour.answers if a != expected_list][:2])
    slowest = max(neighbour.latencies_s)
    assert slowest < 1.0, f"the broker kept a well-behaved session waiting {slowest:.2f}s"

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=120)
    assert rc == 0, log
    (t,) = doc["transfers"]
    assert t["state"] == "committed" and t["chunks_sent"] == distinct_nonzero_chunks(directory / "s1.img"), t
    (upload,) = uploads_of(cluster.status(), "office-1", "fileserver", "s1")
    assert upload["state"] == "committed" and not upload.get("reason"), upload
    assert cluster.status()["broker"]["errors_by_code"] == dict(codes), "the real agent was refused something"
    (entry,) = cluster.catalog("office-1")
    assert entry["blake3"] == digest
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
