"""The live fuzz at any size: `python bench/fuzz.py --cases 100000 [--seed N]`.

Runs tests/test_e2e_fuzz.py's fuzzer (an enrolled device and an enrolled
storage node under CURVE, registered first, hostile versions of every message
type) against a real broker and node, while a real agent replicates a 48 MiB
snapshot, then restores it. Prints cases per second, the count per type of
cases that got past decode into a handler, the answers by code, and the
broker's RSS before and at its peak; exits 1 if any type was never reached,
a role died, or the restore differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make `tests` and `schemas` importable
    sys.path.insert(0, REPO)

import zmq  # noqa: E402

from roles.controller.core import DISPATCH  # noqa: E402
from roles.sampleimages import generate_image  # noqa: E402
from tests.harness import MiB, Cluster, assert_restores  # noqa: E402
from tests.test_e2e_fuzz import FUZZ_SEED, run_live_fuzz  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases in all (2/3 agent side, 1/3 node side)")
    parser.add_argument("--seed", type=int, default=FUZZ_SEED)
    args = parser.parse_args(argv)
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="speedsync-fuzz-") as work:
        cluster = Cluster(Path(work), secure=True)
        try:
            cluster.enroll("fuzz-node", "node")
            cluster.start(devices=("office-1", "fuzzer"), fault_write_rate="2MB")
            directory = cluster.dataset_dir("office-1", "fileserver")
            digest = generate_image(str(directory / "s1.img"), 48 * MiB, seed=90, zero_fraction=0.2,
                                    text_fraction=0.0)
            cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
            with cluster.rss_sampler("broker") as idle:
                cluster.wait_for(lambda: len(idle.samples) >= 10, 10, "idle memory samples")
            cluster.start_agent_once(cfg)
            cluster.wait_for(lambda: any(t["state"] == "active" for t in cluster.transfers("office-1")), 30,
                             "the real agent's upload under way")
            victims = [t["transfer_id"] for t in cluster.transfers("office-1")]
            with cluster.rss_sampler("broker", interval_s=0.1) as busy:
                result = run_live_fuzz(cluster, ctx, args.seed, args.cases * 2 // 3, args.cases // 3, victims)
            print(f"seed {args.seed}: {result['cases']} cases in {result['seconds']:.1f}s "
                  f"({result['cases'] / result['seconds']:.0f}/s)")
            for side in ("agent", "node"):
                print(f"past decode into a handler, {side} side: {dict(sorted(result[side].items()))}")
            print(f"answers: {dict(result['codes'])}")
            print(f"broker RSS idle {max(idle.samples) / MiB:.1f} MiB, peak {busy.peak / MiB:.1f} MiB")
            missed = [(side, t) for side in ("agent", "node") for t in DISPATCH[side] if not result[side][t]]
            rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=600)
            dead = cluster.dead_processes()
            assert_restores(cluster, cfg, "fileserver", "s1", digest, Path(work))
            print(f"real agent: rc {rc}, restored identical; roles dead: {dead or 'none'}")
            return 1 if missed or dead or rc != 0 or result["codes"]["not_registered"] else 0
        finally:
            cluster.stop()
            ctx.term()


if __name__ == "__main__":
    sys.exit(main())
