"""End-to-end harness: the real `python -m roles` processes on loopback.

A `Cluster` lives in one test's tmp_path. It writes each role's YAML from a
dict, starts the role with `sys.executable -m roles ...` on free ports, sends
its stderr to `logs/<name>.log`, waits for readiness by asking the broker's
status socket (the `status` command), never by sleeping, and at teardown
terminates every process it started (then kills what is left).

Commands a test runs to completion (`agent --once`, `restore`, `status`,
`list`) go through `run()`, which returns exit code, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# Short heartbeats keep failure detection fast; liveness is generous because
# the whole cluster shares two cores with the agents' hashing and compression.
HEARTBEAT_INTERVAL_MS = 200
HEARTBEAT_LIVENESS = 10


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together, so distinct)."""
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


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.1, on_timeout=None):
    """Poll condition() until it returns something true (returned), else fail with `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(interval_s)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def vm_rss_bytes(pid: int) -> int:
    """Resident memory of a live process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Result:
    """A finished command: exit code, stdout, stderr; `.json` parses stdout."""

    args: list
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.args))} -> rc {self.rc}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-4000:]}"


class Sampler:
    """Samples `probe()` on a thread every `interval_s` until stopped."""

    def __init__(self, probe, interval_s: float = 0.05):
        self.probe = probe
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.probe())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


class Cluster:
    def __init__(self, root: Path, heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
                 heartbeat_liveness: int = HEARTBEAT_LIVENESS):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_liveness = heartbeat_liveness
        self.procs: dict[str, subprocess.Popen] = {}
        self.servers: set[str] = set()  # long-running roles: they must outlive the test
        self._log_files: list = []
        self._runs = 0
        front, back, status = free_ports(3)
        self.frontend = f"tcp://127.0.0.1:{front}"
        self.backend = f"tcp://127.0.0.1:{back}"
        self.status_endpoint = f"tcp://127.0.0.1:{status}"

    # --- files ------------------------------------------------------------

    def write_config(self, name: str, conf: dict) -> Path:
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        return path

    def dataset_dir(self, device_id: str, dataset: str) -> Path:
        path = self.root / "snapshots" / device_id / dataset
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- processes ----------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, name: str, *args, server: bool = True) -> subprocess.Popen:
        """Start `python -m roles ARGS` in the background, stderr to logs/NAME.log.

        A server's stdout goes to its log too; otherwise it is a pipe, read by `finish`.
        """
        assert name not in self.procs, f"process {name} already started"
        log = open(self.logs / f"{name}.log", "wb")
        self._log_files.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "roles", *map(str, args)], cwd=self.root,
                                stdin=subprocess.DEVNULL, stdout=log if server else subprocess.PIPE, stderr=log,
                                env=self._env())
        self.procs[name] = proc
        if server:
            self.servers.add(name)
        return proc

    def run(self, *args, timeout_s: float = 120, log_name: str | None = None) -> Result:
        """Run `python -m roles ARGS` to completion; stderr is also kept in logs/LOG_NAME.log."""
        cmd = [sys.executable, "-m", "roles", *map(str, args)]
        try:
            done = subprocess.run(cmd, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s, env=self._env())
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{' '.join(cmd[2:])} did not finish in {timeout_s}s\n"
                               f"stderr: {exc.stderr!r}\n{self.log_tails()}") from None
        if log_name:
            self._runs += 1
            (self.logs / f"run{self._runs:02d}-{log_name}.log").write_text(done.stderr)
        return Result(cmd[3:], done.returncode, done.stdout, done.stderr)

    def start_broker(self, **overrides) -> subprocess.Popen:
        conf = {
            "frontend_bind": self.frontend, "backend_bind": self.backend, "status_bind": self.status_endpoint,
            "data_dir": str(self.root / "var" / "broker"), "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "heartbeat_liveness": self.heartbeat_liveness, "log_level": "DEBUG", "insecure": True, **overrides,
        }
        proc = self.spawn("broker", "broker", "--config", self.write_config("broker", conf))
        self.wait_for(lambda: self.try_status() is not None, 20, "the broker's status socket")
        return proc

    def start_storage(self, node_id: str = "node-a", **overrides) -> subprocess.Popen:
        conf = {
            "node_id": node_id, "broker": self.backend, "data_dir": str(self.root / "var" / node_id),
            "heartbeat_interval_ms": self.heartbeat_interval_ms, "heartbeat_liveness": self.heartbeat_liveness,
            "log_level": "DEBUG", "insecure": True, **overrides,
        }
        proc = self.spawn(node_id, "storage", "--config", self.write_config(node_id, conf))
        self.wait_for(lambda: self.node_alive(node_id), 20, f"storage node {node_id} alive in status")
        return proc

    def start(self, nodes=("node-a",), **storage_overrides) -> "Cluster":
        """A broker and storage workers, all ready."""
        self.start_broker()
        for node_id in nodes:
            self.start_storage(node_id, **storage_overrides)
        return self

    def agent_config(self, device_id: str, datasets: list[dict], **overrides) -> Path:
        """Write an agent config; each dataset dict needs `name` and `path`."""
        conf = {
            "device_id": device_id, "brokers": [self.frontend], "state_dir": str(self.root / "var" / device_id),
            "datasets": [{"priority": 1, **{k: str(v) if k == "path" else v for k, v in d.items()}}
                         for d in datasets],
            "heartbeat_interval_ms": self.heartbeat_interval_ms, "heartbeat_liveness": self.heartbeat_liveness,
            "log_level": "DEBUG", "insecure": True, **overrides,
        }
        return self.write_config(f"agent-{device_id}", conf)

    def run_agent_once(self, config: Path, timeout_s: float = 180) -> tuple[int, dict | None, str]:
        """`agent --config CONFIG --once --json` -> (exit code, parsed JSON or None, stderr)."""
        result = self.run("agent", "--config", config, "--once", "--json", timeout_s=timeout_s,
                          log_name=f"{config.stem}-once")
        try:
            doc = json.loads(result.stdout) if result.stdout.strip() else None
        except json.JSONDecodeError:
            doc = None
        return result.rc, doc, result.stderr

    def start_agent_once(self, config: Path) -> subprocess.Popen:
        """Start `agent --once --json` in the background; finish it with `finish_agent`."""
        return self.spawn(config.stem, "agent", "--config", config, "--once", "--json", server=False)

    def finish_agent(self, name: str, timeout_s: float = 300) -> tuple[int, dict | None, str]:
        """Wait for a background `agent --once --json` -> (exit code, parsed JSON or None, its log)."""
        proc = self.procs[name]
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} did not finish in {timeout_s}s\n{self.log_tails()}") from None
        stdout = stdout.decode()
        doc = json.loads(stdout) if stdout.strip() else None
        return proc.returncode, doc, tail(self.logs / f"{name}.log", 200)

    def restore(self, config: Path, dataset: str, snapshot: str, out: Path, timeout_s: float = 180) -> Result:
        return self.run("restore", "--config", config, "--dataset", dataset, "--snapshot", snapshot, "--out", out,
                        timeout_s=timeout_s, log_name=f"restore-{dataset}-{snapshot}")

    # --- the status socket ----------------------------------------------------

    def try_status(self) -> dict | None:
        result = self.run("status", "--broker", self.status_endpoint, "--json", "--timeout-ms", "2000")
        return result.json if result.rc == 0 else None

    def status(self) -> dict:
        result = self.run("status", "--broker", self.status_endpoint, "--json")
        assert result.rc == 0, str(result)
        return result.json

    def catalog(self, device_id: str | None = None) -> list[dict]:
        args = ["list", "--broker", self.status_endpoint, "--json"]
        if device_id:
            args += ["--device", device_id]
        result = self.run(*args)
        assert result.rc == 0, str(result)
        return result.json

    def node_alive(self, node_id: str) -> bool:
        doc = self.try_status()
        return bool(doc) and any(n["node_id"] == node_id and n["alive"] for n in doc["storage"])

    def transfers(self, device_id: str | None = None) -> list[dict]:
        return [t for t in self.status()["transfers"] if device_id is None or t["device_id"] == device_id]

    # --- sampling, waiting, reporting --------------------------------------------

    def rss_sampler(self, name: str = "broker", interval_s: float = 0.05) -> Sampler:
        pid = self.procs[name].pid
        return Sampler(lambda: vm_rss_bytes(pid), interval_s)

    def wait_for(self, condition, timeout_s: float, what: str, interval_s: float = 0.1):
        return wait_for(condition, timeout_s, what, interval_s, on_timeout=self.log_tails)

    def dead_processes(self) -> dict[str, int]:
        """Long-running roles that exited, with their exit codes."""
        return {name: self.procs[name].returncode for name in self.servers if self.procs[name].poll() is not None}

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"----- {path.name} (last {lines} lines) -----\n{tail(path, lines)}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 10) -> None:
        """Terminate every process started, then kill what has not exited."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self._log_files:
            log.close()

    def remove_data(self) -> None:
        """Delete images, stores and restores (keeping configs and logs): large, and useless once passed."""
        for child in self.root.iterdir():
            if child not in (self.logs, self.root / "configs"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def chunk_names(path: Path, chunk_size: int = MiB) -> list[bytes | None]:
    """blake3 of each chunk of a file, None for an all-zero chunk (as the agent names them)."""
    import blake3

    names = []
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            names.append(None if block.count(0) == len(block) else blake3.blake3(block).digest())
    return names


def distinct_nonzero_chunks(path: Path, chunk_size: int = MiB) -> int:
    return len({n for n in chunk_names(path, chunk_size) if n is not None})
