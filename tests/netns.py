"""A real shaped office link for end-to-end tests: network namespaces, veth pairs, tbf.

    office namespace          router namespace                         cloud namespace
    agent, other hosts        the office's uplink                      broker, storage
    198.18.0.1 ----veth---- 198.18.0.254 | 198.18.1.254 ==[tbf]==veth== 198.18.1.2

`ShapedLink.up()` creates three namespaces, `<PREFIX>-<pid>-<n>-office`,
`-router` and `-cloud`, joined by two veth pairs, with addresses from
198.18.0.0/15 (the range reserved for benchmarking) and routes through the
router; `lo` is up in each. What the router sends towards the cloud (the
office's upload direction) is limited by `tc qdisc ... tbf rate 100mbit burst
32kbit latency 50ms`: a router-like buffer of 50 ms, so that a sender faster
than the link builds a queue and queueing delay appears, as on an office
uplink. The cloud-to-office direction is not shaped.

TCP in the office namespace uses loss-based congestion control (CUBIC where
the kernel lets a namespace choose it as its default, else Reno), as an
office's hosts and appliances do by default, whatever this machine's own
default is. This path has no propagation delay (the kernel here has no
netem), and BBR, which sizes its window from the least round trip it sees,
keeps almost nothing in flight on it and is starved by any loss-based flow:
an agent on BBR would leave the link to a competitor whether it yields or
not, and a test of yielding would prove nothing.

Why a router between them rather than the shaper on the office veth itself:
a qdisc on the sending host is subject to TCP Small Queues, which keeps each
local flow's backlog in it to about a millisecond of its pacing rate (a bulk
CUBIC flow measured 8-12 ms of queue there, never the 50 ms a router buffer
holds). An office's other hosts send through a router, which queues what
they send without that limit; so does ours. Senders are still started in
the office namespace, as on the office LAN.

`down()` deletes the namespaces (the veth pairs go with them); stale ones
left by an earlier run that crashed (their pid is gone) are deleted first.

Processes are put in a namespace by creating them from a thread that has
entered it (`inside(side)`: setns(2) on the calling thread only; a child
inherits its parent thread's namespace), so the harness' own `spawn` and
`run` start them unchanged. Unix (ipc://) sockets live in the file system,
not in a network namespace: the broker's and the agent's status sockets are
reachable from the test process directly.

What crossed the link is read from the shaped veth's own counters
(`/proc/thread-self/net/dev` read by a thread inside the router namespace,
the same numbers as `/sys/class/net/<veth>/statistics/tx_bytes` there) every
100 ms by `LinkMeter`. Two rates come out of it: `frame_rate`, the Ethernet
frames the shaper passed (what tbf limits to 100 Mbit/s), and
`payload_rate`, the TCP payload inside them (frames minus 66 bytes of
Ethernet, IP and TCP-with-timestamps headers per packet): the bytes the
office's processes wrote to their sockets.

`BulkFlow` is a competing bulk TCP transfer from the office to the cloud: a
plain socket sender (a short Python script) started in the office namespace
and a receiver thread in the cloud namespace that counts bytes. Its socket
asks for CUBIC, the default of Linux, Windows and macOS hosts.

Needs root, iproute2 (`ip`, `tc`) and the kernel's tbf and veth; where a
namespace cannot be created, `why_unavailable()` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

from roles.statusclient import ask, fetch_status
from schemas import make
from tests.harness import Cluster, free_ports

PREFIX = "sslink"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
OFFICE_IP = "198.18.0.1"
ROUTER_LAN_IP = "198.18.0.254"
ROUTER_WAN_IP = "198.18.1.254"
CLOUD_IP = "198.18.1.2"
NOBODY_IP = "198.18.1.3"  # on the cloud's subnet, no host: what is sent there is never answered
# Ethernet (14) + IPv4 (20) + TCP with the timestamps option (32): every packet on the link is TCP
HEADER_BYTES = 66
MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
RECEIVE_BUFFER = 4 << 20  # the bulk flow's receive buffer

_serial = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)
for _tool in ("ip", "tc"):
    if shutil.which(_tool) is None and os.path.exists(f"/usr/sbin/{_tool}"):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def _loss_based_congestion_control() -> str | None:
    """CUBIC if a namespace may make it its default, else Reno (None: leave the default)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
            allowed = f.read().split()
    except OSError:
        return None
    return next((cc for cc in ("cubic", "reno") if cc in allowed), None)


class LinkUnavailable(RuntimeError):
    """The shaped link cannot be built here (the reason is the message)."""


def why_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None if they can (as far as can be told cheaply)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named `<prefix>-<pid>-...` whose creating process is gone; returns their names."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its creator still runs (a concurrent run): not ours to delete
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


class ShapedLink:
    """The office, its router and the cloud, the router's uplink shaped by tbf. `up()`, then `down()`."""

    SIDES = ("office", "router", "cloud")

    def __init__(self, rate_mbit: float = 100, burst: str = "32kbit", latency_ms: int = 50,
                 office_cc: str | None = "loss-based", prefix: str = PREFIX):
        n = next(_serial)
        pid = os.getpid()
        self.rate_mbit = rate_mbit
        self.rate_bytes = rate_mbit * MBIT  # of Ethernet frames, as tbf counts them
        self.burst = burst
        self.latency_ms = latency_ms
        self.office_cc = office_cc
        self.names = {side: f"{prefix}-{pid}-{n}-{side}" for side in self.SIDES}
        # interface names are at most 15 characters: ssl<pid>x<n> and the end's letter
        stem = f"ssl{pid}x{n}"[:14]
        self.devices = {"office": stem + "o", "router_lan": stem + "l", "router_wan": stem + "w",
                        "cloud": stem + "c"}
        self.shaped_device = self.devices["router_wan"]
        self.office_ip, self.cloud_ip, self.nobody_ip = OFFICE_IP, CLOUD_IP, NOBODY_IP
        self.is_up = False

    def up(self) -> "ShapedLink":
        remove_stale()
        ns, dev = self.names, self.devices
        try:
            for side in self.SIDES:
                _ip("netns", "add", ns[side])
                _ip("-n", ns[side], "link", "set", "lo", "up")
            _ip("link", "add", dev["office"], "netns", ns["office"], "type", "veth",
                "peer", "name", dev["router_lan"], "netns", ns["router"])
            _ip("link", "add", dev["router_wan"], "netns", ns["router"], "type", "veth",
                "peer", "name", dev["cloud"], "netns", ns["cloud"])
            for side, device, address in (("office", "office", OFFICE_IP), ("router", "router_lan", ROUTER_LAN_IP),
                                          ("router", "router_wan", ROUTER_WAN_IP), ("cloud", "cloud", CLOUD_IP)):
                _ip("-n", ns[side], "addr", "add", f"{address}/24", "dev", dev[device])
                _ip("-n", ns[side], "link", "set", dev[device], "up")
            _ip("-n", ns["office"], "route", "add", "default", "via", ROUTER_LAN_IP)
            _ip("-n", ns["cloud"], "route", "add", "default", "via", ROUTER_WAN_IP)
            _run("ip", "netns", "exec", ns["router"], "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            if self.office_cc == "loss-based":
                self.office_cc = _loss_based_congestion_control()
            if self.office_cc:
                _run("ip", "netns", "exec", ns["office"], "sysctl", "-q", "-w",
                     f"net.ipv4.tcp_congestion_control={self.office_cc}")
            _run("tc", "-n", ns["router"], "qdisc", "add", "dev", self.shaped_device, "root", "tbf",
                 "rate", f"{self.rate_mbit}mbit", "burst", self.burst, "latency", f"{self.latency_ms}ms")
        except BaseException:
            self.down()
            raise
        self.is_up = True
        return self

    def down(self) -> None:
        """Delete the namespaces (and with them the veth pairs). Safe to call twice."""
        for name in self.names.values():
            if os.path.exists(os.path.join(NETNS_DIR, name)):
                _ip("netns", "del", name, check=False)
        self.is_up = False

    def exists(self) -> bool:
        return any(os.path.exists(os.path.join(NETNS_DIR, ns)) for ns in self.names.values())

    def qdisc(self) -> str:
        """`tc -s qdisc` of the shaped uplink (for reports: drops, backlog)."""
        return subprocess.run(["tc", "-s", "-n", self.names["router"], "qdisc", "show", "dev", self.shaped_device],
                              capture_output=True, text=True).stdout

    @contextlib.contextmanager
    def inside(self, side: str | None):
        """Run the block with this thread in the `office`, `router` or `cloud` namespace (None: where it is)."""
        if side is None:
            yield
            return
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(os.path.join(NETNS_DIR, self.names[side]), os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def enter_for_good(self, side: str) -> None:
        """Move the calling thread into a namespace for the rest of its life (a worker thread only)."""
        target = os.open(os.path.join(NETNS_DIR, self.names[side]), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)

    def exec_argv(self, side: str, argv: list) -> list:
        """`ip netns exec NS ARGV...`: for commands started by something else than this process."""
        return ["ip", "netns", "exec", self.names[side], *map(str, argv)]


def read_counters(device: str) -> tuple[int, int]:
    """(tx_bytes, tx_packets) of a device in the calling thread's namespace."""
    with open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == device:
                values = rest.split()
                return int(values[8]), int(values[9])
    raise LookupError(f"no device {device} in this namespace")


@dataclass
class Sample:
    t: float  # time.monotonic()
    tx_bytes: int
    tx_packets: int


@dataclass
class LinkMeter:
    """Samples the shaped uplink's transmit counters every `interval_s` on a thread inside the router."""

    link: ShapedLink
    interval_s: float = 0.1
    samples: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="link-meter", daemon=True)

    def _run(self) -> None:
        try:
            self.link.enter_for_good("router")
            device = self.link.shaped_device
            next_at = time.monotonic()
            self._ready.set()
            while not self._stop.is_set():
                tx_bytes, tx_packets = read_counters(device)
                self.samples.append(Sample(time.monotonic(), tx_bytes, tx_packets))
                next_at += self.interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the reader
            self._error = exc
            self._ready.set()

    def start(self) -> "LinkMeter":
        self._thread.start()
        self._ready.wait(5)
        self.check()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> "LinkMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"link meter failed: {self._error!r}")

    def wait_until(self, t: float) -> None:
        """Sleep until a sample at or after monotonic time t exists."""
        while not self.samples or self.samples[-1].t < t:
            self.check()
            time.sleep(0.02)

    def _at(self, t: float) -> Sample:
        """The first sample at or after t."""
        times = [s.t for s in self.samples]
        i = bisect_left(times, t)
        if i >= len(self.samples):
            raise ValueError(f"no sample at or after {t:.2f} (last at {times[-1]:.2f})")
        return self.samples[i]

    def frame_rate(self, t0: float, t1: float) -> float:
        """Bytes per second of Ethernet frames sent between the samples nearest t0 and t1."""
        a, b = self._at(t0), self._at(t1)
        return (b.tx_bytes - a.tx_bytes) / (b.t - a.t)

    def payload_rate(self, t0: float, t1: float) -> float:
        """Bytes per second of TCP payload (frames less their headers) between t0 and t1."""
        a, b = self._at(t0), self._at(t1)
        return ((b.tx_bytes - a.tx_bytes) - HEADER_BYTES * (b.tx_packets - a.tx_packets)) / (b.t - a.t)

    def intervals(self, t0: float, t1: float, payload: bool = True) -> list[tuple[float, float]]:
        """(start, bytes per second) of each sampling interval between t0 and t1."""
        out = []
        for a, b in zip(self.samples, self.samples[1:]):
            if a.t >= t0 and b.t <= t1:
                nbytes = b.tx_bytes - a.tx_bytes
                if payload:
                    nbytes -= HEADER_BYTES * (b.tx_packets - a.tx_packets)
                out.append((a.t, nbytes / (b.t - a.t)))
        return out

    def first_time(self, t0: float, t1: float, predicate, window_s: float = 1.0, payload: bool = True,
                   wait: bool = False):
        """The first time t in [t0 + window_s, t1] where predicate(rate over [t - window_s, t]) holds, or None.

        With wait=True, samples are awaited as they come until t1 (returning as soon as it holds)."""
        rate = self.payload_rate if payload else self.frame_rate
        i = 0
        while True:
            while i < len(self.samples):
                t = self.samples[i].t
                i += 1
                if t > t1:
                    return None
                if t >= t0 + window_s and predicate(rate(t - window_s, t)):
                    return t
            if not wait or time.monotonic() > t1 + 0.5:
                return None
            self.check()
            time.sleep(0.05)


class BulkFlow:
    """A competing bulk TCP flow: office sender (a process) -> cloud receiver (a thread here) on `port`.

    `received` holds (monotonic time, total bytes) every ~100 ms; `rate(t0, t1)` is its goodput.
    """

    def __init__(self, link: ShapedLink, port: int = 5201):
        self.link = link
        self.port = port
        self.received: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.proc: subprocess.Popen | None = None
        self.started_at = self.stopped_at = None
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._receive, name="bulk-sink", daemon=True)

    def _receive(self) -> None:
        try:
            self.link.enter_for_good("cloud")
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # A window as a receiver across the internet would open; here the path's own round trip is
            # near zero, and autotuning from it would keep the sender from ever filling the link's buffer.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            listener.bind((self.link.cloud_ip, self.port))
            listener.listen(1)
            listener.settimeout(30)
            self._listening.set()
            conn, _ = listener.accept()
            listener.close()
            conn.settimeout(60)
            buf = bytearray(1 << 20)
            total, last = 0, time.monotonic()
            while (n := conn.recv_into(buf)) > 0:
                t = time.monotonic()
                if not total:
                    self.received.append((t, 0))  # the first bytes: the flow starts here
                total += n
                if t - last >= 0.1:
                    self.received.append((t, total))
                    last = t
            self.received.append((time.monotonic(), total))
            conn.close()
        except BaseException as exc:
            self._error = exc
            self._listening.set()
        finally:
            self._closed.set()

    def start(self, seconds: float) -> "BulkFlow":
        """Start sending for `seconds` (the sender stops by itself)."""
        self._thread.start()
        self._listening.wait(10)
        if self._error:
            raise RuntimeError(f"bulk flow receiver failed: {self._error!r}")
        with self.link.inside("office"):
            self.proc = subprocess.Popen([sys.executable, "-c", SOURCE, self.link.cloud_ip, str(self.port),
                                          str(seconds)], stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        return self

    def wait(self, timeout_s: float = 60) -> None:
        """Wait for the sender to finish and the receiver to see the end of the stream."""
        try:
            self.proc.wait(timeout_s)
        finally:
            self.stopped_at = time.monotonic()
        self._closed.wait(10)
        if self._error:
            raise RuntimeError(f"bulk flow receiver failed: {self._error!r}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def rate(self, t0: float, t1: float) -> float:
        """Goodput (bytes per second received) between the recorded points nearest t0 and t1."""
        pts = self.received
        a = min(pts, key=lambda p: abs(p[0] - t0))
        b = min(pts, key=lambda p: abs(p[0] - t1))
        return (b[1] - a[1]) / (b[0] - a[0])

    @property
    def first_byte_at(self) -> float:
        return self.received[1][0]

    @property
    def last_byte_at(self) -> float:
        return self.received[-1][0]


class LinkCluster(Cluster):
    """A harness Cluster across a ShapedLink: broker and storage in the cloud namespace, agents in the office.

    The broker's frontend listens on the cloud address (agents reach it through the shaper), its backend on
    the cloud namespace's loopback; its status socket and each agent's are ipc:// sockets in a short
    temporary directory, reachable from the test process (`broker_status()`, `agent_status()` ask
    in-process, without starting a command).
    """

    SIDES = {"broker": "cloud", "storage": "cloud", "agent": "office", "restore": "office"}

    def __init__(self, root, link: ShapedLink, **options):
        super().__init__(root, **options)
        self.link = link
        front, back = free_ports(2)
        self.frontend = f"tcp://{link.cloud_ip}:{front}"
        self.backend = f"tcp://127.0.0.1:{back}"
        self.sockets = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))  # ipc paths must stay short
        self.status_endpoint = f"ipc://{self.sockets}/broker-status"

    def spawn(self, name, *args, **kw):
        with self.link.inside(self.SIDES.get(str(args[0]))):
            return super().spawn(name, *args, **kw)

    def run(self, *args, **kw):
        with self.link.inside(self.SIDES.get(str(args[0]))):
            return super().run(*args, **kw)

    def agent_status_endpoint(self, device_id: str) -> str:
        return f"ipc://{self.sockets}/agent-{device_id}"

    def agent_config(self, device_id, datasets, key_name=None, **overrides):
        overrides.setdefault("status_bind", self.agent_status_endpoint(device_id))
        return super().agent_config(device_id, datasets, key_name, **overrides)

    def broker_status(self) -> dict:
        return fetch_status(self.status_endpoint, timeout_ms=5000)

    def agent_status(self, device_id: str, timeout_ms: int = 3000) -> dict | None:
        """The running agent's own status document (None if it does not answer)."""
        try:
            return dict(ask(self.agent_status_endpoint(device_id), make("STATUS"), timeout_ms)["status"])
        except Exception:  # not started yet, or gone
            return None

    def upload_bytes_sent(self, device_id: str, dataset: str) -> int:
        """Payload bytes the broker received for a dataset's uploads (every attempt, every snapshot)."""
        return sum(t["bytes_sent"] for t in self.broker_status()["transfers"]
                   if t["device_id"] == device_id and t["dataset"] == dataset
                   and t.get("kind", "upload") == "upload")

    def stop(self, timeout_s: float = 10) -> None:
        try:
            super().stop(timeout_s)
        finally:
            shutil.rmtree(self.sockets, ignore_errors=True)


# The sending side of BulkFlow, run as `python -c SOURCE HOST PORT SECONDS` in the office namespace:
# write as fast as TCP takes it for SECONDS, then close.
SOURCE = """
import os, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket()
try:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
except OSError as exc:
    print(f"bulk flow: cannot use cubic ({exc}); using the default", file=sys.stderr)
sock.settimeout(10)
sock.connect((host, port))
block = os.urandom(1 << 16)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    sock.sendall(block)
sock.close()
"""
