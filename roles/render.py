"""Terminal output of the command line: the broker's status and catalog, the
agent's status, `status --watch`, and the agent's progress bars (rich).

Each table is described once, as a `Section` (title, headers, rows of
strings), and rendered two ways: rich tables on a terminal, and plain
aligned text (roles/tables.py) everywhere else (pipes, files, scripts), so
that output that is read by programs stays stable: no colour, no box
characters, no wrapping at 80 columns. `--json` is the format for programs;
the plain text is for people reading a log.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn, \
    TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from roles.tables import table
from roles.units import format_bytes


@dataclass(frozen=True)
class Section:
    title: str
    headers: list
    rows: list


@dataclass(frozen=True)
class View:
    """Lines of text, then tables."""
    lines: list
    sections: list


def plain(view: View) -> str:
    parts = list(view.lines)
    for s in view.sections:
        parts += ["", f"{s.title}:", table(s.headers, s.rows)] if s.title else ["", table(s.headers, s.rows)]
    return "\n".join(parts if view.lines else parts[1:])


def rich_group(view: View) -> Group:
    items = [Text(line) for line in view.lines]
    for s in view.sections:
        t = Table(*s.headers, title=s.title or None, title_justify="left", box=box.SIMPLE_HEAD, expand=False)
        for row in s.rows:
            t.add_row(*row)
        items.append(t)
    return Group(*items)


def show(view: View, console: Console | None = None) -> None:
    """Rich tables on a terminal, plain text otherwise."""
    console = console or Console()
    if console.is_terminal:
        console.print(rich_group(view))
    else:
        print(plain(view))


# --- the broker's status -------------------------------------------------------------------


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def summary_line(summary: dict) -> str:
    states = ", ".join(f"{state} {n}" for state, n in sorted(summary["transfers_by_state"].items())) or "none"
    return (f"summary: devices {summary['devices_known']} known, {summary['devices_connected']} connected; "
            f"transfers {states}; datasets behind rpo {_duration(summary['rpo_target_s'])}: "
            f"{summary['datasets_behind']} of {summary['datasets']}")


def status_view(status: dict) -> View:
    b = status["broker"]
    lines = [f"broker: rss {format_bytes(b['rss_bytes'])}, dropped {b['dropped_messages']}, "
             f"errors {b['errors_by_code'] or 'none'}"]
    catalog = b.get("catalog")
    if catalog and not catalog["available"]:
        lines.append(f"catalog UNAVAILABLE for {catalog['unavailable_for_s']:.0f}s: {catalog['reason']} "
                     f"({catalog['rows_waiting']} snapshots held, not yet told committed; "
                     f"next try in {catalog['retry_in_s']:.1f}s)")
    if "summary" in status:
        lines.append(summary_line(status["summary"]))
    lines.extend(drain_line(d) for d in b.get("drains", ()))
    return View(lines, [
        Section("storage nodes", ["node", "alive", "free", "used", "load", "credit out/window", "chunks",
                                  "gc runs/freed"],
                [[n["node_id"], "yes" if n["alive"] else "NO", format_bytes(n["free_bytes"]),
                  format_bytes(n["used_bytes"]), str(n.get("load", 0)),
                  f"{format_bytes(n['credit']['outstanding'])}/{format_bytes(n['credit']['window'])}",
                  str(n.get("chunks", 0)), f"{n.get('gc_runs', 0)}/{format_bytes(n.get('gc_freed_bytes', 0))}"]
                 for n in status["storage"]]),
        Section("agents", ["device", "connected", "stored", "quota"],
                [[a["device_id"], "yes" if a["connected"] else "no", format_bytes(a.get("stored_bytes", 0)),
                  "none" if a.get("quota_bytes") is None else format_bytes(a["quota_bytes"])]
                 for a in status["agents"]]),
        Section("transfers", ["transfer", "device", "dataset", "snapshot", "node", "state", "done/total", "sent"],
                [[t["transfer_id"], t["device_id"], t["dataset"], t["snapshot"], t["node_id"],
                  t["state"] + (f" ({t['reason']})" if t.get("reason") else ""),
                  f"{format_bytes(t['bytes_done'])}/{format_bytes(t['bytes_total'])}", format_bytes(t["bytes_sent"])]
                 for t in status["transfers"]]),
    ])


def drain_line(drain: dict) -> str:
    """One drain as it stands: `speedsync drain` and the status header."""
    if drain["state"] == "undrained":
        return f"node {drain['node_id']}: undrained, it takes new datasets again (those moved stay moved)"
    line = (f"node {drain['node_id']}: {drain['state'].upper()}, {drain['datasets_moved']} of "
            f"{drain['datasets_total']} dataset(s) moved, {drain['snapshots_copied']} snapshot(s) copied "
            f"({format_bytes(drain['bytes_copied'])} sent)")
    current = drain.get("current")
    if current:
        line += f"; moving {current['device_id']}/{current['dataset']} to {current['target'] or '(choosing)'}"
    if drain.get("waiting"):
        line += f"; waiting: {drain['waiting']}"
    return line


def drain_view(drain: dict) -> View:
    return View([drain_line(drain)], [])


def render_status(status: dict) -> str:
    return plain(status_view(status))


def list_view(snapshots: list) -> View:
    return View([], [Section("", ["device", "dataset", "snapshot", "taken (UTC)", "node", "size", "blake3"],
                             [[s["device_id"], s["dataset"], s["snapshot"], _utc(s.get("taken_at")), s["node_id"],
                               format_bytes(s["size"]), s["blake3"][:16]] for s in snapshots])])


def prune_view(rows: list) -> View:
    """`speedsync prune --dry-run`: the snapshots the policy would remove, oldest first by dataset."""
    return View([], [Section("would prune", ["device", "dataset", "snapshot", "taken (UTC)", "node"],
                             [[r["device_id"], r["dataset"], r["snapshot"], _utc(r["taken_at"]), r["node_id"]]
                              for r in rows])])


def _utc(seconds) -> str:
    return "" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def render_list(snapshots: list) -> str:
    return plain(list_view(snapshots))


def watch(fetch, title: str, interval_s: float, console: Console | None = None) -> int:
    """`status --watch`: redraw `fetch()`'s status every interval until Ctrl-C (exit 0). On a
    terminal, one live view (rich.live.Live); elsewhere, each frame printed after the last.
    A fetch that fails shows its reason in the frame and the watch goes on."""
    console = console or Console()

    def frame() -> View:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        try:
            view = status_view(fetch())
        except Exception as exc:  # noqa: BLE001 - shown to the operator, the next frame tries again
            view = View([f"no status: {exc}"], [])
        return View([f"speedsync status {title} at {stamp} (every {interval_s:g}s, Ctrl-C ends)", *view.lines],
                    view.sections)

    try:
        if console.is_terminal:
            with Live(rich_group(frame()), console=console, auto_refresh=False, screen=False,
                      vertical_overflow="crop") as live:
                while True:
                    time.sleep(interval_s)
                    live.update(rich_group(frame()), refresh=True)
        else:
            while True:
                print(plain(frame()) + "\n", flush=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0


# --- the agent ---------------------------------------------------------------------------------


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def agent_view(doc: dict) -> View:
    bw = doc["bandwidth"]
    extra = ""
    if "queue_delay_ms" in bw:
        peak = bw.get("peak_delivery_bytes_per_s")
        extra = (f", pacing at {bw['rate_bytes_per_s'] * 8 / 1e6:.1f} Mbit/s; queueing delay {bw['queue_delay_ms']} ms"
                 f" over a base of {bw['base_delay_ms']} ms; link delivered up to "
                 f"{'-' if peak is None else f'{peak * 8 / 1e6:.1f}'} Mbit/s")
    return View([
        f"device {doc['device_id']} -> {doc['broker']} ({'connected' if doc['connected'] else 'not connected'})",
        f"bandwidth: {bw['limit']} (set by {bw['set_by']}){extra}",
    ], [
        Section("", ["dataset", "prio", "weight", "catch_up", "queue", "behind", "behind bytes", "newest committed",
                     "age"],
                [[d["name"], str(d["priority"]), str(d["weight"]), d["catch_up"], " ".join(d["queue"]) or "-",
                  str(d["behind_snapshots"]), format_bytes(max(0, d["behind_bytes"])), d["newest_committed"] or "-",
                  _age(d["newest_committed_age_s"])] for d in doc["datasets"]]),
        Section("", ["transfer", "state", "done/image", "sent", "rate", "ETA"],
                [[f"{t['dataset']}/{t['snapshot']}", t["state"],
                  f"{format_bytes(t['bytes_done'])}/{format_bytes(t['bytes_image'])}", format_bytes(t["bytes_sent"]),
                  f"{t['rate_bytes_per_s'] * 8 / 1e6:.1f} Mbit/s", "-" if t["eta_s"] is None else f"{t['eta_s']:.0f}s"]
                 for t in doc["transfers"]]),
    ])


def render_agent_status(doc: dict) -> str:
    return plain(agent_view(doc))


class Progress:
    """The agent's progress bars on a terminal (stderr), silent otherwise.

    The driver calls `show(now, rows)` every turn; rows are (label, bytes_done,
    bytes_total, seconds_elapsed). Time is the driver's `now` (rich reads it
    through get_time), and nothing redraws between calls: no refresh thread.
    """

    def __init__(self, stream=None, min_interval_s: float = 0.5):
        self.console = Console(file=stream or sys.stderr)
        self.enabled = self.console.is_terminal
        self.min_interval_s = min_interval_s
        self._now = 0.0
        self._last = None
        self._tasks: dict = {}  # label -> task id
        self._bars: RichProgress | None = None

    def show(self, now: float, rows: list[tuple[str, int, int, float]]) -> None:
        if not self.enabled or (self._last is not None and now - self._last < self.min_interval_s):
            return
        self._now, self._last = now, now
        if self._bars is None:
            self._bars = RichProgress(TextColumn("{task.description:<32}"), BarColumn(bar_width=20), TextColumn(
                "{task.percentage:>5.1f}%"), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                TimeRemainingColumn(), console=self.console, auto_refresh=False, get_time=lambda: self._now,
                redirect_stdout=False, redirect_stderr=False)
            self._bars.start()
        labels = set()
        for label, done, total, _elapsed in rows:
            labels.add(label)
            task = self._tasks.get(label)
            if task is None:
                task = self._tasks[label] = self._bars.add_task(label, total=total or 1)
            self._bars.update(task, completed=done if total else 1, total=total or 1)
        for label in [lb for lb in self._tasks if lb not in labels]:
            self._bars.remove_task(self._tasks.pop(label))
        self._bars.refresh()

    def done(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()
