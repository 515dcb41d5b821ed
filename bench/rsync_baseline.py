"""The baseline: rsync with zstd compression to a loopback rsync daemon.

This is what an operator would set up without SpeedSync: an rsync daemon in
the cloud, and the appliance pushing each snapshot to one destination name,
so that rsync's rolling-checksum delta applies from the second snapshot on.
The daemon forks a child per connection and reaps it; its CPU is read from
`/proc/<daemon>/stat` (own + reaped children) once that child is gone.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

from roles.localprocs import ProcessGroup, children_of, cpu_seconds, wait_for

MODULE = "backup"
CLIENT_FLAGS = ["-z", "--compress-choice=zstd", "--stats"]


def client_flags(fsync: bool = False) -> list[str]:
    """What an operator would type; --fsync makes the daemon as durable as SpeedSync storage."""
    return CLIENT_FLAGS + (["--fsync"] if fsync else [])


def require_rsync() -> str | None:
    """Path of rsync, or None after printing how to install it."""
    path = shutil.which("rsync")
    if path is None:
        print("rsync is not installed; the baseline needs it. Install it with:\n"
              "    apt-get install -y rsync        (see bench/requirements-debian.txt)\n"
              "or run with --no-rsync to measure SpeedSync alone.")
    return path


@dataclass
class PushResult:
    ok: bool
    wall_s: float
    client_cpu_s: float
    daemon_cpu_s: float
    bytes_sent: int | None
    bytes_received: int | None
    detail: str


class RsyncDaemon:
    def __init__(self, procs: ProcessGroup, work_dir: str, port: int):
        self.procs = procs
        self.port = port
        self.dest_dir = os.path.join(work_dir, "rsync-dest")
        os.makedirs(self.dest_dir, exist_ok=True)
        self.config = os.path.join(work_dir, "rsyncd.conf")
        with open(self.config, "w") as f:
            f.write(f"pid file = {work_dir}/rsyncd.pid\n"
                    f"log file = {work_dir}/rsyncd.log\n"
                    "use chroot = no\nuid = root\ngid = root\n"
                    f"[{MODULE}]\n    path = {self.dest_dir}\n    read only = no\n")
        self.url = f"rsync://127.0.0.1:{port}/{MODULE}/"
        self.proc = None

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = self.procs.start("rsyncd", [
            "rsync", "--daemon", "--no-detach", f"--config={self.config}",
            f"--port={self.port}", "--address=127.0.0.1"])

        def answers():
            self.procs.require_running("rsyncd")
            return self.procs.run("rsync-probe", ["rsync", self.url], timeout_s=10).returncode == 0

        wait_for(answers, timeout_s, "the rsync daemon to list its module", interval_s=0.1)
        self.wait_idle()

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until the daemon has reaped every connection child."""
        wait_for(lambda: not children_of(self.proc.pid), timeout_s, "rsync daemon children to end")

    def push(self, src: str, dest_name: str, timeout_s: float, fsync: bool = False) -> PushResult:
        """Send src to <module>/<dest_name>; measure client and daemon."""
        self.wait_idle()
        daemon_before = cpu_seconds(self.proc.pid)
        run = self.procs.run("rsync-client", ["rsync", *client_flags(fsync), src, self.url + dest_name],
                             timeout_s=timeout_s)
        self.wait_idle()
        daemon_cpu = cpu_seconds(self.proc.pid) - daemon_before
        return PushResult(
            ok=run.returncode == 0,
            wall_s=run.wall_s,
            client_cpu_s=run.cpu_s,
            daemon_cpu_s=daemon_cpu,
            bytes_sent=_stat(run.stdout, "Total bytes sent"),
            bytes_received=_stat(run.stdout, "Total bytes received"),
            detail=f"rsync exit {run.returncode}: {run.stderr.strip()[-500:]}" if run.returncode else "")


def command_line(fsync: bool = False) -> str:
    return "rsync " + " ".join(client_flags(fsync)) + f" SRC rsync://HOST:PORT/{MODULE}/image.img"


def _stat(stats: str, label: str) -> int | None:
    m = re.search(re.escape(label) + r":\s*([\d,.]+)", stats)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else None
