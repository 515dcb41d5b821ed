"""End-to-end harness: the real `python -m roles` processes on loopback.

A `Cluster` lives in one test's tmp_path. It writes each role's YAML from a
dict, starts the role with `sys.executable -m roles ...` on free ports, sends
its stderr to `logs/<name>.log`, waits for readiness by asking the broker's
status socket (the `status` command), never by sleeping, and at teardown
terminates every process it started (then kills what is left).

Commands a test runs to completion (`agent --once`, `restore`, `status`,
`list`) go through `run()`, which returns exit code, stdout and stderr.

Faults and security, for the crash and security tests:

- `Cluster(root, secure=True)` runs every role with CurveZMQ, as the shipped
  configs do: key pairs come from the real `keygen` command, the broker
  admits the public keys `enroll()` listed before it started, and `status`
  and `list` present an operator key.
- `kill9(name)` ends a role with SIGKILL (a crash, not a shutdown) and
  `restart(name)` runs the same command line again, appending to its log.
- `TcpRelay` sits between a client and the broker and counts (optionally
  keeps) every byte each way: what a process really put on the wire.
- `RawClient` is a bare DEALER that sends whatever it is told.
"""

from __future__ import annotations

import json
import os
import resource
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

from roles import localprocs
from roles.localprocs import free_ports  # noqa: F401  (one helper for benches and tests)

from roles.sampleimages import file_blake3

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# Short heartbeats keep failure detection fast; liveness is generous because
# the whole cluster shares two cores with the agents' hashing and compression.
HEARTBEAT_INTERVAL_MS = 200
HEARTBEAT_LIVENESS = 10


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.1, on_timeout=None):
    """Poll condition() until it returns something true (returned), else fail with `what`."""
    return localprocs.wait_for(condition, timeout_s, what, interval_s, on_timeout)


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
    # kind of key -> the broker's directory of such public keys (under keys/)
    KEY_DIRS = {"device": "devices", "node": "nodes", "operator": "operators", "admin": "admins"}

    def __init__(self, root: Path, heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
                 heartbeat_liveness: int = HEARTBEAT_LIVENESS, secure: bool = False):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_liveness = heartbeat_liveness
        self.secure = secure
        self.keys = self.root / "keys"
        self.procs: dict[str, subprocess.Popen] = {}
        self.servers: set[str] = set()  # long-running roles: they must outlive the test
        self.commands: dict[str, tuple] = {}  # name -> (args, server, kind, nofile): what restart() runs again
        self.crashed: list[subprocess.Popen] = []  # ended by kill9 or terminate; reaped at stop
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

    def node_dir(self, node_id: str) -> Path:
        return self.root / "var" / node_id

    # --- CurveZMQ keys ------------------------------------------------------

    def keygen(self, name: str) -> Path:
        """NAME's key pair, written by the real `keygen` command if absent; returns NAME.key_secret."""
        secret = self.keys / f"{name}.key_secret"
        if not secret.exists():
            result = self.run("keygen", "--out", self.keys, "--name", name)
            assert result.rc == 0 and secret.exists(), str(result)
        return secret

    def enroll(self, name: str, kind: str) -> Path:
        """NAME's key pair, its public key listed for the broker (kind: device, node, operator, admin).

        Before the broker starts, or while it runs (live enrolment: it rescans
        every keys_rescan_ms and on SIGHUP). The file appears whole (copy, then rename).
        """
        secret = self.keygen(name)
        listed = self.keys / self.KEY_DIRS[kind]
        listed.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.keys / f"{name}.key", listed / f".{name}.key.tmp")
        os.replace(listed / f".{name}.key.tmp", listed / f"{name}.key")
        return secret

    def revoke(self, name: str, kind: str) -> None:
        """Remove NAME's public key from the broker's list (kind as for enroll)."""
        (self.keys / self.KEY_DIRS[kind] / f"{name}.key").unlink()

    def reload_broker(self) -> None:
        """SIGHUP: the broker re-reads its key directories at once."""
        self.procs["broker"].send_signal(signal.SIGHUP)

    def _broker_security(self) -> dict:
        if not self.secure:
            return {"insecure": True}
        self.keygen("broker")
        self.enroll("operator", "operator")
        for sub in self.KEY_DIRS.values():
            (self.keys / sub).mkdir(parents=True, exist_ok=True)
        return {"insecure": False, "key_file": str(self.keys / "broker.key_secret"),
                "authorized_keys": str(self.keys / "devices"), "node_keys": str(self.keys / "nodes"),
                "operator_keys": str(self.keys / "operators"), "admin_keys": str(self.keys / "admins")}

    def _client_security(self, key_name: str) -> dict:
        """An agent's or worker's keys: its own pair (made if absent, not listed by that) and the broker's."""
        if not self.secure:
            return {"insecure": True}
        return {"insecure": False, "key_file": str(self.keygen(key_name)),
                "broker_key": str(self.keys / "broker.key")}

    def operator_args(self, key_name: str = "operator") -> list:
        """`--key-file ... --broker-key ...` for status and list (nothing on a plain-TCP cluster)."""
        if not self.secure:
            return []
        return ["--key-file", self.keys / f"{key_name}.key_secret", "--broker-key", self.keys / "broker.key"]

    # --- processes ----------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, name: str, *args, server: bool = True, kind: str = "", nofile: int | None = None
              ) -> subprocess.Popen:
        """Start `python -m roles ARGS` in the background, stderr to logs/NAME.log.

        A server's stdout goes to its log too; otherwise it is a pipe, read by `finish`.
        `nofile`: the process's soft RLIMIT_NOFILE (descriptors it may hold), set before it starts.
        """
        assert name not in self.procs, f"process {name} already started"
        log = open(self.logs / f"{name}.log", "ab")
        if log.tell():
            log.write(f"\n----- {name} started again -----\n".encode())
            log.flush()
        self._log_files.append(log)
        def limit_descriptors():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        proc = subprocess.Popen([sys.executable, "-m", "roles", *map(str, args)], cwd=self.root,
                                stdin=subprocess.DEVNULL, stdout=log if server else subprocess.PIPE, stderr=log,
                                env=self._env(), preexec_fn=limit_descriptors if nofile else None)
        self.procs[name] = proc
        self.commands[name] = (args, server, kind, nofile)
        if server:
            self.servers.add(name)
        return proc

    def kill9(self, name: str) -> None:
        """Crash a role: SIGKILL, no chance to clean up. `restart(name)` brings it back."""
        proc = self.procs.pop(name)
        self.servers.discard(name)
        proc.kill()
        proc.wait()
        self.crashed.append(proc)

    def terminate(self, name: str, timeout_s: float = 10) -> int:
        """An orderly stop (SIGTERM) of one role; returns its exit code. `restart` or `start_*` brings it back."""
        proc = self.procs.pop(name)
        self.servers.discard(name)
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.crashed.append(proc)
        return proc.returncode

    def restart(self, name: str) -> subprocess.Popen:
        """Run a killed role's command line again (same config, same ports, same data), ready when it returns."""
        args, server, kind, nofile = self.commands[name]
        proc = self.spawn(name, *args, server=server, kind=kind, nofile=nofile)
        if kind == "broker":
            self.wait_for(lambda: self.try_status() is not None, 20, "the restarted broker's status socket")
        elif kind == "storage":
            self.wait_for(lambda: self.node_alive(name), 30, f"restarted storage node {name} alive in status")
        return proc

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

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
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in log_name)[:80]
            (self.logs / f"run{self._runs:02d}-{safe}.log").write_text(done.stderr)
        return Result(cmd[3:], done.returncode, done.stdout, done.stderr)

    def start_broker(self, **overrides) -> subprocess.Popen:
        conf = {
            "frontend_bind": self.frontend, "backend_bind": self.backend, "status_bind": self.status_endpoint,
            "data_dir": str(self.root / "var" / "broker"), "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "idle_heartbeat_interval_ms": 2 * self.heartbeat_interval_ms,
            "heartbeat_liveness": self.heartbeat_liveness, "log_level": "DEBUG", **self._broker_security(),
            **overrides,
        }
        proc = self.spawn("broker", "broker", "--config", self.write_config("broker", conf), kind="broker")
        self.wait_for(lambda: self.try_status() is not None, 20, "the broker's status socket")
        return proc

    def storage_config(self, node_id: str = "node-a", **overrides) -> Path:
        conf = {
            "node_id": node_id, "broker": self.backend, "data_dir": str(self.node_dir(node_id)),
            "heartbeat_interval_ms": self.heartbeat_interval_ms, "heartbeat_liveness": self.heartbeat_liveness,
            "log_level": "DEBUG", **self._client_security(node_id), **overrides,
        }
        return self.write_config(node_id, conf)

    def start_storage(self, node_id: str = "node-a", nofile: int | None = None, **overrides) -> subprocess.Popen:
        """`nofile`: a low descriptor limit for the node process (spawn)."""
        proc = self.spawn(node_id, "storage", "--config", self.storage_config(node_id, **overrides), kind="storage",
                          nofile=nofile)
        self.wait_for(lambda: self.node_alive(node_id), 20, f"storage node {node_id} alive in status")
        return proc

    def start(self, nodes=("node-a",), devices=(), **storage_overrides) -> "Cluster":
        """A broker and storage workers, all ready. With CURVE, `nodes` and `devices` are enrolled first."""
        if self.secure:
            for node_id in nodes:
                self.enroll(node_id, "node")
            for device_id in devices:
                self.enroll(device_id, "device")
        self.start_broker()
        for node_id in nodes:
            self.start_storage(node_id, **storage_overrides)
        return self

    def agent_config(self, device_id: str, datasets: list[dict], key_name: str | None = None,
                     config_name: str | None = None, **overrides) -> Path:
        """Write an agent config (configs/agent-CONFIG_NAME.yaml, by default agent-DEVICE_ID.yaml);
        each dataset dict needs `name` and `path`.

        With CURVE the agent presents the key pair `key_name` (default: its device_id).
        """
        conf = {
            "device_id": device_id, "brokers": [self.frontend], "state_dir": str(self.root / "var" / device_id),
            "datasets": [{"priority": 1, **{k: str(v) if k == "path" else v for k, v in d.items()}}
                         for d in datasets],
            "heartbeat_interval_ms": self.heartbeat_interval_ms, "heartbeat_liveness": self.heartbeat_liveness,
            "log_level": "DEBUG", **self._client_security(key_name or device_id), **overrides,
        }
        return self.write_config(f"agent-{config_name or device_id}", conf)

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
        return self.spawn(config.stem, "agent", "--config", config, "--once", "--json", server=False, kind="agent")

    def start_agent(self, config: Path) -> subprocess.Popen:
        """Start a replicating agent (no --once): a long-running role, like the broker."""
        return self.spawn(config.stem, "agent", "--config", config, kind="agent")

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

    def scrub(self, node_id: str = "node-a") -> Result:
        """`storage --config NODE --scrub --json` on the node's config file."""
        return self.run("storage", "--config", self.root / "configs" / f"{node_id}.yaml", "--scrub", "--json",
                        log_name=f"scrub-{node_id}")

    # --- the status socket ----------------------------------------------------

    def try_status(self) -> dict | None:
        result = self.run("status", "--broker", self.status_endpoint, "--json", "--timeout-ms", "2000",
                          *self.operator_args())
        return result.json if result.rc == 0 else None

    def status(self) -> dict:
        result = self.run("status", "--broker", self.status_endpoint, "--json", *self.operator_args())
        assert result.rc == 0, str(result)
        return result.json

    def catalog(self, device_id: str | None = None) -> list[dict]:
        args = ["list", "--broker", self.status_endpoint, "--json", *self.operator_args()]
        if device_id:
            args += ["--device", device_id]
        result = self.run(*args)
        assert result.rc == 0, str(result)
        return result.json

    def try_catalog(self) -> list[dict] | None:
        result = self.run("list", "--broker", self.status_endpoint, "--json", "--timeout-ms", "2000",
                          *self.operator_args())
        return result.json if result.rc == 0 else None

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
        for proc in [*self.procs.values(), *self.crashed]:
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self._log_files:
            log.close()

    def remove_data(self) -> None:
        """Delete images, stores and restores (keeping configs and logs): large, and useless once passed."""
        for child in self.root.iterdir():
            if child not in (self.logs, self.root / "configs"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()


class TcpRelay:
    """A TCP relay to `target` that counts (and optionally keeps) the bytes each way.

    Point a client at `endpoint` instead of the broker: `up` counts what the
    client sent, `down` what it received, across every connection it makes.
    `keep_up` bytes of the client's stream are kept in `captured` (to look
    for plaintext). One thread per direction per connection.
    """

    def __init__(self, target: str, keep_up: int = 0):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.keep_up = keep_up
        self.captured = bytearray()
        self.up = 0
        self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_up: bool) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                with self._lock:
                    if is_up:
                        self.up += n
                        if len(self.captured) < self.keep_up:
                            self.captured += view[:min(n, self.keep_up - len(self.captured))]
                    else:
                        self.down += n
                dst.sendall(view[:n])
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                sock.close()


class RawClient:
    """A DEALER that sends whatever it is told and reads decoded replies (answering heartbeats).

    `curve=(our KeyPair, broker public key)` makes it a CURVE client.
    """

    def __init__(self, ctx, endpoint: str, curve=None):
        import zmq

        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from bus.security import make_client
            make_client(self.sock, *curve)
        self.sock.connect(endpoint)

    def send_frames(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def send(self, t: str, payload=(), **fields) -> None:
        from schemas import encode, make
        self.sock.send_multipart(encode(make(t, payload=payload, **fields)))

    def receive(self, timeout_s: float):
        """The next message other than HEARTBEAT, or None if nothing came within timeout_s."""
        from schemas import decode
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.sock.poll(left_ms):
                return None
            msg = decode(self.sock.recv_multipart())
            if msg.t == "HEARTBEAT":
                self.send("HEARTBEAT")
                continue
            return msg

    def expect(self, t: str, timeout_s: float = 10):
        """The next message other than HEARTBEAT; it must be of type t."""
        msg = self.receive(timeout_s)
        assert msg is not None, f"no {t} within {timeout_s}s"
        assert msg.t == t, f"expected {t}, got {msg}"
        return msg

    def expect_error(self, code: str):
        from bus.errors import CODES
        msg = self.expect("ERROR")
        assert msg["code"] == code, f"expected ERROR {code}, got {dict(msg.fields)}"
        assert code in CODES
        assert msg["reason"] and "Traceback" not in msg["reason"]
        return msg

    def hello(self, device_id: str) -> None:
        self.send("HELLO", device_id=device_id)
        self.expect("WELCOME")

    def close(self) -> None:
        self.sock.close()


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


# --- checks shared by the end-to-end tests ------------------------------------------------------------


def uploads_of(status: dict, device_id: str, dataset: str, snapshot: str) -> list[dict]:
    """Every upload attempt of one snapshot in a status document (active, parked, finished)."""
    return [t for t in status["transfers"] if t.get("kind", "upload") == "upload" and t["device_id"] == device_id
            and (t["dataset"], t["snapshot"]) == (dataset, snapshot)]


def assert_restores(cluster, agent_cfg, dataset: str, snapshot: str, expected_blake3: str, tmp_path) -> None:
    """`restore` succeeds and the file it writes has the original image's blake3."""
    out = tmp_path / "restored" / f"{agent_cfg.stem}-{dataset}-{snapshot}.img"
    out.parent.mkdir(exist_ok=True)
    result = cluster.restore(agent_cfg, dataset, snapshot, out)
    assert result.rc == 0, str(result)
    assert file_blake3(str(out)) == expected_blake3, f"restored {dataset}/{snapshot} differs from the original"
    out.unlink()


def partial_files(root) -> list:
    """Temporary files of interrupted durable writes (roles/storenode/durable.py names them *.partial)."""
    return [p for p in root.rglob("*.partial")]


def assert_scrub_clean(cluster, node_id: str) -> dict:
    """`storage --scrub --json` exits 0 and reports no problem; returns its report."""
    result = cluster.scrub(node_id)
    assert result.rc == 0, str(result)
    report = result.json
    assert report["problems"] == 0 and not report["damaged_chunks"] and not report["affected_snapshots"], report
    return report
