"""End to end, status at scale (DESIGN.md "Fleet operations — contract"):

- `status --json`'s summary is right with 1,000 registered devices: a real
  broker, 1,000 DEALERs in this process that HELLO and keep their heartbeats;
  after 100 of them say BYE, 900 are connected and 1,000 known;
- `status --watch` redraws in a terminal (a pseudo-terminal): the table is
  drawn, a device registers and the next frame shows it, Ctrl-C exits 0;
- `list` pages through a catalog larger than one page (`list_page_size`
  small) and prints every row in key order; `--device` and `--dataset` narrow.
"""

from __future__ import annotations

import fcntl
import os
import pty
import resource
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import zmq

from roles.sampleimages import generate_image
from schemas import decode, encode, make
from tests.harness import Cluster

FLEET = 1000
HEARTBEAT_MS = 1000  # the fleet's beats come from one Python thread: a calmer interval than the harness's


@pytest.fixture
def calm_cluster(request, tmp_path):
    """A Cluster (plain TCP) on 1 s heartbeats, stopped at teardown."""
    c = Cluster(tmp_path, heartbeat_interval_ms=HEARTBEAT_MS, heartbeat_liveness=10)
    request.node._speedsync_cluster = c
    try:
        yield c
        assert not c.dead_processes(), f"a role process exited during the test: {c.dead_processes()}"
    finally:
        c.stop()


class Fleet:
    """N devices in one thread: a DEALER each, HELLO, then HEARTBEAT whenever one has sent
    nothing for an interval; everything the broker sends is read (and WELCOMEs counted).
    `bye(k)` makes the first k say BYE and close. Sockets never leave the thread."""

    def __init__(self, endpoint: str, n: int, interval_s: float):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4 * n + 256:  # a socket and a connection each, here and in the broker (inherits it)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n + 1024), hard))
        self.endpoint, self.n, self.interval_s = endpoint, n, interval_s
        self.welcomed = 0
        self.errors: list = []
        self._bye = 0
        self._byes_done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Fleet":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def bye(self, k: int) -> None:
        self._bye = k
        assert self._byes_done.wait(10), "the fleet thread did not send its BYEs"

    def _run(self) -> None:
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, 2 * self.n + 64)
        poller = zmq.Poller()
        socks, index, last_sent = [], {}, []
        beat = encode(make("HEARTBEAT"))
        try:
            for i in range(self.n):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(self.endpoint)
                sock.send_multipart(encode(make("HELLO", device_id=f"dev-{i:04d}")))
                socks.append(sock)
                index[sock] = i
                last_sent.append(time.monotonic())
                poller.register(sock, zmq.POLLIN)
            while not self._stop.is_set():
                for sock, _ in poller.poll(50):
                    while True:
                        try:
                            msg = decode(sock.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                        if msg.t == "WELCOME":
                            self.welcomed += 1
                        elif msg.t == "ERROR":
                            self.errors.append((index[sock], msg["code"], msg["reason"]))
                now = time.monotonic()
                for i, sock in enumerate(socks):
                    if sock is not None and now - last_sent[i] >= self.interval_s:
                        sock.send_multipart(beat, zmq.NOBLOCK)
                        last_sent[i] = now
                if self._bye and not self._byes_done.is_set():
                    for i in range(self._bye):
                        socks[i].send_multipart(encode(make("BYE")))
                        poller.unregister(socks[i])
                        socks[i].close(linger=1000)
                        socks[i] = None
                    self._byes_done.set()
        finally:
            ctx.destroy(linger=0)


def test_status_summary_is_right_with_1000_registered_devices(calm_cluster):
    cluster = calm_cluster
    cluster.start_broker()
    with Fleet(cluster.frontend, FLEET, HEARTBEAT_MS / 1000) as fleet:
        cluster.wait_for(lambda: fleet.welcomed >= FLEET, 45, f"{FLEET} devices welcomed")
        summary = cluster.status()["summary"]
        assert (summary["devices_known"], summary["devices_connected"]) == (FLEET, FLEET), summary
        assert summary["transfers_by_state"] == {} and summary["datasets_behind"] == 0

        fleet.bye(100)

        def after_byes():
            doc = cluster.status()
            return doc if doc["summary"]["devices_connected"] == FLEET - 100 else None

        doc = cluster.wait_for(after_byes, 20, "900 devices connected after 100 BYEs")
        assert doc["summary"]["devices_known"] == FLEET
        # the summary agrees with the document it summarises
        assert len(doc["agents"]) == FLEET and sum(a["connected"] for a in doc["agents"]) == FLEET - 100
        assert not any(a["connected"] for a in doc["agents"] if a["device_id"] < "dev-0100")
        # narrowed to one device, the summary stays global
        one = cluster.run("status", "--broker", cluster.status_endpoint, "--json", "--device", "dev-0500").json
        assert one["agents"] == [{"device_id": "dev-0500", "connected": True, "stored_bytes": 0, "quota_bytes": None}]
        assert one["summary"]["devices_connected"] == FLEET - 100
        assert fleet.errors == []


class Terminal:
    """A command under a pseudo-terminal: what it draws is read as it comes."""

    def __init__(self, args, env, cwd, rows: int = 50, cols: int = 160):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     close_fds=True)
        os.close(slave)
        self.screen = ""

    def read_until(self, condition, timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while not condition(self.screen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: not drawn within {timeout_s}s; the terminal shows:\n"
                                     f"{self.screen[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the command ended and closed the terminal
                    raise AssertionError(f"{what}: the command ended (rc {self.proc.poll()}):\n"
                                         f"{self.screen[-3000:]}") from None
        return self.screen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_status_watch_redraws_in_a_terminal_until_ctrl_c(cluster, zctx):
    cluster.start_broker()
    env = {**cluster._env(), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"}
    env.pop("NO_COLOR", None)
    term = Terminal([sys.executable, "-m", "roles", "status", "--broker", cluster.status_endpoint, "--watch",
                     "--interval", "0.3"], env, cluster.root)
    marker = "speedsync status " + cluster.status_endpoint
    try:
        term.read_until(lambda s: marker in s and "0 known" in s and "storage nodes" in s, 20, "the first frame")
        device = zctx.socket(zmq.DEALER)
        device.linger = 0
        device.connect(cluster.frontend)
        device.send_multipart(encode(make("HELLO", device_id="watched-1")))
        assert device.poll(10_000), "no WELCOME"
        assert decode(device.recv_multipart()).t == "WELCOME"
        screen = term.read_until(lambda s: "watched-1" in s and "1 known, 1 connected" in s, 20,
                                 "a later frame showing the new device")
        assert screen.count(marker) >= 2, "the table was drawn once only"
        term.proc.send_signal(signal.SIGINT)
        assert term.proc.wait(10) == 0, term.screen[-2000:]
    finally:
        term.close()


def test_list_pages_through_a_catalog_larger_than_a_page(calm_cluster):
    cluster = calm_cluster
    cluster.start_broker(list_page_size=2)
    cluster.start_storage("node-a")
    expected = []
    for device in ("office-2", "office-1"):
        datasets = []
        for dataset in ("sql", "files"):
            directory = cluster.dataset_dir(device, dataset)
            for snap in ("s1", "s2", "s3"):
                expected.append((device, dataset, snap))
                generate_image(str(directory / f"{snap}.img"), 64 * 1024, seed=len(expected))
            datasets.append({"name": dataset, "path": directory, "chunk_size": "16KiB"})
        rc, _, stderr = cluster.run_agent_once(cluster.agent_config(device, datasets))
        assert rc == 0, stderr
    expected.sort()

    rows = [(s["device_id"], s["dataset"], s["snapshot"]) for s in cluster.catalog()]
    assert rows == expected  # 12 rows over 6 pages, in key order, none twice
    assert [(s["device_id"], s["dataset"], s["snapshot"]) for s in cluster.catalog("office-2")] == \
        [k for k in expected if k[0] == "office-2"]
    result = cluster.run("list", "--broker", cluster.status_endpoint, "--json", "--dataset", "sql")
    assert result.rc == 0, str(result)
    assert [(s["device_id"], s["dataset"], s["snapshot"]) for s in result.json] == \
        [k for k in expected if k[1] == "sql"]
    # without --json, off a terminal: one plain table with every row
    text = cluster.run("list", "--broker", cluster.status_endpoint).stdout.splitlines()
    assert text[0].split() == ["device", "dataset", "snapshot", "taken", "(UTC)", "node", "size", "blake3"]
    assert [tuple(line.split()[:3]) for line in text[2:]] == expected
