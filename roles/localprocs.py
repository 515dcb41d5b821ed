"""Child processes for the demo, benches and tests: start, measure, wait for conditions, clean up.

CPU time is read where the kernel keeps it: a long-running server's
`/proc/<pid>/stat` (its threads plus the children it has reaped), and a
short command's own rusage from `os.wait4` when it ends, so one measurement
never counts another process.  Linux only.  Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held open together, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()   # fields from 3 (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid's threads and of its reaped children, in seconds."""
    fields = _stat_fields(pid)
    # stat fields 14..17 (utime, stime, cutime, cstime); our list starts at field 3
    return sum(int(x) for x in fields[11:15]) / _TICKS_PER_S


def peak_rss_bytes(pid: int) -> int:
    """High-water mark of pid's resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def children_of(pid: int) -> list[int]:
    """Live (not yet reaped) children of pid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat_fields(int(name))[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05, on_timeout=None):
    """Poll condition() until it returns a true value (returned); else TimeoutError
    naming `what` (and what `on_timeout()` says, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(interval_s)


@dataclass
class Finished:
    """A command that ran to its end."""
    returncode: int
    wall_s: float
    cpu_s: float          # user + system of it and its reaped children
    max_rss_bytes: int    # its own (or its largest child's) peak resident memory
    stdout: str
    stderr: str


class ProcessGroup:
    """Every process a bench starts; `close()` ends them all (TERM, then KILL)."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a server; its stdout and stderr go to <log_dir>/<name>.log."""
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, **kw)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def run(self, name: str, argv: list[str], timeout_s: float, **kw) -> Finished:
        """Run a command to its end, measuring wall and CPU time precisely."""
        out_path = os.path.join(self.log_dir, f"{name}.out")
        err_path = os.path.join(self.log_dir, f"{name}.err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, **kw)
            self.procs[name] = proc
            deadline = t0 + timeout_s
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    self.stop(name)
                    raise TimeoutError(f"{name} did not finish within {timeout_s:.0f}s: {' '.join(argv)}")
                time.sleep(0.01)
            wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
        del self.procs[name]
        with open(out_path, errors="replace") as f:
            stdout = f.read()
        with open(err_path, errors="replace") as f:
            stderr = f.read()
        return Finished(proc.returncode, wall, usage.ru_utime + usage.ru_stime,
                        usage.ru_maxrss * 1024, stdout, stderr)

    def require_running(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 25) -> str:
        for suffix in (".log", ".err"):
            path = os.path.join(self.log_dir, name + suffix)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    return "".join(f.readlines()[-lines:])
        return "(no log)"

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """End every process still running, newest first."""
        for name in reversed(list(self.procs)):
            self.stop(name)
