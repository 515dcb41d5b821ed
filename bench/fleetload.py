"""The fleet bench's load generator and probe (bench/fleet.py starts them).

`fleet_worker` runs in its own process and owns a slice of the fleet: one
DEALER per device with its own CURVE key, all under one zmq.Poller. Every
device HELLOs, waits for WELCOME, then sends HEARTBEAT whenever it has sent
nothing for one interval, reconnects with back-off when the broker falls
silent, and HELLOs again on `not_registered`, as the real agent does. The
uploading devices also replicate a tiny snapshot (1 to 4 chunks of 64 KiB,
unique so nothing dedups) every --snapshot-every-s, speaking the agent's
protocol (roles/appliance/upload.py): OFFER -> ACCEPT -> QUERY (the whole
manifest in one slice) -> MISSING -> CREDIT -> CHUNK (pieces within the
credit held) -> STORED -> COMMIT (the image's blake3) -> COMMITTED.

Shared counters (a RawArray per worker) carry live figures and messages sent
and received by type; the control array tells the workers when uploads may
start and stop. Timestamped events (drops, reconnects, each upload's
outcome) go back on a queue when the worker ends. All times are
time.monotonic(), one clock for every process on Linux.
"""

from __future__ import annotations

import math
import os
import random
import resource
import heapq
import signal
import struct
import time
from collections import deque

import blake3
import zmq

from schemas import decode, encode, make
from schemas.messages import MESSAGES

CYCLE_S = 0.05            # a load generator polls its idle devices' sockets 20 times a second,
UP_CYCLE_S = 0.005        # its uploading devices' up to 200 (its lag adds to each round trip of an upload)
LIVENESS = 3              # the broker's default heartbeat_liveness; the devices use it too
CHUNK = 64 * 1024
UPLOAD_TIMEOUT_S = 120    # an upload not finished by then counts as failed ("timeout") and is aborted
PROBE_ID = "fleet-probe"
TYPES = sorted(MESSAGES)
TYPE_INDEX = {t: k for k, t in enumerate(TYPES)}
# per-generator shared counters; then messages sent by type, then received by type
(WELCOMED, WELCOMES, RECONNECTS, NOT_REGISTERED, ERRORS, SENT, RECEIVED, T_START, T_ALL, MAX_CYCLE, NO_SOCKET,
 IN_FLIGHT, OFFERED, COMMITTED, FAILED) = range(15)
SENT_BY_TYPE = 15
RECV_BY_TYPE = SENT_BY_TYPE + len(TYPES)
COUNTERS = RECV_BY_TYPE + len(TYPES)
UPLOADS_ON = 0            # control[0]: 1 while uploading devices may offer new snapshots
POOL = os.urandom(CHUNK + 4096)


def write_cert(directory: str, name: str, public: bytes, secret: bytes | None = None) -> str:
    """A pyzmq zmq.auth certificate (what bus.security and `speedsync keygen` use)."""
    path = os.path.join(directory, name + (".key_secret" if secret else ".key"))
    with open(path, "w") as f:
        f.write(f'metadata\ncurve\n    public-key = "{public.decode()}"\n')
        if secret:
            f.write(f'    secret-key = "{secret.decode()}"\n')
    if secret:
        os.chmod(path, 0o600)
    return path


def dealer(ctx, endpoint: str, keys) -> zmq.Socket:
    """As the agent's (bus.sockets.make_dealer), without importing bus/."""
    sock = ctx.socket(zmq.DEALER)
    if keys is not None:                                # (public, secret, server's public)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.linger = 0
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(endpoint)
    return sock


class Up:
    """One uploading device's current snapshot."""
    __slots__ = ("state", "seq", "req", "tid", "chunks", "names", "image", "missing", "cur", "off", "credit",
                 "unstored", "t_offer", "next_at")

    def __init__(self, first_at: float):
        self.state, self.seq, self.next_at = "idle", 0, first_at

    def new_snapshot(self, device: int, rng: random.Random) -> None:
        self.seq += 1
        self.chunks = []
        for k in range(rng.randint(1, 4)):               # unique bytes per chunk: nothing dedups
            head = struct.pack(">IIII", device, self.seq, k, rng.getrandbits(32))
            start = rng.randrange(4096)
            self.chunks.append(head + POOL[start:start + CHUNK - len(head)])
        self.names = [blake3.blake3(c).digest() for c in self.chunks]
        self.image = blake3.blake3(b"".join(self.chunks)).digest()
        self.tid, self.missing, self.cur, self.off, self.credit, self.unstored = None, [], 0, 0, 0, set()


def fleet_worker(devices, endpoint, server_public, interval_s, rate, counters, control, stop, lifetime_s,
                 uploaders, every_s, results) -> None:
    """Own `devices` [(device_id, public, secret)], connecting `rate` a second (0: all at once); the
    indexes in `uploaders` replicate a snapshot every `every_s` while control[UPLOADS_ON]; until `stop`
    is set or lifetime_s passes. Puts {"events": [...], "uploads": [...]} on `results` at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # the parent ends us
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = len(devices)
    rng = random.Random(os.getpid())
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, min(ctx.get(zmq.SOCKET_LIMIT), 4 * n + 64))  # closed ones wait for the reaper
    poller, up_poller = zmq.Poller(), zmq.Poller()   # idle devices; uploading ones (polled often, few)
    socks: list = [None] * n
    index: dict = {}
    last_sent, last_heard, backoff = [0.0] * n, [0.0] * n, [0.25] * n
    welcomed = [False] * n
    # (heartbeat due at, device, last_sent it was due for), in time order, one deque per interval: a
    # device beats every interval_s while it uploads, else at the idle interval WELCOME gave (as the agent)
    due: deque = deque()
    due_idle: deque = deque()
    idle_s = [interval_s] * n
    events: list = []           # (t, device_id, "not_registered" | "reconnect")
    outcomes: list = []         # (t_offer, t_done, "COMMITTED" | error code)
    ups = {i: Up(0.0) for i in uploaders}
    idle: list = []             # heap of (next offer at, device) of the uploaders with nothing in flight
    beat = encode(make("HEARTBEAT"))
    hellos = [encode(make("HELLO", device_id=d, software="fleet-bench")) for d, _, _ in devices]
    req_seq = [0]

    def interval_of(i):
        u = ups.get(i)
        return interval_s if u is not None and u.state != "idle" else idle_s[i]

    def send(i, frames, t, kind):
        try:
            socks[i].send_multipart(frames, zmq.NOBLOCK)
        except (zmq.Again, AttributeError):
            pass                                        # the agent's Outbox drops it too; or no socket
        last_sent[i] = t
        every = interval_of(i)
        (due if every == interval_s else due_idle).append((t + every, i, t))
        counters[SENT] += 1
        counters[SENT_BY_TYPE + TYPE_INDEX[kind]] += 1

    def put(i, t, kind, payload=(), **fields):
        send(i, encode(make(kind, payload=payload, **fields)), t, kind)

    def unwelcome(i):
        if welcomed[i]:
            welcomed[i] = False
            counters[WELCOMED] -= 1

    def end_upload(i, u, t, outcome, abort=False):
        if abort and u.tid:
            put(i, t, "ABORT", transfer_id=u.tid)
        outcomes.append((u.t_offer, t, outcome))
        counters[IN_FLIGHT] -= 1
        counters[COMMITTED if outcome == "COMMITTED" else FAILED] += 1
        u.state, u.next_at = "idle", max(t, u.t_offer + every_s)
        heapq.heappush(idle, (u.next_at, i))

    def connect(i, t):
        if socks[i] is not None:
            (up_poller if i in ups else poller).unregister(socks[i])
            del index[socks[i]]
            socks[i].close(linger=0)
            socks[i] = None
        unwelcome(i)
        u = ups.get(i)
        if u is not None and u.state != "idle":
            end_upload(i, u, t, "reconnected")
        last_heard[i] = t
        _, public, secret = devices[i]
        try:
            socks[i] = dealer(ctx, endpoint, (public, secret, server_public) if server_public else None)
        except zmq.ZMQError:                            # out of fds or sockets: try again later
            counters[NO_SOCKET] += 1
            return
        index[socks[i]] = i
        (up_poller if i in ups else poller).register(socks[i], zmq.POLLIN)
        send(i, hellos[i], t, "HELLO")

    def pump(i, u, t):
        """Send what the credit held allows, then COMMIT once every chunk is stored."""
        while u.state == "sending" and u.cur < len(u.missing) and u.credit > 0:
            raw = u.chunks[u.missing[u.cur]]
            size = min(u.credit, len(raw) - u.off)
            piece = {} if size == len(raw) else {"offset": u.off, "total": len(raw)}
            put(i, t, "CHUNK", [memoryview(raw)[u.off:u.off + size]], transfer_id=u.tid,
                hash=u.names[u.missing[u.cur]], raw_len=len(raw), codec="raw", **piece)
            u.credit -= size
            u.off += size
            if u.off == len(raw):
                u.cur, u.off = u.cur + 1, 0
        if u.state == "sending" and u.cur == len(u.missing) and not u.unstored:
            put(i, t, "COMMIT", transfer_id=u.tid, image_blake3=u.image)
            u.state = "committing"

    def on_upload_reply(i, msg, t):
        u = ups.get(i)
        if u is None or u.state == "idle" or not (msg.get("req") == u.req or
                                                  (u.tid and msg.get("transfer_id") == u.tid)):
            counters[ERRORS] += 1                       # nothing of ours: the broker confused a transfer
            return
        if msg.t == "ERROR":
            end_upload(i, u, t, msg["code"], abort=msg["code"] not in ("unknown_transfer",))
        elif msg.t == "ACCEPT" and u.state == "offered":
            if msg["committed"]:
                end_upload(i, u, t, "already_committed")
                return
            u.tid, u.state = msg["transfer_id"], "querying"
            put(i, t, "QUERY", transfer_id=u.tid, start=0, hashes=u.names)
        elif msg.t == "MISSING" and u.state == "querying":
            u.missing = sorted(msg["missing"])
            u.unstored = {u.names[k] for k in u.missing}
            u.state = "sending"
            pump(i, u, t)
        elif msg.t == "CREDIT":
            u.credit += msg["bytes"]
            pump(i, u, t)
        elif msg.t == "STORED":
            u.unstored.discard(msg["hash"])
            pump(i, u, t)
        elif msg.t == "COMMITTED" and u.state == "committing":
            end_upload(i, u, t, "COMMITTED" if msg["image_blake3"] == u.image else "wrong_blake3")
        else:
            end_upload(i, u, t, f"unexpected_{msg.t}", abort=True)

    def offer(i, u, t):
        u.new_snapshot(i, rng)
        req_seq[0] += 1
        u.req, u.t_offer, u.state = req_seq[0], t, "offered"
        last_heard[i] = max(last_heard[i], t)  # the short interval from now: the broker gets a full period (DealerLink)
        counters[OFFERED] += 1
        counters[IN_FLIGHT] += 1
        put(i, t, "OFFER", req=u.req, dataset="vol", snapshot=f"s{u.seq:06d}", image_size=CHUNK * len(u.chunks),
            chunk_size=CHUNK, chunk_count=len(u.chunks))

    try:
        t0 = t = counters[T_START] = time.monotonic()
        end, next_scan, next_timeouts, started, uploads_were_on = t + lifetime_s, t + interval_s, t, 0, False
        next_idle_poll = t
        while not stop.is_set() and t < end:
            cycle = time.monotonic()
            while started < n and (not rate or cycle >= t0 + started / rate):
                connect(started, cycle)                 # all at once (as after a broker restart), or ramped
                started += 1
            if not ups:
                ready = poller.poll(CYCLE_S * 1000)
            else:
                ready = up_poller.poll(UP_CYCLE_S * 1000) if up_poller.sockets else []
                if cycle >= next_idle_poll:
                    ready += poller.poll(0)
                    next_idle_poll = cycle + CYCLE_S
            for sock, _ in ready:
                i = index[sock]
                for _ in range(64):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    counters[RECEIVED] += 1
                    last_heard[i] = cycle
                    try:
                        msg = decode(frames)
                    except Exception:
                        counters[ERRORS] += 1
                        continue
                    counters[RECV_BY_TYPE + TYPE_INDEX[msg.t]] += 1
                    if msg.t == "WELCOME":
                        counters[WELCOMES] += 1
                        backoff[i] = 0.25
                        idle_s[i] = max(interval_s, (msg.get("idle_heartbeat_interval_ms") or 0) / 1000)
                        if not welcomed[i]:
                            welcomed[i] = True
                            counters[WELCOMED] += 1
                    elif msg.t == "ERROR" and msg["code"] == "not_registered":
                        counters[NOT_REGISTERED] += 1   # the broker forgot us: HELLO again
                        events.append((cycle, i, "not_registered"))
                        unwelcome(i)
                        u = ups.get(i)
                        if u is not None and u.state != "idle":
                            end_upload(i, u, cycle, "not_registered")
                        send(i, hellos[i], cycle, "HELLO")
                    elif msg.t in ("ACCEPT", "MISSING", "CREDIT", "STORED", "COMMITTED", "ERROR"):
                        on_upload_reply(i, msg, cycle)
            t = time.monotonic()
            counters[MAX_CYCLE] = max(counters[MAX_CYCLE], t - cycle)
            if not counters[T_ALL] and counters[WELCOMED] == n:
                counters[T_ALL] = t
            uploads_on = bool(control[UPLOADS_ON])
            if uploads_on and not uploads_were_on:      # spread the first offers over one period
                idle = [(t + rng.random() * every_s, i) for i, u in ups.items() if u.state == "idle"]
                heapq.heapify(idle)
            uploads_were_on = uploads_on
            while uploads_on and idle and idle[0][0] <= t:
                _, i = heapq.heappop(idle)
                u = ups[i]
                if u.state != "idle":
                    continue
                if welcomed[i]:
                    offer(i, u, t)
                else:
                    heapq.heappush(idle, (t + 1.0, i))
            if t >= next_timeouts:
                next_timeouts = t + 1.0
                for i, u in ups.items():
                    if u.state != "idle" and t - u.t_offer > UPLOAD_TIMEOUT_S:
                        end_upload(i, u, t, "timeout", abort=True)
            for queue in (due, due_idle):
                while queue and queue[0][0] <= t:
                    _, i, when = queue.popleft()
                    if last_sent[i] == when:            # nothing sent since: heartbeat
                        send(i, beat, t, "HEARTBEAT")
            if t >= next_scan:                          # a silent broker: reconnect, with back-off
                next_scan = t + 0.25
                for i in range(started):
                    if t - last_heard[i] > LIVENESS * interval_of(i):
                        counters[RECONNECTS] += 1
                        events.append((t, i, "reconnect"))
                        connect(i, t)
                        last_heard[i] = t + backoff[i]
                        backoff[i] = min(8.0, backoff[i] * 2)
            time.sleep(max(0.0, cycle + (UP_CYCLE_S if ups else CYCLE_S) - time.monotonic()))
    finally:
        for sock in socks:
            if sock is not None:
                sock.close(linger=0)
        ctx.term()
        results.put({"events": events, "uploads": outcomes})


def probe(endpoint: str, keys, seconds: float, every_s: float) -> dict:
    """Register one more device, then PING every `every_s` for `seconds`; PONG round trips in ms."""
    ctx = zmq.Context()
    sock = dealer(ctx, endpoint, keys)
    rtts, sent = [], 0
    try:
        sock.send_multipart(encode(make("HELLO", device_id=PROBE_ID)))
        deadline = time.monotonic() + 30
        while not (sock.poll(500) and decode(sock.recv_multipart()).t == "WELCOME"):
            if time.monotonic() >= deadline:
                raise TimeoutError("the probe was not welcomed within 30 s")
        next_ping = time.monotonic()
        end = next_ping + seconds
        while True:
            t = time.monotonic()
            if next_ping <= t < end:
                sock.send_multipart(encode(make("PING", seq=sent, sent_us=time.monotonic_ns() // 1000)))
                sent += 1
                next_ping = max(next_ping + every_s, t)
            if t >= end and (len(rtts) >= sent or t >= end + 2.0):
                break                                   # every PONG back, or 2 s of grace over
            if sock.poll(max(0.0, (min(next_ping, end) if t < end else end + 2.0) - t) * 1000):
                while sock.poll(0):
                    msg = decode(sock.recv_multipart())
                    if msg.t == "PONG":
                        rtts.append((time.monotonic_ns() // 1000 - msg["sent_us"]) / 1000)
    finally:
        sock.close(linger=0)
        ctx.term()
    q = quantiles(rtts)
    return {"probe_p50_ms": q[0], "probe_p99_ms": q[1], "probe_max_ms": q[2], "probe_sent": sent,
            "probe_lost": sent - len(rtts)}


def quantiles(values: list) -> tuple:
    """(p50, p99, max) of `values`, Nones if empty."""
    if not values:
        return None, None, None
    values = sorted(values)
    pick = lambda q: values[max(0, math.ceil(q * len(values)) - 1)]  # noqa: E731
    return pick(0.5), pick(0.99), values[-1]
