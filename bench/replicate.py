"""Replication bench: SpeedSync against rsync+zstd, in the same run, same data.

    python bench/replicate.py [--size 1GiB] [--workdir DIR] [--keep] [--no-rsync]

1. generates a realistic image as snapshot s0001 and an incremental s0002
   (about 2% of its 1 MiB chunks changed), with roles/sampleimages.py;
2. starts the real SpeedSync commands (broker, one storage worker) on free
   loopback ports and runs `agent --once --json` twice: with s0001 only, then
   after s0002 is renamed into the dataset directory; restores s0002 and
   checks its blake3;
3. pushes the same two files with rsync -z --compress-choice=zstd to a
   loopback rsync daemon, onto one destination name so rsync's delta applies;
4. prints, per phase, image MB/s, CPU seconds per GB of image of each process
   and bytes sent, and the SpeedSync/rsync ratios.

Exit status: 0 all replicated and verified, 1 a replication or the restore
check failed, 2 a prerequisite is missing, 130 interrupted.  Every process
started is ended and the work directory removed (unless --keep), also on
failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:       # run as a script: make `bench` importable
    sys.path.insert(0, REPO)

from roles.sampleimages import MiB, file_blake3, generate_image, mutate_chunks, parse_size  # noqa: E402
from roles.localprocs import ProcessGroup, cpu_seconds, free_ports, peak_rss_bytes, wait_for  # noqa: E402
from bench import rsync_baseline  # noqa: E402

MB, GB = 10**6, 10**9
DATASET, DEVICE, NODE = "fileserver", "office-1", "node-a"


@dataclass
class Phase:
    """One measured replication of one snapshot."""
    name: str
    ok: bool
    wall_s: float
    image_bytes: int
    cpu_s: dict = field(default_factory=dict)     # role -> CPU seconds during the phase
    bytes_sent: int | None = None
    bytes_received: int | None = None
    detail: str = ""
    peak_rss: dict = field(default_factory=dict)  # role -> bytes, high-water mark so far

    @property
    def mb_per_s(self) -> float:
        return self.image_bytes / MB / self.wall_s if self.wall_s > 0 else float("inf")

    def cpu_per_gb(self, role: str) -> float | None:
        return self.cpu_s[role] / (self.image_bytes / GB) if role in self.cpu_s else None


@dataclass
class Images:
    dataset_dir: str
    staged_s0002: str
    staged_changes: str | None     # s0002.changes sidecar, with --cbt
    size: int
    blake3: dict            # snapshot id -> hex
    changed_chunks: int


# ------------------------------------------------------------------ data

def make_images(work: str, size: int, seed: int, change_fraction: float, cbt: bool) -> Images:
    """s0001 in the dataset directory; s0002 staged beside it, renamed in later."""
    dataset_dir = os.path.join(work, "snapshots", DATASET)
    staging = os.path.join(work, "staging")
    os.makedirs(dataset_dir)
    os.makedirs(staging)
    t0 = time.monotonic()
    s1 = os.path.join(dataset_dir, "s0001.img")
    digests = {"s0001": generate_image(s1, size, seed)}
    chunks = -(-size // MiB)
    changed = random.Random(seed).sample(range(chunks), max(1, round(chunks * change_fraction)))
    s2 = os.path.join(staging, "s0002.img")
    changes = os.path.join(staging, "s0002.changes") if cbt else None
    digests["s0002"] = mutate_chunks(s1, s2, changed, MiB, seed, changes)
    print(f"images: {size / MB:.0f} MB each, {len(changed)} of {chunks} chunks changed in s0002, "
          f"generated in {time.monotonic() - t0:.1f}s")
    return Images(dataset_dir, s2, changes, size, digests, len(changed))


# ------------------------------------------------------------------ SpeedSync

class SpeedSyncCluster:
    """The real commands: one broker, one storage worker, agents run on demand."""

    def __init__(self, procs: ProcessGroup, python: str, work: str, dataset_dir: str):
        self.procs, self.python = procs, python
        front, back, status = free_ports(3)
        self.status_endpoint = f"tcp://127.0.0.1:{status}"
        var = os.path.join(work, "var")
        self.configs = {
            "broker": {"frontend_bind": f"tcp://127.0.0.1:{front}",
                       "backend_bind": f"tcp://127.0.0.1:{back}",
                       "status_bind": self.status_endpoint,
                       "data_dir": os.path.join(var, "broker"), "insecure": True},
            "storage": {"node_id": NODE, "broker": f"tcp://127.0.0.1:{back}",
                        "data_dir": os.path.join(var, NODE), "insecure": True},
            "agent": {"device_id": DEVICE, "brokers": [f"tcp://127.0.0.1:{front}"],
                      "state_dir": os.path.join(var, DEVICE), "insecure": True,
                      "datasets": [{"name": DATASET, "path": dataset_dir, "priority": 1}]},
        }
        self.config_files = {}
        for role, config in self.configs.items():
            path = os.path.join(work, f"{role}.yaml")
            with open(path, "w") as f:
                json.dump(config, f, indent=2)      # JSON is YAML
            self.config_files[role] = path

    def roles(self, *args: str) -> list[str]:
        return [self.python, "-m", "roles", *args]

    def start(self, timeout_s: float) -> None:
        for role in ("broker", "storage"):
            self.procs.start(role, self.roles(role, "--config", self.config_files[role]), cwd=REPO)
        wait_for(self.storage_alive, timeout_s, f"storage {NODE} alive in broker status", interval_s=0.1)

    def storage_alive(self) -> bool:
        for role in ("broker", "storage"):
            self.procs.require_running(role)
        run = self.procs.run("status", self.roles("status", "--broker", self.status_endpoint, "--json"),
                             timeout_s=30, cwd=REPO)
        if run.returncode != 0:
            return False
        try:
            status = json.loads(run.stdout)
        except ValueError:
            return False
        return any(node.get("node_id") == NODE and node.get("alive") for node in status.get("storage", []))

    def server_cpu(self) -> dict:
        return {role: cpu_seconds(self.procs.procs[role].pid) for role in ("broker", "storage")}

    def replicate(self, name: str, snapshot: str, image_bytes: int, timeout_s: float) -> Phase:
        """Run `agent --once --json`; measure it and the servers during it."""
        before = self.server_cpu()
        run = self.procs.run("agent", self.roles("agent", "--config", self.config_files["agent"],
                                                 "--once", "--json"), timeout_s=timeout_s, cwd=REPO)
        after = self.server_cpu()
        cpu = {"sender": run.cpu_s, "broker": after["broker"] - before["broker"],
               "receiver": after["storage"] - before["storage"]}
        phase = Phase(name, run.returncode == 0, run.wall_s, image_bytes, cpu)
        phase.peak_rss = {"agent": run.max_rss_bytes,
                          **{role: peak_rss_bytes(self.procs.procs[role].pid) for role in ("broker", "storage")}}
        transfers = _agent_transfers(run.stdout)
        if run.returncode != 0:
            phase.detail = f"agent exit {run.returncode}: {_tail(run.stderr)}"
        elif transfers is None:
            phase.ok, phase.detail = False, f"agent printed no JSON summary: {_tail(run.stdout)}"
        else:
            phase.bytes_sent = sum(t.get("bytes_sent", 0) for t in transfers)
            mine = [t for t in transfers if t.get("snapshot") == snapshot]
            if not mine:
                phase.ok, phase.detail = False, f"{snapshot} missing from the agent's summary: {transfers}"
            else:
                t = mine[0]
                phase.detail = (f"{snapshot}: state {t.get('state')}, chunks sent {t.get('chunks_sent')}"
                                f"/{t.get('chunks_total')}, read {_mb(t.get('bytes_read'))}, "
                                f"agent's own timing {t.get('seconds', 0):.2f}s")
        return phase

    def restore(self, snapshot: str, expected: str, image_bytes: int, out: str,
                timeout_s: float) -> tuple[bool, str]:
        run = self.procs.run("restore", self.roles(
            "restore", "--config", self.config_files["agent"], "--dataset", DATASET,
            "--snapshot", snapshot, "--out", out), timeout_s=timeout_s, cwd=REPO)
        if run.returncode != 0:
            left = f" and left {out} behind (DESIGN: no FILE on failure)" if os.path.exists(out) else ""
            return False, f"restore exit {run.returncode}{left}: {_tail(run.stderr)}"
        if not os.path.exists(out):
            return False, f"restore exited 0 but wrote no {out}"
        got = file_blake3(out)
        os.unlink(out)
        if got != expected:
            return False, f"restored blake3 {got} != original {expected}"
        return True, (f"blake3 {expected[:16]}... matches; restored in {run.wall_s:.1f}s, "
                      f"{image_bytes / MB / run.wall_s:.0f} MB/s")


def _agent_transfers(stdout: str):
    """The `transfers` list of the agent's JSON summary, or None."""
    candidates = [stdout] + [line for line in reversed(stdout.splitlines()) if line.startswith("{")]
    for text in candidates:
        try:
            summary = json.loads(text)
        except ValueError:
            continue
        if isinstance(summary, dict) and isinstance(summary.get("transfers"), list):
            return summary["transfers"]
    return None


def _print_server_logs(procs: ProcessGroup) -> None:
    for role in ("broker", "storage"):
        print(f"--- {role} log (tail) ---\n{procs.log_tail(role)}", file=sys.stderr)


def run_speedsync(procs: ProcessGroup, python: str, work: str, images: Images,
                  timeout_s: float) -> tuple[list[Phase], bool, str]:
    cluster = SpeedSyncCluster(procs, python, work, images.dataset_dir)
    cluster.start(timeout_s=60)
    try:
        full = cluster.replicate("SpeedSync full", "s0001", images.size, timeout_s)
        if images.staged_changes:     # the sidecar first: the image is complete once named
            os.rename(images.staged_changes, os.path.join(images.dataset_dir, "s0002.changes"))
        os.rename(images.staged_s0002, os.path.join(images.dataset_dir, "s0002.img"))
        incremental = cluster.replicate("SpeedSync incremental", "s0002", images.size, timeout_s)
        restore_dir = os.path.join(work, "restore")
        os.makedirs(restore_dir)
        verified, how = cluster.restore("s0002", images.blake3["s0002"], images.size,
                                        os.path.join(restore_dir, "s0002.img"), timeout_s)
    except BaseException:
        _print_server_logs(procs)
        raise
    if not (full.ok and incremental.ok and verified):
        _print_server_logs(procs)
    for role in ("agent", "storage", "broker"):
        procs.stop(role)           # leave the CPU to the baseline
    return [full, incremental], verified, how


# ------------------------------------------------------------------ rsync

def run_rsync(procs: ProcessGroup, work: str, images: Images, timeout_s: float,
              fsync: bool) -> list[Phase]:
    daemon = rsync_baseline.RsyncDaemon(procs, work, free_ports(1)[0])
    daemon.start()
    phases = []
    s0002 = os.path.join(images.dataset_dir, "s0002.img")
    if not os.path.exists(s0002):
        s0002 = images.staged_s0002
    for name, src in (("rsync full", os.path.join(images.dataset_dir, "s0001.img")),
                      ("rsync incremental", s0002)):
        r = daemon.push(src, "image.img", timeout_s, fsync)
        phases.append(Phase(name, r.ok, r.wall_s, images.size,
                            {"sender": r.client_cpu_s, "receiver": r.daemon_cpu_s},
                            r.bytes_sent, r.bytes_received, r.detail))
    landed = os.path.join(daemon.dest_dir, "image.img")
    if phases[-1].ok and file_blake3(landed) != file_blake3(s0002):
        phases[-1].ok, phases[-1].detail = False, "rsync's copy differs from s0002"
    procs.stop("rsyncd")
    return phases


# ------------------------------------------------------------------ report

def _mb(n) -> str:
    return "-" if n is None else f"{n / MB:,.1f} MB"


def _tail(text: str, chars: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_report(images: Images, phases: list[Phase], verified, how: str, rsync_fsync: bool) -> None:
    print()
    print(f"image {images.size / MB:,.1f} MB ({images.size / MiB:,.0f} MiB), s0002 changes "
          f"{images.changed_chunks} chunks of 1 MiB.  MB = 10^6 bytes, GB = 10^9 bytes of image.")
    if any(p.name.startswith("rsync") for p in phases):
        durability = ("--fsync: the daemon fsyncs each file, as SpeedSync storage fsyncs each chunk"
                      if rsync_fsync else "no --fsync: rsync does not fsync, SpeedSync storage does")
        print(f"rsync baseline: {rsync_baseline.command_line(rsync_fsync)}\n"
              f"  to an rsync daemon on loopback, one destination name, no --inplace (the delta "
              f"applies from s0002 on); {durability}")
    print("CPU s/GB: sender = agent | rsync client, broker = SpeedSync broker, "
          "receiver = storage worker | rsync daemon (incl. its forked children)")
    head = (f"{'phase':<22} {'ok':<4} {'wall s':>8} {'MB/s':>8} {'sender':>8} {'broker':>8} "
            f"{'receiver':>9} {'total':>8} {'bytes sent':>15} {'bytes recv':>13}")
    print(head)
    print("-" * len(head))
    for p in phases:
        total = sum(p.cpu_s.values()) / (p.image_bytes / GB)
        print(f"{p.name:<22} {'ok' if p.ok else 'FAIL':<4} {p.wall_s:>8.2f} {p.mb_per_s:>8.1f} "
              f"{_num(p.cpu_per_gb('sender'), '8.2f'):>8} {_num(p.cpu_per_gb('broker'), '8.2f'):>8} "
              f"{_num(p.cpu_per_gb('receiver'), '9.2f'):>9} {total:>8.2f} "
              f"{_num(p.bytes_sent, ',d'):>15} {_num(p.bytes_received, ',d'):>13}")
    by_name = {p.name: p for p in phases}
    for kind in ("full", "incremental"):
        ours, theirs = by_name.get(f"SpeedSync {kind}"), by_name.get(f"rsync {kind}")
        if ours and theirs and ours.ok and theirs.ok:
            sent = (f"{ours.bytes_sent / theirs.bytes_sent:.3f}"
                    if ours.bytes_sent is not None and theirs.bytes_sent else "-")
            cpu = sum(ours.cpu_s.values()) / max(sum(theirs.cpu_s.values()), 1e-9)
            print(f"SpeedSync/rsync {kind:<12}: MB/s x{ours.mb_per_s / theirs.mb_per_s:.2f}, "
                  f"bytes sent x{sent}, total CPU x{cpu:.2f}")
    for p in phases:
        if p.detail:
            print(f"  {p.name}: {p.detail}")
        if p.peak_rss:
            print(f"  {p.name}: peak RSS so far " +
                  ", ".join(f"{role} {rss / MiB:.0f} MiB" for role, rss in p.peak_rss.items()))
    if verified is not None:
        print(f"restore s0002: {'OK' if verified else 'FAIL'} ({how})")


# ------------------------------------------------------------------ main

def default_python() -> str:
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else sys.executable


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SpeedSync vs rsync+zstd replication bench.")
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="image size (default 1GiB)")
    p.add_argument("--workdir", default=None, help="parent of the temporary work directory")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--change", type=float, default=0.02, help="fraction of chunks changed in s0002")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per phase")
    p.add_argument("--python", default=default_python(), help="interpreter that runs `-m roles`")
    p.add_argument("--cbt", action="store_true",
                   help="also give s0002 a .changes sidecar (changed-block tracking)")
    p.add_argument("--no-rsync", action="store_true", help="skip the rsync baseline")
    p.add_argument("--rsync-fsync", action="store_true",
                   help="give rsync --fsync, as durable as SpeedSync (default: plain rsync)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = p.parse_args(argv)

    if not args.no_rsync and rsync_baseline.require_rsync() is None:
        return 2
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="speedsync-bench-", dir=args.workdir)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    procs = ProcessGroup(logs)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        images = make_images(work, args.size, args.seed, args.change, args.cbt)
        phases, verified, how = run_speedsync(procs, args.python, work, images, args.timeout)
        if not args.no_rsync:
            phases += run_rsync(procs, work, images, args.timeout, args.rsync_fsync)
        print_report(images, phases, verified, how, args.rsync_fsync)
        return 0 if verified and all(ph.ok for ph in phases) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
