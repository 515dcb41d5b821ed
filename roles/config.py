"""Strict configuration: YAML into frozen dataclasses with declared defaults.

Every key has a default on its field; an unknown key, a wrong type or a bad
unit raises ConfigError naming the key and the file (the CLI exits 2).
Field metadata `kind` says how a value is parsed: size, rate, duration
(seconds), id, endpoint, path, or the field's own type.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from roles.appliance.schedule import parse_limit, parse_window
from roles.quotarules import QuotaRules, parse_quota
from roles.retention import RetentionPolicy, parse_retention
from roles.units import parse_duration, parse_rate, parse_size

ACTIONS = ("resume", "incremental", "full", "verify")
from schemas import is_valid_id
from schemas.messages import MESSAGES


class ConfigError(Exception):
    pass


def _kind(kind: str, default: Any, **extra):
    return field(default=default, metadata={"kind": kind, **extra})


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")

# Bounds of values that end up in a message, from its schema (a value past them would pass here and then make
# the role crash at the first message that carries it).
HEARTBEAT_MS_MAX = MESSAGES["WELCOME"].fields["heartbeat_interval_ms"].max
CREDIT_BYTES_MAX = MESSAGES["CREDIT"].fields["bytes"].max
READY_WINDOW_MAX = MESSAGES["READY"].fields["window"].max
# A rate of 0 would divide by zero (and never send): "none" is the way to say unlimited.
ZERO_RATE = "a rate must be above 0 (use none for no limit, or yield)"


@dataclass(frozen=True)
class BrokerConfig:
    frontend_bind: str = _kind("endpoint", "tcp://*:5550")
    backend_bind: str = _kind("endpoint", "tcp://*:5551")
    status_bind: str = _kind("endpoint", "tcp://*:5552")
    data_dir: str = _kind("path", "./var/broker")
    # empty: the embedded SQLite catalog in data_dir; postgresql://user@host:port/db: a PostgreSQL catalog that
    # brokers of one controller share (roles/controller/catalogpg.py)
    catalog_url: str = _kind("catalog_url", "")
    insecure: bool = _kind("bool", False)
    key_file: str = _kind("path", "")
    authorized_keys: str = _kind("path", "")
    node_keys: str = _kind("path", "")
    operator_keys: str = _kind("path", "")
    admin_keys: str = _kind("path", "")  # operator keys that may change state; empty: none
    keys_rescan_ms: int = _kind("int", 5000, min=100)  # key directories re-read this often (and on SIGHUP)
    listen_backlog: int = _kind("int", 4096, min=1)  # ZMQ_BACKLOG of each ROUTER (the kernel's somaxconn caps it)
    heartbeat_interval_ms: int = _kind("int", 1000, min=10, max=HEARTBEAT_MS_MAX)  # told in WELCOME
    # an agent with no transfer in progress beats this often (told in WELCOME; never below heartbeat_interval_ms)
    idle_heartbeat_interval_ms: int = _kind("int", 5000, min=10, max=HEARTBEAT_MS_MAX)
    heartbeat_liveness: int = _kind("int", 3, min=1)
    transfer_window: int = _kind("size", 8 * 1024 * 1024, min=64 * 1024, max=CREDIT_BYTES_MAX)  # a CREDIT's bytes
    finished_transfers_kept: int = _kind("int", 200, min=0)
    stall_timeout_ms: int = _kind("int", 60000, min=100)
    # restores (roles/controller/restores.py): the most BLOCK bytes in flight per restore, whatever the
    # agent asks; a restore with no progress this long is failed `stalled`; restores at once per device
    restore_window: int = _kind("size", 64 * 1024 * 1024, min=64 * 1024)
    restore_idle_timeout_ms: int = _kind("int", 60000, min=100)
    restores_per_device: int = _kind("int", 4, min=1)
    # per-device budgets (roles/controller/budgets.py): a device past one gets an ERROR, nobody else notices
    device_uploads_max: int = _kind("int", 16, min=1, max=100000)  # uploads in progress per device (over_budget)
    query_rate: int = _kind("int", 200, min=1)  # QUERY slices per second per device (rate_limited)
    device_parked_max: int = _kind("int", 100, min=1)  # parked offers kept per device (its oldest gives way)
    parked_ttl: float = _kind("duration", 86400.0, min=1)  # a parked offer not offered again is forgotten after this
    query_burst: int = _kind("int", 400, min=1)  # QUERY slices a device may send at once
    # bytes stored per device (roles/controller/quota.py): {device id or shell pattern: size or none};
    # an exact id wins, then the longest pattern; no match (or no key) = unlimited (quota_exceeded)
    quota: QuotaRules = _kind("quota", QuotaRules())
    # retention (roles/retention.py, DESIGN.md "Lifecycle"): keep_last/hourly/daily/weekly/monthly/yearly and
    # overrides by device and dataset pattern; no key = keep everything. Applied at start and this often.
    retention: RetentionPolicy = _kind("retention", RetentionPolicy())
    prune_interval_ms: int = _kind("int", 600000, min=100)
    metrics_listen: str = _kind("listen", "")  # host:port of /metrics; empty = off
    rpo_target: float = _kind("duration", 900.0, min=1)  # seconds: older newest commit = behind (status summary)
    list_page_size: int = _kind("int", 1000, min=1, max=10000)  # catalog rows per LIST_REPLY
    status_items_max: int = _kind("int", 5000, min=1, max=100000)  # most agents, and transfers, in one status
    log_level: str = _kind("choice", "INFO", choices=LOG_LEVELS)
    log_json: bool = _kind("bool", False)


@dataclass(frozen=True)
class StorageConfig:
    node_id: str = _kind("id", "node-a")
    # the backend of every broker of the controller: one link each, the window shared between them
    broker: tuple = _kind("distinct_endpoints", ("tcp://127.0.0.1:5551",))
    data_dir: str = _kind("path", "./var/node-a")
    insecure: bool = _kind("bool", False)
    key_file: str = _kind("path", "")
    broker_key: str = _kind("path", "")
    window: int = _kind("size", 32 * 1024 * 1024, min=64 * 1024, max=READY_WINDOW_MAX)  # told in READY
    store_threads: int = _kind("int", 8, min=1)
    heartbeat_interval_ms: int = _kind("int", 1000, min=10, max=HEARTBEAT_MS_MAX)
    heartbeat_liveness: int = _kind("int", 3, min=1)
    fault_write_rate: int | None = _kind("rate", None, min=1)
    fault_fail_at_write: int = _kind("int", 0, min=0)
    fault_disk_capacity: int | None = _kind("optional_size", None)
    fault_fail_at_read: int = _kind("int", 0, min=0)  # the Nth restore chunk read fails with EIO, once
    fault_log_capacity: int | None = _kind("optional_size", None)  # ownership-log bytes before ENOSPC
    fault_manifest_errors: int = _kind("int", 0, min=0)  # the first N manifest writes fail with EIO
    fault_gc_slice_ms: int = _kind("int", 0, min=0)  # each GC slice waits this long first (a slow GC, for tests)
    fault_sync_log: str = _kind("path", "")  # a line per fsync, rename, link and mkdir made durable
    owner_log_handles: int = _kind("int", 256, min=1, max=65536)  # ownership logs open at once (LRU)
    gc_interval_ms: int = _kind("int", 3_600_000, min=10)  # garbage collection of unreferenced chunks
    # background verification (roles/storenode/background.py): every committed snapshot re-read within the
    # interval, at most verify_read_limit bytes/s (devices' VERIFY requests share the limit)
    verify_interval_ms: int = _kind("int", 7 * 86400 * 1000, min=100)
    verify_read_limit: int = _kind("size", 50_000_000, min=4096)
    metrics_listen: str = _kind("listen", "")  # host:port of /metrics; empty = off
    log_level: str = _kind("choice", "INFO", choices=LOG_LEVELS)
    log_json: bool = _kind("bool", False)


@dataclass(frozen=True)
class DatasetConfig:
    name: str = _kind("id", "")
    path: str = _kind("path", "")
    priority: int = _kind("int", 5, min=1)
    weight: int = _kind("int", 1, min=1, max=1000)
    catch_up: str = _kind("choice", "all", choices=("all", "latest"))
    chunk_size: int = _kind("size", 1024 * 1024, min=4096, max=16 * 1024 * 1024)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = _kind("id", "office-1")
    brokers: tuple = _kind("endpoints", ("tcp://127.0.0.1:5550",))
    state_dir: str = _kind("path", "./var/office-1")
    datasets: tuple = _kind("datasets", ())
    insecure: bool = _kind("bool", False)
    key_file: str = _kind("path", "")
    broker_key: str = _kind("path", "")
    limit: object = _kind("limit", None, min=1)
    schedule: tuple = _kind("schedule", ())
    action_order: tuple = _kind("actions", ("resume", "incremental", "full", "verify"))
    # the `verify` action: each dataset's newest committed snapshot checked by the cloud this often
    # (roles/appliance/verifying.py); counted from the later of the last verify and the commit
    verify_interval: float = _kind("duration", 7 * 86400.0, min=1)
    wire_window: int = _kind("size", 16 * 1024 * 1024, min=64 * 1024)
    yield_target_ms: int = _kind("int", 25, min=1)
    read_limit: int | None = _kind("rate", None, min=1)
    # .changes sidecar check: unchanged chunks read and compared with the previous manifest, per snapshot
    cbt_sample_chunks: int = _kind("int", 4, min=1)
    cbt_sample_fraction: float = _kind("fraction", 0.002)  # of the unchanged chunks, when that is more
    status_bind: str = _kind("endpoint_or_empty", "")
    threads: int = _kind("int", 2, min=1)
    compress_level: int = _kind("int", 1, min=-5, max=22)
    compress_adapt: bool = _kind("bool", True)
    max_active_transfers: int = _kind("int", 2, min=1)
    scan_interval_ms: int = _kind("int", 2000, min=50)
    connect_timeout_ms: int = _kind("int", 30000, min=100)
    park_timeout_ms: int = _kind("int", 600000, min=100)
    reply_timeout_ms: int = _kind("int", 120000, min=100)
    restore_idle_timeout_ms: int = _kind("int", 60000, min=100)  # `restore` fails if no block comes this long
    fault_link_drop_rate: float = _kind("fraction", 0.0)
    fault_link_delay_ms: int = _kind("int", 0, min=0)
    fault_seed: int = _kind("int", 0)
    heartbeat_interval_ms: int = _kind("int", 1000, min=10, max=HEARTBEAT_MS_MAX)
    heartbeat_liveness: int = _kind("int", 3, min=1)
    metrics_listen: str = _kind("listen", "")  # host:port of /metrics; empty = off
    log_level: str = _kind("choice", "INFO", choices=LOG_LEVELS)
    log_json: bool = _kind("bool", False)


def _fail(path: Path, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}': {reason}")


def _parse_value(path: Path, key: str, meta: dict, value: Any, base_dir: Path):
    kind = meta.get("kind")
    try:
        if kind == "size":
            parsed = parse_size(value)
        elif kind == "rate":
            parsed = parse_rate(value)
        elif kind == "duration":
            parsed = parse_duration(value)
        elif kind == "optional_size":
            parsed = None if value is None or str(value).strip().lower() == "none" else parse_size(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            parsed = value
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
            parsed = value
        elif kind == "limit":
            parsed = parse_limit(value)
        elif kind == "quota":
            parsed = parse_quota(value)
        elif kind == "retention":
            parsed = parse_retention(value)
        elif kind == "schedule":
            if not isinstance(value, list):
                raise ValueError("expected a list of windows like {days: mon-fri, from: '08:00', to: '18:00', "
                                 "limit: 10Mbit}")
            parsed = tuple(parse_window(item, i) for i, item in enumerate(value))
            for i, window in enumerate(parsed):
                if isinstance(window.limit, int) and window.limit < 1:
                    raise ValueError(f"schedule[{i}].limit: {ZERO_RATE}")
        elif kind == "actions":
            if (not isinstance(value, list) or sorted(value) != sorted(ACTIONS)):
                raise ValueError(f"expected an ordering of {', '.join(ACTIONS)}")
            parsed = tuple(value)
        elif kind == "listen":
            parsed = parse_listen(value)[2] if value else ""
        elif kind == "catalog_url":
            parsed = parse_catalog_url(value)
        elif kind == "endpoint_or_empty":
            parsed = _endpoint(value) if value else ""
        elif kind == "fraction":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"expected a number in [0, 1), got {value!r}")
            parsed = float(value)
        elif kind == "choice":
            if value not in meta["choices"]:
                raise ValueError(f"expected one of {', '.join(meta['choices'])}, got {value!r}")
            parsed = value
        elif kind == "id":
            if not is_valid_id(value):
                raise ValueError(f"{value!r} is not a valid id ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, no '..')")
            parsed = value
        elif kind == "endpoint":
            parsed = _endpoint(value)
        elif kind in ("endpoints", "distinct_endpoints"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value:
                raise ValueError("expected a non-empty list of endpoints")
            parsed = tuple(_endpoint(v) for v in value)
            if kind == "distinct_endpoints" and len(set(parsed)) != len(parsed):
                raise ValueError("an endpoint is listed twice (each broker would grant the node's credit twice)")
        elif kind == "path":
            if not isinstance(value, str):
                raise ValueError(f"expected a path, got {value!r}")
            if not value:
                return ""
            parsed = str((base_dir / value).resolve()) if not os.path.isabs(value) else value
        else:  # pragma: no cover - declaration error
            raise ValueError(f"undeclared kind {kind}")
    except ValueError as exc:
        raise _fail(path, key, str(exc)) from None
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        if "min" in meta and parsed < meta["min"]:
            if kind in ("rate", "limit"):
                raise _fail(path, key, f"{value!r}: {ZERO_RATE}")
            raise _fail(path, key, f"{value!r} is below the minimum {meta['min']}")
        if "max" in meta and parsed > meta["max"]:
            raise _fail(path, key, f"{value!r} is above the maximum {meta['max']}")
    return parsed


def parse_listen(value) -> tuple[str, int, str]:
    """`host:port` (IPv6 as `[::1]:9560`) -> (host, port, the text as given); ValueError otherwise."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected host:port like 127.0.0.1:9560, got {value!r}")
    host, _, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (not host or "/" in host or (":" in host and not bracketed) or not port.isdigit()
            or not 0 < int(port) < 65536):
        raise ValueError(f"expected host:port like 127.0.0.1:9560, got {value!r}")
    return host, int(port), value


def parse_catalog_url(value) -> str:
    """"" or a postgresql:// (postgres://) URL naming a database; ValueError otherwise."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"expected \"\" or a postgresql://user@host:port/db URL, got {value!r}")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected \"\" (the embedded SQLite catalog) or a postgresql://user@host:port/db URL, "
                         f"got {value!r}")
    try:
        parts.port  # a port that is not a number raises
    except ValueError:
        raise ValueError(f"{value!r}: the port is not a number") from None
    query = urllib.parse.parse_qs(parts.query)
    if not parts.path.strip("/") and "dbname" not in query:
        raise ValueError(f"{value!r} names no database (postgresql://user@host:port/db)")
    return value


def _endpoint(value) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise ValueError(f"expected an endpoint like tcp://host:port, got {value!r}")
    return value


def _build(cls, raw: dict, path: Path, base_dir: Path, prefix: str = ""):
    if not isinstance(raw, dict):
        raise _fail(path, prefix.rstrip(".") or "(top level)", "expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise _fail(path, prefix + str(unknown[0]), f"unknown key (known: {', '.join(fields)})")
    values = {}
    for key, value in raw.items():
        meta = fields[key].metadata
        if meta.get("kind") == "datasets":
            values[key] = _datasets(value, path, base_dir)
        else:
            values[key] = _parse_value(path, prefix + key, meta, value, base_dir)
    for name, f in fields.items():
        if name not in values and f.metadata.get("kind") == "path" and f.default:
            values[name] = str((base_dir / f.default).resolve())
    return cls(**values)


def _datasets(value, path: Path, base_dir: Path) -> tuple:
    if not isinstance(value, list):
        raise _fail(path, "datasets", "expected a list of datasets")
    out = []
    for i, item in enumerate(value):
        ds = _build(DatasetConfig, item, path, base_dir, prefix=f"datasets[{i}].")
        if not ds.name or not ds.path:
            raise _fail(path, f"datasets[{i}]", "needs 'name' and 'path'")
        out.append(ds)
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise _fail(path, "datasets", "dataset names must be unique")
    return tuple(out)


# Keys each role needs unless `insecure: true`, and whether each is a file or a directory.
SECURITY_KEYS = {
    "BrokerConfig": {"key_file": "file", "authorized_keys": "dir", "node_keys": "dir", "operator_keys": "dir",
                     "admin_keys": "optional dir"},
    "StorageConfig": {"key_file": "file", "broker_key": "file"},
    "AgentConfig": {"key_file": "file", "broker_key": "file"},
}


def _check_security(conf, path: Path) -> None:
    if conf.insecure:
        return
    for key, kind in SECURITY_KEYS[type(conf).__name__].items():
        value = getattr(conf, key)
        if not value and kind.startswith("optional"):
            continue
        if not value:
            raise _fail(path, key, "required with CURVE on (or set insecure: true for plain TCP)")
        exists = os.path.isdir(value) if kind.endswith("dir") else os.path.isfile(value)
        if not exists:
            raise _fail(path, key, f"{value} is not an existing {'directory' if kind.endswith('dir') else 'file'}")


def load(cls, file: str | os.PathLike):
    """Load one role's YAML strictly. Relative paths are relative to the file."""
    path = Path(file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    conf = _build(cls, raw or {}, path, path.parent.resolve())
    _check_security(conf, path)
    return conf
