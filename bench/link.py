"""Link bench: the client-side management figures on a real shaped 100 Mbit/s office link.

    sudo .venv/bin/python bench/link.py [--only NAME ...] [--keep]

Builds the shaped link of tests/netns.py (two network namespaces joined by a
veth pair, the office side limited by tbf to 100 Mbit/s with a 50 ms buffer),
runs the real broker and storage worker in the "cloud" namespace and the
agent in the "office" one, and measures what tests/test_e2e_link.py asserts,
with the same functions (defined here, imported by the tests):

- goodput: the agent's goodput without a limit, as a fraction of the link
  rate, and its CPU seconds per GB sent (and per GB of image) while it fills
  the link, as a fraction of one core;
- limit: `limit: 40Mbit` measured on the link over 20 s and its worst 100 ms
  interval; a schedule window that opens during the run (10 Mbit/s) and a
  SIGHUP with a new limit (20 Mbit/s): how long each took to apply;
- yield: `limit: yield` against a competing bulk TCP flow in the office: the
  flow's share of the link while the agent runs, and how fast the agent
  takes the link back once the flow stops;
- preempt: an incremental of a priority-1 dataset appearing while a 1 GiB
  priority-5 full upload runs: time to its commit, and how much of the full
  upload was left;
- weights: two concurrent transfers with weights 3 and 1: their ratio.

Rates are compared with the link's nominal rate (tbf's 100 Mbit/s of
Ethernet frames); the best a single TCP flow reaches on it is measured too
(`tcp`) to show what the headers leave. Needs root. Every process and both
namespaces are removed at the end, also on failure and Ctrl-C; the work
directory too unless --keep. Exit 0 when every scenario ran, 1 otherwise,
2 when the link cannot be built here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, REPO)

from roles.sampleimages import MiB, generate_image, mutate_chunks  # noqa: E402
from roles.localprocs import cpu_seconds  # noqa: E402
from roles.statusclient import fetch_list  # noqa: E402
from tests.netns import (MBIT, BulkFlow, LinkCluster, LinkMeter, LinkUnavailable, ShapedLink,  # noqa: E402
                         why_unavailable)

DEVICE = "office-1"
GB = 10**9


def random_image(path: Path, size: int, seed: int) -> str:
    """An incompressible image (what travels is what it holds); hex blake3."""
    return generate_image(str(path), size, seed=seed, zero_fraction=0.0, text_fraction=0.0)


def _now() -> float:
    return time.monotonic()


def _sent_at(cluster: LinkCluster, dataset: str) -> tuple[float, int]:
    """(time, payload bytes the broker has received for the dataset), timed at the query's midpoint."""
    before = _now()
    sent = cluster.upload_bytes_sent(DEVICE, dataset)
    return (before + _now()) / 2, sent


def _committed(cluster: LinkCluster, dataset: str, snapshot: str) -> bool:
    return any(s["dataset"] == dataset and s["snapshot"] == snapshot
               for s in fetch_list(cluster.status_endpoint, DEVICE))


def _agent_sending(cluster: LinkCluster) -> bool:
    doc = cluster.agent_status(DEVICE)
    return bool(doc) and any(t["bytes_sent"] > 0 for t in doc["transfers"])


# ------------------------------------------------------------------ scenarios


def measure_tcp(link: ShapedLink, meter: LinkMeter, seconds: float = 4.0) -> dict:
    """The goodput one bulk TCP flow gets on the link alone: what its headers leave of the nominal rate."""
    flow = BulkFlow(link, port=5299).start(seconds)
    try:
        flow.wait()
    finally:
        flow.close()
    t0, t1 = flow.first_byte_at + 0.5, flow.last_byte_at - 0.2
    return {"tcp_goodput": flow.rate(t0, t1), "tcp_frames": meter.frame_rate(t0, t1)}


def measure_goodput(cluster: LinkCluster, meter: LinkMeter, size: int = 192 * MiB, window_s: float = 10.0,
                    realistic: bool = False, seed: int = 1) -> dict:
    """Unlimited agent: goodput (payload the broker received per second) over `window_s` of a running upload,
    the link's frame rate in the same window, and the agent's CPU in it."""
    directory = cluster.dataset_dir(DEVICE, "bulk")
    if realistic:
        digest = generate_image(str(directory / "s1.img"), size, seed=seed)
    else:
        digest = random_image(directory / "s1.img", size, seed)
    cfg = cluster.agent_config(DEVICE, [{"name": "bulk", "path": directory}], limit="none")
    proc = cluster.start_agent_once(cfg)
    cluster.wait_for(lambda: _sent_at(cluster, "bulk")[1] >= 8 * MiB, 60, "the upload under way on the link")
    (t0, sent0), cpu0 = _sent_at(cluster, "bulk"), cpu_seconds(proc.pid)
    meter.wait_until(t0 + window_s)
    (t1, sent1), cpu1 = _sent_at(cluster, "bulk"), cpu_seconds(proc.pid)
    rc, doc, log = cluster.finish_agent(cfg.stem, timeout_s=300)
    if rc != 0:
        raise AssertionError(f"agent --once exited {rc}\n{log}")
    (summary,) = doc["transfers"]
    goodput = (sent1 - sent0) / (t1 - t0)
    cpu_s = cpu1 - cpu0
    image_ratio = summary["bytes_image"] / max(1, summary["bytes_sent"])  # image bytes per wire byte
    return {
        "state": summary["state"], "blake3": digest, "listed": _listed_blake3(cluster, "bulk", "s1"),
        "window_s": t1 - t0, "goodput": goodput, "frames": meter.frame_rate(t0, t1),
        "payload_on_link": meter.payload_rate(t0, t1),
        "cpu_core_fraction": cpu_s / (t1 - t0),
        "cpu_s_per_gb_sent": cpu_s / ((sent1 - sent0) / GB),
        "cpu_s_per_gb_image": cpu_s / ((sent1 - sent0) * image_ratio / GB),
        "image_per_wire": image_ratio, "whole_seconds": summary["seconds"],
    }


def _listed_blake3(cluster: LinkCluster, dataset: str, snapshot: str) -> str | None:
    for s in fetch_list(cluster.status_endpoint, DEVICE):
        if (s["dataset"], s["snapshot"]) == (dataset, snapshot):
            return s["blake3"]
    return None


def _wall_clock(seconds_from_now: float) -> tuple[str, float]:
    """("HH:MM:SS" local time at the next whole second >= now + seconds, its monotonic time)."""
    wall, mono = dt.datetime.now(), _now()
    target = (wall + dt.timedelta(seconds=seconds_from_now)).replace(microsecond=0) + dt.timedelta(seconds=1)
    return target.strftime("%H:%M:%S"), mono + (target - wall).total_seconds()


def _switch(meter: LinkMeter, event: float, rate: float, settle_s: float = 2.0, hold_s: float = 3.0) -> dict:
    """How a limit change at monotonic `event` showed on the link's frames: when the rate over 0.5 s first
    came within 15% of the new `rate`, and the rate and worst 100 ms interval from event+settle_s for hold_s."""
    meter.wait_until(event + settle_s + hold_s + 0.1)
    reached = meter.first_time(event, event + settle_s + hold_s,
                               lambda r: abs(r - rate) <= 0.15 * rate, window_s=0.5, payload=False)
    later = (event + settle_s, event + settle_s + hold_s)
    return {"switch_s": None if reached is None else reached - event,
            "rate_after": meter.frame_rate(*later),
            "worst_100ms_after": max(r for _, r in meter.intervals(*later, payload=False))}


def measure_limit(cluster: LinkCluster, meter: LinkMeter, window_s: float = 20.0, limit_mbit: int = 40,
                  hup_mbit: int = 20, window_mbit: int = 10, size: int = 256 * MiB) -> dict:
    """`limit: 40Mbit` measured on the link over `window_s`; then SIGHUP with `limit: hup_mbit`; then a
    schedule window (days: all, in the config from the start) opens during the run with `window_mbit`."""
    directory = cluster.dataset_dir(DEVICE, "bulk")
    random_image(directory / "s1.img", size, seed=2)
    opens, opens_at = _wall_clock(window_s + 12)
    closes = (dt.datetime.strptime(opens, "%H:%M:%S") + dt.timedelta(hours=1)).strftime("%H:%M:%S")
    datasets = [{"name": "bulk", "path": directory}]
    schedule = [{"days": "all", "from": opens, "to": closes, "limit": f"{window_mbit}Mbit"}]
    cfg = cluster.agent_config(DEVICE, datasets, limit=f"{limit_mbit}Mbit", schedule=schedule)
    started = _now()
    proc = cluster.start_agent(cfg)
    cluster.wait_for(lambda: _agent_sending(cluster), 60, "the agent sending")
    t0 = _now() + 0.5  # past the first pieces
    if t0 + window_s + 5.5 > opens_at:
        raise AssertionError(f"the agent took {t0 - started:.1f} s to start sending: the measurements before the "
                             f"schedule window opens at {opens} would overlap it")
    meter.wait_until(t0 + window_s)
    limit = limit_mbit * MBIT
    set_by = lambda: ((cluster.agent_status(DEVICE) or {}).get("bandwidth") or {}).get("set_by")  # noqa: E731
    figures = {
        "limit": limit, "window_s": window_s, "start_s": t0 - 0.5 - started,
        "rate": meter.payload_rate(t0, t0 + window_s), "frames": meter.frame_rate(t0, t0 + window_s),
        "worst_100ms": max(r for _, r in meter.intervals(t0, t0 + window_s, payload=False)),
        "window_limit": window_mbit * MBIT, "hup_limit": hup_mbit * MBIT, "set_by": set_by(),
    }
    cluster.agent_config(DEVICE, datasets, limit=f"{hup_mbit}Mbit", schedule=schedule)  # rewrites the file
    hup_at = _now()
    proc.send_signal(signal.SIGHUP)
    figures["hup"] = _switch(meter, hup_at, hup_mbit * MBIT)
    figures["hup"]["set_by"] = set_by()
    if _now() > opens_at:
        raise AssertionError("the SIGHUP measurement ran into the schedule window")
    figures["window"] = _switch(meter, opens_at, window_mbit * MBIT)
    figures["window"]["set_by"] = set_by()
    cluster.terminate(cfg.stem)
    return figures


def measure_yield(cluster: LinkCluster, link: ShapedLink, meter: LinkMeter, flow_s: float = 10.0,
                  size: int = 384 * MiB, take_back: float = 0.85, within_s: float = 10.0,
                  hold_s: float = 2.0) -> dict:
    """`limit: yield`: ramp-up on an idle link, then a competing bulk TCP flow for `flow_s`: its share of
    the link while the agent runs, and the time after it stops until the agent again has `take_back` of the
    link over `hold_s` (a share of a link is a rate over time, not a peak)."""
    directory = cluster.dataset_dir(DEVICE, "bulk")
    random_image(directory / "s1.img", size, seed=3)
    cfg = cluster.agent_config(DEVICE, [{"name": "bulk", "path": directory}], limit="yield")
    cluster.start_agent(cfg)
    cluster.wait_for(lambda: _agent_sending(cluster), 60, "the agent sending")
    sending_at = _now()
    target = take_back * link.rate_bytes
    full = meter.first_time(sending_at, sending_at + 12, lambda r: r >= target, window_s=hold_s, wait=True)
    status_before = cluster.agent_status(DEVICE)
    flow = BulkFlow(link).start(flow_s)
    try:
        flow.wait(flow_s + 30)
    finally:
        flow.close()
    first, last = flow.first_byte_at, flow.last_byte_at
    back = meter.first_time(last, last + within_s, lambda r: r >= target, window_s=hold_s, wait=True)
    meter.wait_until(last + within_s + 2)
    status_after = cluster.agent_status(DEVICE)
    cluster.terminate(cfg.stem)
    competing = flow.rate(first, last)
    return {
        "ramp_s": None if full is None else full - sending_at, "flow_s": last - first, "hold_s": hold_s,
        "flow_share": competing / link.rate_bytes,
        "agent_share_during": (meter.payload_rate(first, last) - competing) / link.rate_bytes,
        "take_back_s": None if back is None else back - last, "within_s": within_s,
        "agent_share_after": meter.payload_rate(last + 2, last + within_s + 2) / link.rate_bytes,
        "seconds_after": [round(meter.payload_rate(last + i, last + i + 1) / link.rate_bytes, 2)
                          for i in range(int(within_s) + 2)],
        "base_delay_ms": ((status_before or {}).get("bandwidth") or {}).get("base_delay_ms"),
        "peak_delivery": ((status_before or {}).get("bandwidth") or {}).get("peak_delivery_bytes_per_s"),
        "queue_delay_ms": ((status_after or {}).get("bandwidth") or {}).get("queue_delay_ms"),
    }


def measure_preemption(cluster: LinkCluster, work: Path, full_size: int = 1024 * MiB,
                       urgent_size: int = 16 * MiB, changed: int = 8) -> dict:
    """A 1 GiB priority-5 full upload runs (max_active_transfers: 1); an incremental of a priority-1
    dataset appears: seconds from its rename to its commit, and the full upload's progress then."""
    urgent, big = cluster.dataset_dir(DEVICE, "urgent"), cluster.dataset_dir(DEVICE, "big")
    random_image(urgent / "s1.img", urgent_size, seed=4)
    generate_image(str(big / "s1.img"), full_size, seed=5)
    staged = work / "urgent-s2.img"
    digest = mutate_chunks(str(urgent / "s1.img"), str(staged), range(0, urgent_size // MiB, 2)[:changed], seed=6)
    cfg = cluster.agent_config(DEVICE, [{"name": "urgent", "path": urgent, "priority": 1},
                                        {"name": "big", "path": big, "priority": 5}],
                               max_active_transfers=1, scan_interval_ms=500)
    cluster.start_agent(cfg)
    cluster.wait_for(lambda: _committed(cluster, "urgent", "s1") and _sent_at(cluster, "big")[1] >= 16 * MiB,
                     120, "urgent/s1 committed and the full upload of big under way")
    os.rename(staged, urgent / "s2.img")
    appeared = _now()
    both_active = []

    def committed_or_watch():
        doc = cluster.agent_status(DEVICE)
        if doc:
            both_active.append({t["dataset"] for t in doc["transfers"]} >= {"urgent", "big"})
        return _committed(cluster, "urgent", "s2")

    cluster.wait_for(committed_or_watch, 60, "the urgent incremental committed", interval_s=0.2)
    committed = _now()
    doc = cluster.agent_status(DEVICE) or {}
    big_now = next((t for t in doc.get("transfers", []) if t["dataset"] == "big"), None)
    big_done = _committed(cluster, "big", "s1")
    cluster.terminate(cfg.stem)
    return {
        "commit_s": committed - appeared, "digest": digest, "listed": _listed_blake3(cluster, "urgent", "s2"),
        "big_committed": big_done, "ran_side_by_side": any(both_active),
        "big_done_fraction": None if big_now is None else big_now["bytes_done"] / big_now["bytes_image"],
        "big_eta_s": None if big_now is None else big_now["eta_s"],
    }


def measure_weights(cluster: LinkCluster, meter: LinkMeter, weights: tuple = (3, 1), window_s: float = 10.0,
                    size: int = 256 * MiB) -> dict:
    """Two transfers side by side with weights 3 and 1 (same priority): the ratio of what each delivered
    to the broker over `window_s`, and their sum against the link."""
    names = ("heavy", "light")
    datasets = []
    for i, (name, weight) in enumerate(zip(names, weights)):
        directory = cluster.dataset_dir(DEVICE, name)
        random_image(directory / "s1.img", size, seed=10 + i)
        datasets.append({"name": name, "path": directory, "priority": 2, "weight": weight})
    cfg = cluster.agent_config(DEVICE, datasets, max_active_transfers=2)
    cluster.start_agent(cfg)
    cluster.wait_for(lambda: all(_sent_at(cluster, n)[1] >= 4 * MiB for n in names), 60,
                     "both transfers under way")
    first = {n: _sent_at(cluster, n) for n in names}
    meter.wait_until(max(t for t, _ in first.values()) + window_s)
    second = {n: _sent_at(cluster, n) for n in names}
    cluster.terminate(cfg.stem)
    rates = {n: (second[n][1] - first[n][1]) / (second[n][0] - first[n][0]) for n in names}
    return {"rates": rates, "ratio": rates["heavy"] / rates["light"], "expected": weights[0] / weights[1],
            "sum": sum(rates.values())}


# ------------------------------------------------------------------ the run


SCENARIOS = ("tcp", "goodput", "cpu", "limit", "yield", "preempt", "weights")


def _row(name: str, figure: str, value: str) -> str:
    return f"{name:<9} {figure:<58} {value}"


def report(name: str, f: dict, link: ShapedLink) -> list[str]:
    rate = link.rate_bytes
    mbit = lambda b: f"{b / MBIT:6.1f} Mbit/s"  # noqa: E731
    if name == "tcp":
        return [_row(name, "one bulk TCP flow alone: goodput / link rate", f"{f['tcp_goodput'] / rate:.3f}"
                     f"  ({mbit(f['tcp_goodput'])}; frames {mbit(f['tcp_frames'])})")]
    if name in ("goodput", "cpu"):
        kind = "random image" if name == "goodput" else "realistic image"
        return [
            _row(name, f"unlimited, {kind}: goodput / link rate ({f['window_s']:.0f} s)",
                 f"{f['goodput'] / rate:.3f}  ({mbit(f['goodput'])}; frames {mbit(f['frames'])})"),
            _row(name, "agent CPU while filling the link: fraction of one core", f"{f['cpu_core_fraction']:.3f}"),
            _row(name, "agent CPU seconds per GB sent / per GB of image",
                 f"{f['cpu_s_per_gb_sent']:.2f} / {f['cpu_s_per_gb_image']:.2f}"
                 f"  (image/wire {f['image_per_wire']:.2f})"),
        ]
    if name == "limit":
        w, h = f["window"], f["hup"]
        return [
            _row(name, f"limit 40Mbit: frames on the link / limit ({f['window_s']:.0f} s)",
                 f"{f['frames'] / f['limit']:.3f}  ({mbit(f['frames'])} frames; TCP payload {mbit(f['rate'])})"),
            _row(name, "limit 40Mbit: worst 100 ms interval of frames / limit", f"{f['worst_100ms'] / f['limit']:.3f}"),
            _row(name, "SIGHUP with limit 20Mbit: seconds to apply",
                 f"{h['switch_s']}" if h["switch_s"] is None else f"{h['switch_s']:.2f}"),
            _row(name, "  then rate / 20Mbit, worst 100 ms / 20Mbit",
                 f"{h['rate_after'] / f['hup_limit']:.3f}, {h['worst_100ms_after'] / f['hup_limit']:.3f}"),
            _row(name, "schedule window opens (10Mbit): seconds to apply",
                 f"{w['switch_s']}" if w["switch_s"] is None else f"{w['switch_s']:.2f}"),
            _row(name, "  then rate / 10Mbit, worst 100 ms / 10Mbit",
                 f"{w['rate_after'] / f['window_limit']:.3f}, {w['worst_100ms_after'] / f['window_limit']:.3f}"
                 f"  (set_by: {w['set_by']})"),
        ]
    if name == "yield":
        seconds = lambda v: "never" if v is None else f"{v:.1f}"  # noqa: E731
        return [
            _row(name, f"idle link: seconds until the agent has 85% over {f['hold_s']:.0f} s", seconds(f["ramp_s"])),
            _row(name, f"competing TCP flow ({f['flow_s']:.0f} s): its share of the link", f"{f['flow_share']:.3f}"
                 f"  (agent's: {f['agent_share_during']:.3f})"),
            _row(name, f"flow stopped: seconds until the agent has 85% over {f['hold_s']:.0f} s",
                 f"{seconds(f['take_back_s'])} (limit {f['within_s']:.0f})"),
            _row(name, f"agent's share from 2 s to {f['within_s'] + 2:.0f} s after the flow stops",
                 f"{f['agent_share_after']:.3f}"),
            _row(name, "  second by second", " ".join(f"{v:.2f}" for v in f["seconds_after"])),
            _row(name, "status before the flow: base delay, delivery peak",
                 f"{f['base_delay_ms']} ms, {(f['peak_delivery'] or 0) / MBIT:.1f} Mbit/s"),
        ]
    if name == "preempt":
        return [
            _row(name, "priority-1 incremental during a 1 GiB full upload: s to commit", f"{f['commit_s']:.1f}"),
            _row(name, "  full upload then: done fraction, ETA s",
                 f"{f['big_done_fraction']:.3f}, {f['big_eta_s']}" if f["big_done_fraction"] is not None
                 else "not running"),
        ]
    if name == "weights":
        return [_row(name, "weights 3:1: ratio of delivered bytes", f"{f['ratio']:.3f}  (sum "
                     f"{f['sum'] / rate:.3f} of the link: {mbit(f['rates']['heavy'])} + {mbit(f['rates']['light'])})")]
    return []


def run(names: list[str], work: Path) -> int:
    link = ShapedLink().up()
    failures = 0
    lines = []
    try:
        with LinkMeter(link) as meter:
            for name in names:
                root = work / name
                cluster = LinkCluster(root, link)
                try:
                    cluster.start()
                    if name == "tcp":
                        figures = measure_tcp(link, meter)
                    elif name == "goodput":
                        figures = measure_goodput(cluster, meter)
                    elif name == "cpu":
                        figures = measure_goodput(cluster, meter, size=512 * MiB, realistic=True)
                    elif name == "limit":
                        figures = measure_limit(cluster, meter)
                    elif name == "yield":
                        figures = measure_yield(cluster, link, meter)
                    elif name == "preempt":
                        figures = measure_preemption(cluster, root)
                    else:
                        figures = measure_weights(cluster, meter)
                    rows = report(name, figures, link)
                except Exception as exc:  # report it and go on with the next scenario
                    failures += 1
                    rows = [_row(name, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")]
                    print(cluster.log_tails(15), file=sys.stderr)
                finally:
                    cluster.stop()
                    shutil.rmtree(root, ignore_errors=True) if not failures else None
                lines += rows
                for row in rows:
                    print(row, flush=True)
    finally:
        link.down()
    print()
    print(f"{'scenario':<9} {'figure':<58} value")
    print("\n".join(lines))
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    p.add_argument("--workdir", help="parent of the work directory (default: the system's temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = p.parse_args(argv)
    reason = why_unavailable()
    if reason:
        print(f"bench/link.py: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="speedsync-link-", dir=args.workdir))
    try:
        return run(list(args.only or SCENARIOS), work)
    except LinkUnavailable as exc:
        print(f"bench/link.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
