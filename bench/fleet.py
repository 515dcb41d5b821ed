"""Fleet benchmark: one broker holding thousands of idle devices on heartbeats.

    .venv/bin/python bench/fleet.py --devices 1000,3000,5000,10000 \\
        [--heartbeat-ms 1000] [--seconds 20] [--procs 2] [--connect-rate 0] [--insecure] [--json]

For each fleet size N, in a fresh temporary directory and on free loopback
ports: starts the real broker (`python -m roles broker`), with CURVE unless
--insecure (its own key pair, N enrolled device keys, an operator key); starts
--procs load-generator processes, each owning N/procs devices: one DEALER per
device with its own key, all under one zmq.Poller, which HELLO, wait for
WELCOME and then send HEARTBEAT whenever they have sent nothing for one
interval, answer nothing else, and reconnect with back-off as the real agent
does when the broker falls silent (or re-HELLO on `not_registered`). Once
all N are welcomed, a probe device PINGs every 50 ms for --seconds. By
default all N connect at once, as after a broker restart; --connect-rate
spreads that out (register_s then includes the ramp).

Reported per N: register_s (first socket opened to all N welcomed at once);
over the steady-state window, the broker's CPU as % of one core, whole
process and its main thread (the poll loop), main-thread CPU per 1,000
devices, RSS; the probe's PONG round trip p50/p99; devices `connected` in the
broker's status (should equal N); reconnects and re-registrations seen; and
the load generators' CPU (on 2 cores they compete with the broker). The
machine is shared and noisy, so each row is also given as ratios to the
smallest N of the same run.

Run by hand, never by the test suite. Everything started is ended and the
temporary directories removed, also on failure and Ctrl-C. Linux only.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:       # run as a script: make `bench` and `schemas` importable
    sys.path.insert(0, REPO)

import zmq  # noqa: E402

from roles.localprocs import ProcessGroup, free_ports, wait_for  # noqa: E402
from schemas import decode, encode, make  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
CYCLE_S = 0.05            # a load generator polls its sockets at most 20 times a second
PROBE_EVERY_S = 0.05
REGISTER_TIMEOUT_S = 180
LIVENESS = 3              # the broker's default heartbeat_liveness; the devices use it too
PROBE_ID = "fleet-probe"
# per-generator shared counters
WELCOMED, WELCOMES, RECONNECTS, NOT_REGISTERED, ERRORS, SENT, RECEIVED, T_START, T_ALL, MAX_CYCLE, NO_SOCKET \
    = range(11)


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


# ------------------------------------------------------------------ load generator (child process)

def fleet_worker(devices, endpoint, server_public, interval_s, rate, counters, stop, lifetime_s) -> None:
    """Own `devices` [(device_id, public, secret)], connecting `rate` a second (0: all at once),
    until `stop` is set or lifetime_s passes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # the parent ends us
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = len(devices)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, min(ctx.get(zmq.SOCKET_LIMIT), 4 * n + 64))  # closed ones wait for the reaper
    poller = zmq.Poller()
    socks: list = [None] * n
    index: dict = {}
    last_sent, last_heard, backoff = [0.0] * n, [0.0] * n, [0.25] * n
    welcomed = [False] * n
    due: deque = deque()        # (heartbeat due at, device, last_sent it was due for): in time order
    beat = encode(make("HEARTBEAT"))
    hellos = [encode(make("HELLO", device_id=d, software="fleet-bench")) for d, _, _ in devices]

    def send(i, frames, t):
        try:
            socks[i].send_multipart(frames, zmq.NOBLOCK)
        except (zmq.Again, AttributeError):
            pass                                        # the agent's Outbox drops it too; or no socket
        last_sent[i] = t
        due.append((t + interval_s, i, t))
        counters[SENT] += 1

    def unwelcome(i):
        if welcomed[i]:
            welcomed[i] = False
            counters[WELCOMED] -= 1

    def connect(i, t):
        if socks[i] is not None:
            poller.unregister(socks[i])
            del index[socks[i]]
            socks[i].close(linger=0)
            socks[i] = None
        unwelcome(i)
        last_heard[i] = t
        _, public, secret = devices[i]
        try:
            socks[i] = dealer(ctx, endpoint, (public, secret, server_public) if server_public else None)
        except zmq.ZMQError:                            # out of fds or sockets: try again later
            counters[NO_SOCKET] += 1
            return
        index[socks[i]] = i
        poller.register(socks[i], zmq.POLLIN)
        send(i, hellos[i], t)

    try:
        t0 = t = counters[T_START] = time.monotonic()
        end, next_scan, started = t + lifetime_s, t + interval_s, 0
        while not stop.is_set() and t < end:
            cycle = time.monotonic()
            while started < n and (not rate or cycle >= t0 + started / rate):
                connect(started, cycle)                 # all at once (as after a broker restart), or ramped
                started += 1
            for sock, _ in poller.poll(CYCLE_S * 1000):
                i = index[sock]
                for _ in range(64):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    counters[RECEIVED] += 1
                    last_heard[i] = cycle
                    try:
                        msg = decode(frames)
                    except Exception:
                        counters[ERRORS] += 1
                        continue
                    if msg.t == "WELCOME":
                        counters[WELCOMES] += 1
                        backoff[i] = 0.25
                        if not welcomed[i]:
                            welcomed[i] = True
                            counters[WELCOMED] += 1
                    elif msg.t == "ERROR" and msg["code"] == "not_registered":
                        counters[NOT_REGISTERED] += 1   # the broker forgot us: HELLO again
                        unwelcome(i)
                        send(i, hellos[i], cycle)
                    elif msg.t == "ERROR":
                        counters[ERRORS] += 1
            t = time.monotonic()
            counters[MAX_CYCLE] = max(counters[MAX_CYCLE], t - cycle)
            if not counters[T_ALL] and counters[WELCOMED] == n:
                counters[T_ALL] = t
            while due and due[0][0] <= t:
                _, i, when = due.popleft()
                if last_sent[i] == when:                # nothing sent since: heartbeat
                    send(i, beat, t)
            if t >= next_scan:                          # a silent broker: reconnect, with back-off
                next_scan = t + 0.25
                for i in range(started):
                    if t - last_heard[i] > LIVENESS * interval_s:
                        counters[RECONNECTS] += 1
                        connect(i, t)
                        last_heard[i] = t + backoff[i]
                        backoff[i] = min(8.0, backoff[i] * 2)
            time.sleep(max(0.0, cycle + CYCLE_S - time.monotonic()))
    finally:
        for sock in socks:
            if sock is not None:
                sock.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------ measurements

def cpu_s(stat_path: str) -> float:
    """utime + stime from a /proc stat file (a process, or one of its threads)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS   # fields 14 and 15


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def probe(endpoint: str, keys, seconds: float) -> dict:
    """Register one more device, then PING every 50 ms; PONG round trips in ms."""
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
                next_ping = max(next_ping + PROBE_EVERY_S, t)
            if t >= end and (len(rtts) >= sent or t >= end + 1.0):
                break                                   # every PONG back, or 1 s of grace over
            if sock.poll(max(0.0, (min(next_ping, end) if t < end else end + 1.0) - t) * 1000):
                while sock.poll(0):
                    msg = decode(sock.recv_multipart())
                    if msg.t == "PONG":
                        rtts.append((time.monotonic_ns() // 1000 - msg["sent_us"]) / 1000)
    finally:
        sock.close(linger=0)
        ctx.term()
    rtts.sort()
    pick = (lambda q: rtts[max(0, math.ceil(q * len(rtts)) - 1)]) if rtts else (lambda q: None)
    return {"probe_p50_ms": pick(0.5), "probe_p99_ms": pick(0.99), "probe_lost": sent - len(rtts)}


def measure(n: int, args, env: dict) -> dict:
    work = tempfile.mkdtemp(prefix=f"fleet-{n}-")
    procs = ProcessGroup(work)
    spawn = mp.get_context("spawn")       # no zmq state inherited by fork
    stop, workers = spawn.Event(), []
    row: dict = {"devices": n}
    try:
        front, back, status = free_ports(3)
        endpoint = f"tcp://127.0.0.1:{front}"
        keys = {d: os.path.join(work, "keys", d) for d in ("", "devices", "nodes", "operators")}
        [os.makedirs(d, exist_ok=True) for d in keys.values()]
        broker = {"frontend_bind": endpoint, "backend_bind": f"tcp://127.0.0.1:{back}",
                  "status_bind": f"tcp://127.0.0.1:{status}", "data_dir": os.path.join(work, "var"),
                  "heartbeat_interval_ms": args.heartbeat_ms, "heartbeat_liveness": LIVENESS,
                  "insecure": args.insecure}
        status_cmd = [sys.executable, "-m", "roles", "status", "--broker", broker["status_bind"], "--json",
                      "--timeout-ms", "30000"]
        devices = [(f"dev-{i:05d}", *zmq.curve_keypair()) for i in range(n)]
        probe_pair, server_public = zmq.curve_keypair(), None
        if not args.insecure:
            server_public, server_secret = zmq.curve_keypair()
            write_cert(keys[""], "broker", server_public)
            write_cert(keys[""], "broker", server_public, server_secret)
            for name, public, _ in [*devices, (PROBE_ID, *probe_pair)]:
                write_cert(keys["devices"], name, public)
            op_public, op_secret = zmq.curve_keypair()
            write_cert(keys["operators"], "operator", op_public)
            status_cmd += ["--key-file", write_cert(keys[""], "operator", op_public, op_secret),
                           "--broker-key", os.path.join(keys[""], "broker.key")]
            broker.update(key_file=os.path.join(keys[""], "broker.key_secret"), authorized_keys=keys["devices"],
                          node_keys=keys["nodes"], operator_keys=keys["operators"])
        config = os.path.join(work, "broker.yaml")
        with open(config, "w") as f:
            json.dump(broker, f, indent=2)                    # JSON is YAML
        pid = procs.start("broker", [sys.executable, "-m", "roles", "broker", "--config", config],
                          cwd=REPO, env=env).pid

        def ask_status():
            procs.require_running("broker")
            run = procs.run("status", status_cmd, timeout_s=60, cwd=REPO, env=env)
            return json.loads(run.stdout) if run.returncode == 0 else None

        wait_for(ask_status, 30, "the broker's status socket", interval_s=0.2)
        lifetime = REGISTER_TIMEOUT_S + 4 * args.heartbeat_ms / 1000 + args.seconds + 120
        # a device may hold two sockets (one closing) of two fds each: more processes if the fd limit needs it
        nprocs = max(args.procs, math.ceil(4 * n / (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 256)))
        row["gen_procs"] = nprocs
        for k in range(nprocs):
            counters = spawn.RawArray("d", NO_SOCKET + 1)
            proc = spawn.Process(target=fleet_worker, daemon=True, args=(
                devices[k::nprocs], endpoint, server_public, args.heartbeat_ms / 1000, args.connect_rate / nprocs,
                counters, stop, lifetime))
            proc.start()
            workers.append((proc, counters))

        def registered():
            procs.require_running("broker")
            if not all(proc.is_alive() for proc, _ in workers):
                raise RuntimeError("a load generator exited")
            return all(c[T_ALL] for _, c in workers)

        try:
            wait_for(registered, REGISTER_TIMEOUT_S, f"{n} devices welcomed", interval_s=0.05)
            row["register_s"] = max(c[T_ALL] for _, c in workers) - min(c[T_START] for _, c in workers)
        except TimeoutError as exc:
            row["register_s"] = None
            row["note"] = f"{exc}: {sum(int(c[WELCOMED]) for _, c in workers)} welcomed"
        time.sleep(2 * args.heartbeat_ms / 1000)               # the registration burst drains
        before = [c[:] for _, c in workers]
        gen0 = sum(cpu_s(f"/proc/{p.pid}/stat") for p, _ in workers)
        t0, cpu0, main0 = time.monotonic(), cpu_s(f"/proc/{pid}/stat"), cpu_s(f"/proc/{pid}/task/{pid}/stat")
        row.update(probe(endpoint, probe_pair + (server_public,) if server_public else None, args.seconds))
        wall = time.monotonic() - t0
        row["broker_cpu_%"] = (cpu_s(f"/proc/{pid}/stat") - cpu0) / wall * 100
        row["main_thread_cpu_%"] = (cpu_s(f"/proc/{pid}/task/{pid}/stat") - main0) / wall * 100
        row["main_cpu_per_1000_%"] = row["main_thread_cpu_%"] / (n / 1000)
        row["rss_MB"] = rss_mb(pid)
        row["gen_cpu_%"] = (sum(cpu_s(f"/proc/{p.pid}/stat") for p, _ in workers) - gen0) / wall * 100
        after = [c[:] for _, c in workers]
        total = lambda snap, i: int(sum(c[i] for c in snap))  # noqa: E731
        row["reconnects"] = total(after, RECONNECTS)
        row["reconnects_in_window"] = total(after, RECONNECTS) - total(before, RECONNECTS)
        row["re_registrations"] = total(after, WELCOMES) - n
        row["not_registered"], row["errors"] = total(after, NOT_REGISTERED), total(after, ERRORS)
        row["no_socket"] = total(after, NO_SOCKET)                  # device sockets the fd limit refused
        row["gen_max_cycle_s"] = max(c[MAX_CYCLE] for c in after)   # a generator too busy to hear in time?
        doc = ask_status()
        row["connected"] = sum(1 for a in doc["agents"] if a["connected"] and a["device_id"] != PROBE_ID)
        row["broker_dropped"] = doc["broker"].get("dropped_messages")
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        row["note"] = f"failed: {exc}".splitlines()[0]
    finally:
        stop.set()
        for proc, _ in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        procs.close()
        shutil.rmtree(work, ignore_errors=True)
    return row


# ------------------------------------------------------------------ report

COLUMNS = ["devices", "register_s", "broker_cpu_%", "main_thread_cpu_%", "main_cpu_per_1000_%", "rss_MB",
           "probe_p50_ms", "probe_p99_ms", "connected", "reconnects", "re_registrations", "gen_cpu_%"]


def ratio(a, b):
    return a / b if a is not None and b else None


def print_table(rows: list) -> None:
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    def table(cols, data):
        cells = [[fmt(r.get(c)) for c in cols] for r in data]
        widths = [max(len(c), *(len(x[k]) for x in cells)) for k, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for x in cells:
            print("  ".join(v.rjust(w) for v, w in zip(x, widths)))
    table(COLUMNS, rows)
    base = rows[0]
    print(f"\nratios against N={base['devices']} (same run):")
    table(["devices", "main_cpu_per_device_x", "broker_cpu_per_device_x", "probe_p99_x"], [{
        "devices": r["devices"],
        "main_cpu_per_device_x": ratio(r.get("main_cpu_per_1000_%"), base.get("main_cpu_per_1000_%")),
        "broker_cpu_per_device_x": ratio(r.get("broker_cpu_%") and r["broker_cpu_%"] / r["devices"],
                                         base.get("broker_cpu_%") and base["broker_cpu_%"] / base["devices"]),
        "probe_p99_x": ratio(r.get("probe_p99_ms"), base.get("probe_p99_ms"))} for r in rows])
    for r in rows:
        if r.get("note"):
            print(f"N={r['devices']}: {r['note']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1000,3000,5000,10000", help="fleet sizes, comma separated")
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20.0, help="steady-state measurement window")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (more if the fd limit needs)")
    p.add_argument("--connect-rate", type=float, default=0,
                   help="devices connecting per second during registration (default 0: all at once)")
    p.add_argument("--insecure", action="store_true", help="plain TCP instead of CURVE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted(int(x) for x in args.devices.split(","))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the broker: one fd per device
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONUNBUFFERED="1")
    roles_file = subprocess.run([sys.executable, "-c", "import roles; print(roles.__file__)"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60).stdout.strip()
    print(f"broker runs {roles_file}, load generators {sys.modules['schemas'].__file__}; fd limit {hard}",
          file=sys.stderr)
    rows = []
    try:
        for n in sizes:
            t = time.monotonic()
            rows.append(measure(n, args, env))
            print(f"N={n} done in {time.monotonic() - t:.0f}s: {rows[-1]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0 if all(r.get("connected") == r["devices"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
