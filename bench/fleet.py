"""Fleet benchmark: one broker and two storage nodes under N CURVE appliances.

    .venv/bin/python bench/fleet.py [--devices 1000,3000,10000] [--uploading 0.1] [--snapshot-every-s 5] \\
        [--window-s 30] [--probe-ms 100] [--heartbeat-ms 1000] [--connect-rate 500] [--procs 2] \\
        [--insecure] [--json]
    # issue 10's acceptance run: --devices 10000 --window-s 300 (and again with --uploading 0)

For each fleet size N, in a fresh temporary directory ($TMPDIR) and on free
loopback ports: starts the real broker (`python -m roles broker`) and two real
storage nodes (`python -m roles storage`, node-a and node-b, data dirs in the
temporary directory), with CURVE unless --insecure (each its own key pair; the
N device keys, two node keys and an operator key enrolled); then --procs
load-generator processes (bench/fleetload.py) holding N/procs devices each,
which register at --connect-rate a second (0: all at once, as after a broker
restart) and keep real heartbeats. Once all are welcomed, the --uploading
fraction of them starts replicating a tiny snapshot (1-4 unique 64 KiB chunks)
every --snapshot-every-s, through the agent's real protocol. After a warm-up,
the measurement window (--window-s) runs a probe device that PINGs every
--probe-ms. Then offers stop and the uploads in flight drain.

Reported per N (the window is what the steady-state figures cover):
  register_s       first device socket opened to all N welcomed (includes the --connect-rate ramp);
  from_start_s     the same, from the broker's start;
  broker_cpu_%, main_cpu_% (its poll-loop thread), rss_MB (at the window's end);
  probe p50/p99/max ms; dropped: devices that got `not_registered` or reconnected in the window
  (none did anything wrong, so every one is a wrongful drop);
  commits_per_s (COMMITTED received in the window / window), commit latency p50/p99 (OFFER sent to
  COMMITTED received, for snapshots offered in the window), offered/committed/failed (snapshots
  offered in the window, counted after the drain; failures by ERROR code, or timeout/reconnected);
  msgs_per_s and broker_us_per_msg: broker CPU seconds in the window / messages the broker received
  plus sent in the window. Counted at the load generators: every message they sent and received, the
  probe's PINGs and PONGs, plus the broker<->node messages each of those implies (OPEN and OPENED per
  accepted offer; QUERY, CHUNK, COMMIT, ABORT forwarded to a node; MISSING, STORED, COMMITTED
  forwarded from one) and the nodes' heartbeats both ways (estimated: 2 nodes x 2 / interval);
  gen_cpu_% (the load generators and the probe's process) and nodes_cpu_% (both nodes), apart from
  the broker's; load averages at the row's start and end (the machine is shared).
Ratios to the smallest N of the same run follow (the machine is noisy: compare within a run).

Run by hand, never by the test suite. Everything started is ended and the
temporary directories removed, also on failure and Ctrl-C. Linux only.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:       # run as a script: make `bench` and `schemas` importable
    sys.path.insert(0, REPO)

import zmq  # noqa: E402

from bench.fleetload import (COMMITTED, COUNTERS, IN_FLIGHT, NO_SOCKET, NOT_REGISTERED, PROBE_ID,  # noqa: E402
                             RECONNECTS, RECV_BY_TYPE, SENT, RECEIVED, SENT_BY_TYPE, T_ALL, T_START, TYPE_INDEX,
                             UPLOADS_ON, WELCOMED, WELCOMES, ERRORS, MAX_CYCLE, fleet_worker, probe, quantiles,
                             write_cert)
from roles.localprocs import ProcessGroup, free_ports, wait_for  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
REGISTER_TIMEOUT_S = 180
DRAIN_TIMEOUT_S = 60
LIVENESS = 3
NODES = ("node-a", "node-b")
TO_NODE = ("QUERY", "CHUNK", "COMMIT", "ABORT")            # an agent's messages the broker passes on to a node
FROM_NODE = ("MISSING", "STORED", "COMMITTED")             # a node's the broker passes on to an agent


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


def setup(work: str, n: int, args, ports) -> tuple:
    """Keys and configs: (broker config path, node config paths, devices, probe keys, server public,
    status command)."""
    front, back, status = ports
    endpoint = f"tcp://127.0.0.1:{front}"
    keys = {d: os.path.join(work, "keys", d) for d in ("", "devices", "nodes", "operators")}
    [os.makedirs(d, exist_ok=True) for d in keys.values()]
    broker = {"frontend_bind": endpoint, "backend_bind": f"tcp://127.0.0.1:{back}",
              "status_bind": f"tcp://127.0.0.1:{status}", "data_dir": os.path.join(work, "var", "broker"),
              "heartbeat_interval_ms": args.heartbeat_ms, "heartbeat_liveness": LIVENESS, "insecure": args.insecure,
              "idle_heartbeat_interval_ms": max(args.idle_heartbeat_ms, args.heartbeat_ms)}
    nodes = {name: {"node_id": name, "broker": broker["backend_bind"], "data_dir": os.path.join(work, "var", name),
                    "heartbeat_interval_ms": args.heartbeat_ms, "insecure": args.insecure} for name in NODES}
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
        for name, conf in nodes.items():
            public, secret = zmq.curve_keypair()
            write_cert(keys["nodes"], name, public)
            conf.update(key_file=write_cert(keys[""], name, public, secret),
                        broker_key=os.path.join(keys[""], "broker.key"))
        op_public, op_secret = zmq.curve_keypair()
        write_cert(keys["operators"], "operator", op_public)
        status_cmd += ["--key-file", write_cert(keys[""], "operator", op_public, op_secret),
                       "--broker-key", os.path.join(keys[""], "broker.key")]
        broker.update(key_file=os.path.join(keys[""], "broker.key_secret"), authorized_keys=keys["devices"],
                      node_keys=keys["nodes"], operator_keys=keys["operators"])
    paths = {}
    for name, conf in [("broker", broker), *nodes.items()]:
        paths[name] = os.path.join(work, f"{name}.yaml")
        with open(paths[name], "w") as f:
            json.dump(conf, f, indent=2)                    # JSON is YAML
    return paths, devices, probe_pair, server_public, status_cmd, endpoint


def measure(n: int, args, env: dict) -> dict:
    work = tempfile.mkdtemp(prefix=f"fleet-{n}-")
    procs = ProcessGroup(work)
    spawn = mp.get_context("spawn")       # no zmq state inherited by fork
    stop, control, results, workers = spawn.Event(), spawn.RawArray("d", 4), spawn.Queue(), []
    row: dict = {"devices": n, "load_start": os.getloadavg()[0]}
    outputs: list = []
    try:
        paths, devices, probe_pair, server_public, status_cmd, endpoint = setup(work, n, args, free_ports(3))
        t_broker = time.monotonic()
        pid = procs.start("broker", [sys.executable, "-m", "roles", "broker", "--config", paths["broker"]],
                          cwd=REPO, env=env).pid

        def ask_status():
            procs.require_running("broker")
            run = procs.run("status", status_cmd, timeout_s=60, cwd=REPO, env=env)
            return json.loads(run.stdout) if run.returncode == 0 else None

        wait_for(ask_status, 30, "the broker's status socket", interval_s=0.2)
        node_pids = [procs.start(name, [sys.executable, "-m", "roles", "storage", "--config", paths[name]],
                                 cwd=REPO, env=env).pid for name in NODES]
        wait_for(lambda: (doc := ask_status()) and sum(s["alive"] for s in doc["storage"]) == len(NODES), 30,
                 "both storage nodes alive in the broker's status", interval_s=0.2)
        lifetime = REGISTER_TIMEOUT_S + args.snapshot_every_s + args.window_s + DRAIN_TIMEOUT_S + 180
        # a device may hold two sockets (one closing) of two fds each: more processes if the fd limit needs it
        nprocs = max(args.procs, math.ceil(4 * n / (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 256)))
        row["gen_procs"] = nprocs
        for k in range(nprocs):
            mine = devices[k::nprocs]
            counters = spawn.RawArray("d", COUNTERS)
            uploaders = list(range(round(args.uploading * len(mine))))
            proc = spawn.Process(target=fleet_worker, daemon=True, args=(
                mine, endpoint, server_public, args.heartbeat_ms / 1000, args.connect_rate / nprocs, counters,
                control, stop, lifetime, uploaders, args.snapshot_every_s, results))
            proc.start()
            workers.append((proc, counters))
        row["uploaders"] = sum(round(args.uploading * len(devices[k::nprocs])) for k in range(nprocs))

        def alive():
            procs.require_running("broker")
            if not all(proc.is_alive() for proc, _ in workers):
                raise RuntimeError("a load generator exited")

        def registered():
            alive()
            return all(c[T_ALL] for _, c in workers)

        try:
            wait_for(registered, REGISTER_TIMEOUT_S, f"{n} devices welcomed", interval_s=0.05)
            t_all = max(c[T_ALL] for _, c in workers)
            row["register_s"] = t_all - min(c[T_START] for _, c in workers)
            row["from_start_s"] = t_all - t_broker
        except TimeoutError as exc:
            row["register_s"] = None
            row["note"] = f"{exc}: {sum(int(c[WELCOMED]) for _, c in workers)} welcomed"
        row["reconnects_registering"] = int(sum(c[RECONNECTS] for _, c in workers))
        control[UPLOADS_ON] = 1
        time.sleep(2 * args.heartbeat_ms / 1000 + (args.snapshot_every_s if args.uploading else 0))  # warm-up
        alive()
        before = [c[:] for _, c in workers]
        me = resource.getrusage(resource.RUSAGE_SELF)
        gen0 = sum(cpu_s(f"/proc/{p.pid}/stat") for p, _ in workers) + me.ru_utime + me.ru_stime
        nodes0 = sum(cpu_s(f"/proc/{p}/stat") for p in node_pids)
        t0, cpu0, main0 = time.monotonic(), cpu_s(f"/proc/{pid}/stat"), cpu_s(f"/proc/{pid}/task/{pid}/stat")
        row.update(probe(endpoint, probe_pair + (server_public,) if server_public else None, args.window_s,
                         args.probe_ms / 1000))
        t1 = time.monotonic()
        wall = t1 - t0
        broker_cpu = cpu_s(f"/proc/{pid}/stat") - cpu0
        row["broker_cpu_%"] = broker_cpu / wall * 100
        row["main_cpu_%"] = (cpu_s(f"/proc/{pid}/task/{pid}/stat") - main0) / wall * 100
        row["rss_MB"] = rss_mb(pid)
        me = resource.getrusage(resource.RUSAGE_SELF)
        row["gen_cpu_%"] = (sum(cpu_s(f"/proc/{p.pid}/stat") for p, _ in workers) + me.ru_utime + me.ru_stime
                            - gen0) / wall * 100
        row["nodes_cpu_%"] = (sum(cpu_s(f"/proc/{p}/stat") for p in node_pids) - nodes0) / wall * 100
        after = [c[:] for _, c in workers]
        control[UPLOADS_ON] = 0                                  # drain: every offered snapshot ends
        try:
            wait_for(lambda: alive() or sum(c[IN_FLIGHT] for _, c in workers) == 0, DRAIN_TIMEOUT_S,
                     "the uploads in flight to end", interval_s=0.1)
        except TimeoutError as exc:
            row["note"] = str(exc)
        count_messages(row, before, after, wall, args)
        row["broker_us_per_msg"] = broker_cpu / row["broker_msgs"] * 1e6 if row["broker_msgs"] else None
        total = lambda snap, i: int(sum(c[i] for c in snap))  # noqa: E731
        row["reconnects"] = total(after, RECONNECTS)
        row["re_registrations"] = total(after, WELCOMES) - n
        row["not_registered"], row["gen_errors"] = total(after, NOT_REGISTERED), total(after, ERRORS)
        row["no_socket"] = total(after, NO_SOCKET)                  # device sockets the fd limit refused
        row["gen_max_cycle_s"] = max(c[MAX_CYCLE] for c in after)   # a generator too busy to hear in time?
        row["commits_total"] = total(after, COMMITTED)
        doc = ask_status()
        row["connected"] = sum(1 for a in doc["agents"] if a["connected"] and a["device_id"] != PROBE_ID)
        row["broker_dropped"] = doc["broker"].get("dropped_messages")
        row["broker_errors"] = doc["broker"].get("errors_by_code")
        if args.kill_broker:
            pid = kill_and_restart(row, n, procs, paths, workers, status_cmd, env, alive)
        stop.set()
        for _ in workers:
            outputs.append(results.get(timeout=60))
        window_outcomes(row, outputs, t0, t1)
    except (RuntimeError, TimeoutError, OSError, ValueError, queue.Empty) as exc:
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
        row["load_end"] = os.getloadavg()[0]
    return row


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full (TcpExt)."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["ListenOverflows"])


def catalog_keys(procs, status_cmd, env) -> set:
    """Every committed (device, dataset, snapshot) the broker lists (paged by the CLI)."""
    cmd = [a if a != "status" else "list" for a in status_cmd]
    run = procs.run("list", cmd, timeout_s=120, cwd=REPO, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"list failed: {run.stderr.strip()[:200]}")
    return {(s["device_id"], s["dataset"], s["snapshot"]) for s in json.loads(run.stdout)}


def kill_and_restart(row: dict, n: int, procs, paths, workers, status_cmd, env, alive) -> int:
    """kill -9 the broker with every device connected, start it again on the same ports and data:
    the time until all N are welcomed again, the peak registrations per second (what a restart
    storm looks like at the broker), and whether every snapshot committed before is still listed."""
    before = catalog_keys(procs, status_cmd, env)
    welcomes0 = sum(c[WELCOMES] for _, c in workers)
    overflows0 = listen_overflows()
    procs.procs["broker"].kill()
    procs.procs["broker"].wait(10)
    t_kill = time.monotonic()
    procs.start("broker-restarted", [sys.executable, "-m", "roles", "broker", "--config", paths["broker"]],
                cwd=REPO, env=env)
    procs.procs["broker"] = procs.procs["broker-restarted"]   # what alive() watches
    per_second, last, t_all = [], welcomes0, None
    while time.monotonic() - t_kill < REGISTER_TIMEOUT_S:
        time.sleep(1.0)
        alive()
        now_welcomes = sum(c[WELCOMES] for _, c in workers)
        per_second.append(now_welcomes - last)
        last = now_welcomes
        if now_welcomes - welcomes0 >= n:
            t_all = time.monotonic() - t_kill
            break
    after = catalog_keys(procs, status_cmd, env)
    row["restart_register_s"] = t_all
    row["restart_peak_welcomes_per_s"] = max(per_second, default=0)
    row["restart_committed_before"] = len(before)
    row["restart_lost"] = len(before - after)
    row["restart_listen_overflows"] = listen_overflows() - overflows0
    return procs.procs["broker"].pid


def count_messages(row: dict, before, after, wall: float, args) -> None:
    """Messages the broker received plus sent in the window (see the docstring for what is counted)."""
    diff = lambda base, t: sum(a[base + TYPE_INDEX[t]] - b[base + TYPE_INDEX[t]]  # noqa: E731
                               for a, b in zip(after, before))
    agent = sum(a[SENT] + a[RECEIVED] - b[SENT] - b[RECEIVED] for a, b in zip(after, before))
    opens = diff(RECV_BY_TYPE, "ACCEPT")                    # each: an OPEN and an OPENED
    node = (2 * opens + sum(diff(SENT_BY_TYPE, t) for t in TO_NODE) + sum(diff(RECV_BY_TYPE, t) for t in FROM_NODE)
            + len(NODES) * 2 * wall / (args.heartbeat_ms / 1000))
    probe_msgs = row.get("probe_sent", 0) * 2
    row["broker_msgs"] = int(agent + node + probe_msgs)
    row["msgs_per_s"] = row["broker_msgs"] / wall
    row["node_msgs_per_s"] = node / wall
    row["chunks_per_s"] = diff(SENT_BY_TYPE, "CHUNK") / wall


def window_outcomes(row: dict, outputs: list, t0: float, t1: float) -> None:
    events = [e for out in outputs for e in out["events"] if t0 <= e[0] <= t1]
    row["dropped"] = len({(e[1], k) for k, out in enumerate(outputs) for e in out["events"] if t0 <= e[0] <= t1})
    row["drop_events"] = len(events)
    uploads = [u for out in outputs for u in out["uploads"]]
    offered = [u for u in uploads if t0 <= u[0] <= t1]
    ok = [u for u in offered if u[2] == "COMMITTED"]
    row["offered"], row["committed"] = len(offered), len(ok)
    failed: dict = {}
    for u in offered:
        if u[2] != "COMMITTED":
            failed[u[2]] = failed.get(u[2], 0) + 1
    row["failed"] = sum(failed.values())
    row["failed_by_code"] = failed
    row["commits_per_s"] = sum(1 for u in uploads if u[2] == "COMMITTED" and t0 <= u[1] <= t1) / (t1 - t0)
    p50, p99, top = quantiles([(u[1] - u[0]) * 1000 for u in ok])
    row["commit_p50_ms"], row["commit_p99_ms"], row["commit_max_ms"] = p50, p99, top


# ------------------------------------------------------------------ report

TABLES = [
    ["devices", "register_s", "from_start_s", "reconnects_registering", "broker_cpu_%", "main_cpu_%", "rss_MB",
     "probe_p50_ms", "probe_p99_ms", "probe_max_ms", "probe_lost", "dropped", "connected", "load_start", "load_end"],
    ["devices", "uploaders", "offered", "committed", "failed", "commits_per_s", "commit_p50_ms", "commit_p99_ms",
     "chunks_per_s", "msgs_per_s", "broker_us_per_msg", "gen_cpu_%", "nodes_cpu_%"],
    ["devices", "restart_register_s", "restart_peak_welcomes_per_s", "restart_committed_before", "restart_lost",
     "restart_listen_overflows"],
]


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
        print()
    for cols in TABLES:
        table(cols, rows)
    base = rows[0]
    print(f"ratios against N={base['devices']} (same run):")
    per_dev = lambda r, k: r.get(k) and r[k] / r["devices"]  # noqa: E731
    table(["devices", "broker_us_per_msg_x", "main_cpu_per_device_x", "broker_cpu_per_device_x", "probe_p99_x",
           "commit_p99_x"], [{
               "devices": r["devices"],
               "broker_us_per_msg_x": ratio(r.get("broker_us_per_msg"), base.get("broker_us_per_msg")),
               "main_cpu_per_device_x": ratio(per_dev(r, "main_cpu_%"), per_dev(base, "main_cpu_%")),
               "broker_cpu_per_device_x": ratio(per_dev(r, "broker_cpu_%"), per_dev(base, "broker_cpu_%")),
               "probe_p99_x": ratio(r.get("probe_p99_ms"), base.get("probe_p99_ms")),
               "commit_p99_x": ratio(r.get("commit_p99_ms"), base.get("commit_p99_ms"))} for r in rows])
    for r in rows:
        extra = {k: r.get(k) for k in ("failed_by_code", "broker_errors", "broker_dropped", "re_registrations",
                                       "not_registered", "reconnects", "gen_errors", "no_socket", "gen_max_cycle_s",
                                       "drop_events", "gen_procs", "note") if r.get(k)}
        print(f"N={r['devices']}: {extra}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1000,3000,10000", help="fleet sizes, comma separated")
    p.add_argument("--uploading", type=float, default=0.1, help="fraction of the devices uploading snapshots")
    p.add_argument("--snapshot-every-s", type=float, default=5.0, help="an uploading device's snapshot period")
    p.add_argument("--window-s", type=float, default=30.0,
                   help="measurement window (issue 10's acceptance: 300 at 10,000 devices)")
    p.add_argument("--probe-ms", type=float, default=100.0, help="the probe's PING period")
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--kill-broker", action="store_true",
                   help="after the window: kill -9 the broker, restart it, time the fleet's return, check the catalog")
    p.add_argument("--idle-heartbeat-ms", type=int, default=5000,
                   help="broker idle_heartbeat_interval_ms: devices with no upload beat this often (WELCOME)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (more if the fd limit needs)")
    p.add_argument("--connect-rate", type=float, default=500,
                   help="devices connecting per second while registering (0: all at once, as after a restart)")
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
    print(f"broker runs {roles_file}; fd limit {hard}; {vars(args)}", file=sys.stderr)
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
    ok = all(r.get("connected") == r["devices"] and not r.get("dropped") and r.get("offered") == r.get("committed")
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
