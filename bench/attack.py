"""An honest commit's time and the roles' memory under an enrolled attacker:
`python bench/attack.py [--size 16MiB] [--rounds 3] [--json]`.

Issue 11, "what it must show" item 2, with figures (tests/test_e2e_attack.py
shows the behaviour, without times). One run, one machine, the test's cluster:
CURVE, enrolled keys, a broker with a 1 MiB restore window and a 1.5 s restore
idle timeout, one storage node. "office-1" commits `--rounds` fresh snapshots
of `--size` (each its own dataset, so every round is a full first upload)
with the real agent, first alone (the baseline), then while "mallory"
(tests/attacker.py) attacks all the while: oversized and nested headers, an
OFFER flood past its upload budget and of a PiB, QUERY amplification of the
biggest image the test uses (64 GiB or half the node's free space, all nil
names, then a COMMIT whose answer needs them all hashed), QUERY floods past
its rate, and a restore on a second connection it never reads. Headers and
QUERY floods go on while each honest agent runs; the amplifier and the unread
restore are renewed between rounds once they have ended.

Prints the medians of the agent's commit seconds (OFFER to COMMITTED, from
its --json) and of the agent process's wall time, the ratio attack/baseline
against the issue's 3x, the broker's and node's VmRSS before the attack, at
its peak (sampled every 50 ms) and after (mallory gone, its transfers ended),
and their CPU seconds over the baseline rounds and over the attack (the
node's shows the amplifier's zeros being hashed; "attacker" is this process,
mallory's own cost, on the same cores). Timings are never asserted:
exit 0 when every honest snapshot committed, the last restores identical and
no role died, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make `tests` and `schemas` importable
    sys.path.insert(0, REPO)

import zmq  # noqa: E402

from roles.controller.transfers import LIVE_STATES  # noqa: E402
from roles.sampleimages import generate_image  # noqa: E402
from roles.units import parse_size  # noqa: E402
from schemas.messages import MAX_CHUNK_SIZE, MAX_HASHES_PER_QUERY  # noqa: E402
from tests.attacker import Attacker  # noqa: E402
from tests.harness import MiB, Cluster, assert_restores  # noqa: E402

TARGET_RATIO = 3.0  # the bound on attack/baseline
ROLES = ("broker", "node-a")
RESTORE_IDLE_TIMEOUT_MS = 1500  # as in the test: mallory's unread restore is timed out and renewed


def prepare_round(cluster: Cluster, size: int, label: str, seed: int) -> dict:
    """A fresh snapshot of office-1 in a dataset of its own, and the agent's config for it."""
    dataset = f"ds-{label}"
    directory = cluster.dataset_dir("office-1", dataset)
    digest = generate_image(str(directory / "s1.img"), size, seed=seed, zero_fraction=0.1, text_fraction=0.3)
    cfg = cluster.agent_config("office-1", [{"name": dataset, "path": directory}], config_name=f"office-1-{label}")
    return {"label": label, "cfg": cfg, "dataset": dataset, "digest": digest}


def honest_round(cluster: Cluster, prepared: dict, attack=None) -> dict:
    """Commit a prepared snapshot with the real agent; `attack()` is called until the agent exits."""
    label = prepared["label"]
    started = time.monotonic()
    proc = cluster.start_agent_once(prepared["cfg"])
    while proc.poll() is None:
        if attack is None:
            time.sleep(0.02)  # only the agent's exit is awaited: a bench, not a test
        else:
            attack()
    wall_s = time.monotonic() - started
    rc, doc, log = cluster.finish_agent(f"agent-office-1-{label}")
    transfers = (doc or {}).get("transfers", [])
    committed = rc == 0 and [t["state"] for t in transfers] == ["committed"]
    if not committed:
        print(f"{label}: the honest agent did not commit (rc {rc}): {transfers}\n{log[-3000:]}", file=sys.stderr)
    return {**prepared, "committed": committed, "seconds": transfers[0]["seconds"] if transfers else None,
            "wall_s": round(wall_s, 3)}


class Siege:
    """mallory's attacks, set up once and kept going (tests/attacker.py does each one).

    Once mallory is welcomed, nothing here waits on anything but mallory's own sockets (no status
    command): mallory beats only while it pumps, and a silence past the broker's liveness would
    unregister it and end the attack.
    """

    def __init__(self, ctx, cluster: Cluster, amplify_bytes: int, restore_idle_timeout_s: float):
        self.mallory = Attacker(ctx, cluster)
        self.amplify_bytes = amplify_bytes
        self.restore_every_s = 2 * restore_idle_timeout_s  # by then the broker has timed the last one out
        self.restore_at = 0.0
        self.amplifier: str | None = None
        self.amplified_bytes = 0
        self.amplifiers = 0
        self.restores = 0
        self.offers: Counter = Counter()

    def start(self) -> None:
        self.mallory.hello()
        self.mallory.headers()
        self.amplify()
        self.offers += self.mallory.offer_flood(20)
        self.mallory.query_flood(500)
        self.restore()

    def amplify(self) -> None:
        self.amplifiers += 1
        self.amplifier, _ = self.mallory.amplify(self.amplify_bytes, snapshot=f"huge{self.amplifiers}")
        self.amplified_bytes += self.amplify_bytes

    def restore(self) -> None:
        if self.mallory.idle is not None:
            self.mallory.idle.close()
        self.restores += 1
        self.restore_at = time.monotonic()
        self.mallory.restore_unread("own", "m1")

    def step(self) -> None:
        """While an honest agent runs: headers and a QUERY flood, heartbeats on both connections."""
        self.mallory.headers()
        self.mallory.query_flood(50)
        self.mallory.pump(0.05)

    def renew(self) -> None:
        """Between rounds: a new amplifier once the last one's zeros are hashed, a new unread restore
        once the broker has timed the last one out."""
        if self.mallory.commit_answered(self.amplifier):
            self.mallory.abort(self.amplifier)  # frees its upload slot for the next
            self.amplify()
        if time.monotonic() - self.restore_at >= self.restore_every_s:
            self.restore()

    def stop(self) -> None:
        for msg in list(self.mallory.replies):
            if msg.t == "ACCEPT":
                self.mallory.abort(msg["transfer_id"])
        self.mallory.pump(0.5)
        self.mallory.close()


def cpu_s(cluster: Cluster, role: str) -> float:
    """User plus system CPU seconds a role has used so far (/proc/<pid>/stat)."""
    with open(f"/proc/{cluster.procs[role].pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_figures(before: dict, during: dict, after: dict) -> dict:
    return {role: {"before_mib": round(before[role] / MiB, 1), "peak_mib": round(during[role].peak / MiB, 1),
                   "after_mib": round(after[role] / MiB, 1)} for role in ROLES}


def settle_rss(cluster: Cluster, samples: int = 10) -> dict:
    """Each role's median VmRSS over `samples` readings 50 ms apart."""
    with ExitStack() as stack:
        samplers = {role: stack.enter_context(cluster.rss_sampler(role)) for role in ROLES}
        cluster.wait_for(lambda: all(len(s.samples) >= samples for s in samplers.values()), 10, "memory samples")
    return {role: statistics.median(s.samples) for role, s in samplers.items()}


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def run(args, work: Path, ctx) -> dict:
    cluster = Cluster(work, secure=True)
    try:
        for device in ("office-1", "mallory"):
            cluster.enroll(device, "device")
        cluster.enroll("node-a", "node")
        cluster.start_broker(restore_window="1MiB", restore_idle_timeout_ms=RESTORE_IDLE_TIMEOUT_MS)
        cluster.start_storage("node-a")
        own = cluster.dataset_dir("mallory", "own")
        generate_image(str(own / "m1.img"), 4 * MiB, seed=111, zero_fraction=0.0, text_fraction=0.0)
        rc, _, stderr = cluster.run_agent_once(cluster.agent_config("mallory", [{"name": "own", "path": own}]))
        if rc != 0:
            raise RuntimeError(f"mallory's own snapshot did not commit: {stderr[-2000:]}")

        alone = [prepare_round(cluster, args.size, f"base{i}", 200 + i) for i in range(args.rounds)]
        cpu_at = {role: cpu_s(cluster, role) for role in ROLES}
        ours_at = time.process_time()
        baseline = [honest_round(cluster, round_) for round_ in alone]
        cpu_base = {role: cpu_s(cluster, role) - cpu_at[role] for role in ROLES}
        cpu_base["attacker"] = time.process_time() - ours_at
        rss_before = settle_rss(cluster)
        prepared = [prepare_round(cluster, args.size, f"attack{i}", 300 + i) for i in range(args.rounds)]
        free = next(n["free_bytes"] for n in cluster.status()["storage"] if n["node_id"] == "node-a")
        siege = Siege(ctx, cluster, min(MAX_HASHES_PER_QUERY * MAX_CHUNK_SIZE, free // 2),
                      RESTORE_IDLE_TIMEOUT_MS / 1000)
        with ExitStack() as stack:
            samplers = {role: stack.enter_context(cluster.rss_sampler(role)) for role in ROLES}
            cpu_at = {role: cpu_s(cluster, role) for role in ROLES}
            ours_at = time.process_time()
            siege.start()
            attacked = []
            for i, round_ in enumerate(prepared):
                if i:
                    siege.renew()
                attacked.append(honest_round(cluster, round_, siege.step))
            amplifier_pending = not siege.mallory.commit_answered(siege.amplifier)
            codes = dict(siege.mallory.codes)
            cpu_attack = {role: cpu_s(cluster, role) - cpu_at[role] for role in ROLES}
            cpu_attack["attacker"] = time.process_time() - ours_at  # this process: mallory, and the samplers
            siege.stop()
        cluster.wait_for(lambda: not [t for t in cluster.transfers("mallory") if t["state"] in LIVE_STATES],
                         60, "mallory's transfers ended")
        rss_after = settle_rss(cluster)

        last = attacked[-1]
        restored = False
        if last["committed"]:
            try:
                assert_restores(cluster, last["cfg"], last["dataset"], "s1", last["digest"], work)
                restored = True
            except AssertionError as exc:
                print(f"the last honest snapshot did not restore identical: {exc}", file=sys.stderr)
        dead = cluster.dead_processes()
        base_s, attack_s = median(r["seconds"] for r in baseline), median(r["seconds"] for r in attacked)
        ratio = round(attack_s / base_s, 2) if base_s and attack_s else None
        return {
            "size_bytes": args.size, "rounds": args.rounds,
            "baseline_seconds": [r["seconds"] for r in baseline], "attack_seconds": [r["seconds"] for r in attacked],
            "baseline_wall_s": [r["wall_s"] for r in baseline], "attack_wall_s": [r["wall_s"] for r in attacked],
            "baseline_median_s": base_s, "attack_median_s": attack_s, "ratio": ratio,
            "wall_ratio": round(median(r["wall_s"] for r in attacked) / median(r["wall_s"] for r in baseline), 2),
            "target_ratio": TARGET_RATIO, "within_target": ratio is not None and ratio <= TARGET_RATIO,
            "rss": rss_figures(rss_before, samplers, rss_after),
            "cpu_s": {role: {"baseline": round(cpu_base[role], 2), "attack": round(cpu_attack[role], 2)}
                      for role in (*ROLES, "attacker")},
            "attack": {"amplifiers": siege.amplifiers, "amplified_bytes": siege.amplified_bytes,
                       "amplifier_unanswered_at_end": amplifier_pending,
                       "unregistered": codes.get("not_registered", 0) > 0, "unread_restores": siege.restores,
                       "offers": dict(siege.offers), "codes": codes},
            "committed": all(r["committed"] for r in baseline + attacked), "restored_identical": restored,
            "dead_roles": dead,
        }
    finally:
        cluster.stop()


def print_table(doc: dict) -> None:
    print(f"honest snapshot {doc['size_bytes'] / MiB:.0f} MiB, {doc['rounds']} rounds each")
    print(f"{'':24}{'baseline':>12}{'attack':>12}{'ratio':>8}")
    print(f"{'commit s (median)':24}{doc['baseline_median_s']:>12.3f}{doc['attack_median_s']:>12.3f}"
          f"{doc['ratio']:>8.2f}")
    print(f"{'agent wall s (median)':24}{median(doc['baseline_wall_s']):>12.3f}{median(doc['attack_wall_s']):>12.3f}"
          f"{doc['wall_ratio']:>8.2f}")
    print(f"  commit s per round: baseline {doc['baseline_seconds']}, attack {doc['attack_seconds']}")
    verdict = "within" if doc["within_target"] else "NOT within"
    print(f"ratio {doc['ratio']} is {verdict} the issue's {doc['target_ratio']:.0f}x")
    print(f"{'RSS MiB':24}{'before':>12}{'peak':>12}{'after':>8}")
    for role, figures in doc["rss"].items():
        print(f"{role:24}{figures['before_mib']:>12.1f}{figures['peak_mib']:>12.1f}{figures['after_mib']:>8.1f}")
    print(f"{'CPU s':24}{'baseline':>12}{'attack':>12}")
    for role, figures in doc["cpu_s"].items():
        print(f"{role:24}{figures['baseline']:>12.2f}{figures['attack']:>12.2f}")
    attack = doc["attack"]
    print(f"attacker: {attack['amplifiers']} amplifier(s), {attack['amplified_bytes'] / 2**30:.1f} GiB of nil "
          f"names (last one still unanswered at the end: {attack['amplifier_unanswered_at_end']}), "
          f"{attack['unread_restores']} unread restore(s), offers {attack['offers']}, codes {attack['codes']}")
    if attack["unregistered"]:
        print("WARNING: the broker unregistered mallory during the run (not_registered): the attack did not "
              "last all the while")
    print(f"honest snapshots committed: {doc['committed']}, last restored identical: {doc['restored_identical']}, "
          f"roles dead: {doc['dead_roles'] or 'none'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=16 * MiB, help="the honest snapshot (16MiB, 64MiB...)")
    parser.add_argument("--rounds", type=int, default=3, help="honest commits without, then with, the attack")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    ctx = zmq.Context()
    try:
        with tempfile.TemporaryDirectory(prefix="speedsync-attack-") as work:
            doc = run(args, Path(work), ctx)
    finally:
        ctx.destroy(linger=0)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print_table(doc)
    return 0 if doc["committed"] and doc["restored_identical"] and not doc["dead_roles"] else 1


if __name__ == "__main__":
    sys.exit(main())
