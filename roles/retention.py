"""The broker's `retention` key, and which snapshots it keeps (DESIGN.md "Lifecycle").

Computed as Proxmox Backup Server computes it (`compute_prune_info`): the
snapshots of one dataset, newest first by `taken_at`; the rules in the order
last, hourly, daily, weekly, monthly, yearly. A rule keeps the newest snapshot
of each period (UTC `%Y-%m-%d %H`, `%Y-%m-%d`, ISO week `%G-%V`, `%Y-%m`,
`%Y`; for keep_last each snapshot is its own period) until it has kept N
periods. A period that already holds a snapshot kept by an earlier rule is
skipped and does not count; a snapshot already marked is passed over. What no
rule keeps is pruned. Rules that keep nothing at all keep everything, as PBS
does: a policy never empties a dataset by omission.

Beyond PBS: the newest snapshot of a dataset is never pruned, nor one named
`protected` (being uploaded or restored).

`overrides` (first match wins; `device` and `dataset` are shell patterns)
change the rules they name and inherit the others from the defaults:
`{device: "*", dataset: "sql*", keep_last: 288}` keeps a day of 5-minute
snapshots of every sql dataset on top of the default hourly, daily... history.
Its own module (not in controller/) because config.py, which every role
loads, parses it.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, fields, replace

RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
PERIODS = {"keep_last": None, "keep_hourly": "%Y-%m-%d %H", "keep_daily": "%Y-%m-%d", "keep_weekly": "%G-%V",
           "keep_monthly": "%Y-%m", "keep_yearly": "%Y"}
RULE_MAX = 1_000_000
PATTERN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-*?[]!")


@dataclass(frozen=True)
class KeepRules:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def keeps_something(self) -> bool:
        return any(getattr(self, rule) for rule in RULES)


@dataclass(frozen=True)
class Override:
    device: str
    dataset: str
    rules: KeepRules


@dataclass(frozen=True)
class RetentionPolicy:
    """None as `default`: no `retention` key, every snapshot kept (as before retention existed)."""

    default: KeepRules | None = None
    overrides: tuple = ()

    def __bool__(self) -> bool:
        return self.default is not None

    def rules_for(self, device_id: str, dataset: str) -> KeepRules | None:
        for override in self.overrides:
            if fnmatch.fnmatchcase(device_id, override.device) and fnmatch.fnmatchcase(dataset, override.dataset):
                return override.rules
        return self.default


@dataclass(frozen=True)
class Snapshot:
    name: str
    taken_at: float  # seconds since the epoch


def _period(rule: str, snapshot: Snapshot) -> str:
    fmt = PERIODS[rule]
    return snapshot.name if fmt is None else time.strftime(fmt, time.gmtime(snapshot.taken_at))


def kept_by_rules(snapshots, rules: KeepRules) -> set:
    """The names `rules` keep among one dataset's snapshots (PBS's mark_selections, rule by rule)."""
    ordered = sorted(snapshots, key=lambda s: (s.taken_at, s.name), reverse=True)
    if not rules.keeps_something():
        return {s.name for s in ordered}
    keep: dict[str, bool] = {}  # name -> kept (True) or passed over within a period already held (False)
    for rule in RULES:
        wanted = getattr(rules, rule)
        if not wanted:
            continue
        held = {_period(rule, s) for s in ordered if keep.get(s.name)}
        counted: set = set()
        for s in ordered:
            if s.name in keep:
                continue
            period = _period(rule, s)
            if period in held:
                continue
            if period in counted:
                keep[s.name] = False
                continue
            if len(counted) >= wanted:
                break
            counted.add(period)
            keep[s.name] = True
    return {name for name, kept in keep.items() if kept}


def to_prune(snapshots, rules: KeepRules | None, protected=frozenset()) -> list[str]:
    """Names to prune of one dataset's snapshots, oldest first: never its newest, never a protected one."""
    if rules is None or not snapshots:
        return []
    kept = kept_by_rules(snapshots, rules) | set(protected)
    newest = max(snapshots, key=lambda s: (s.taken_at, s.name))
    kept.add(newest.name)
    return [s.name for s in sorted(snapshots, key=lambda s: (s.taken_at, s.name)) if s.name not in kept]


# --- the config key ---------------------------------------------------------------


def _rules(entry: dict, where: str, base: KeepRules) -> KeepRules:
    changes = {}
    for key, value in entry.items():
        if key not in RULES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= RULE_MAX:
            raise ValueError(f"{where}{key}: expected a whole number from 0 to {RULE_MAX}, got {value!r}")
        changes[key] = value
    return replace(base, **changes)


def _pattern(value, where: str) -> str:
    if not isinstance(value, str) or not value or not set(value) <= PATTERN_CHARS or len(value) > 128:
        raise ValueError(f"{where}: expected a device or dataset id, or a shell pattern of one, got {value!r}")
    return value


def parse_retention(value) -> RetentionPolicy:
    """The `retention` mapping -> RetentionPolicy; ValueError naming the entry at fault."""
    if value is None:
        return RetentionPolicy()
    if not isinstance(value, dict):
        raise ValueError("expected a mapping like {keep_last: 3, keep_daily: 14, overrides: [...]}")
    unknown = set(value) - set(RULES) - {"overrides"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: "
                         f"{', '.join(RULES)}, overrides")
    default = _rules(value, "", KeepRules())
    overrides = value.get("overrides") or []
    if not isinstance(overrides, list):
        raise ValueError("overrides: expected a list of {device, dataset, keep_...} entries")
    parsed = []
    for i, entry in enumerate(overrides):
        where = f"overrides[{i}]."
        if not isinstance(entry, dict):
            raise ValueError(f"overrides[{i}]: expected a mapping like {{device: '*', dataset: 'sql*', keep_last: 288}}")
        unknown = set(entry) - set(RULES) - {"device", "dataset"}
        if unknown:
            raise ValueError(f"{where}{sorted(map(str, unknown))[0]}: unknown key; known: device, dataset, "
                             f"{', '.join(RULES)}")
        parsed.append(Override(_pattern(entry.get("device", "*"), where + "device"),
                               _pattern(entry.get("dataset", "*"), where + "dataset"),
                               _rules(entry, where, default)))
    return RetentionPolicy(default, tuple(parsed))


def describe(rules: KeepRules) -> str:
    return ", ".join(f"{f.name} {getattr(rules, f.name)}" for f in fields(rules) if getattr(rules, f.name))
