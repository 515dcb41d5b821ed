"""Strict configuration: every shipped file loads, every mistake names key and file."""

from pathlib import Path

import pytest

from roles import config as cfg
from roles.units import parse_duration, parse_rate, parse_size

CONFIGS = Path(__file__).parent.parent / "configs"
ROLE = {"broker.yaml": cfg.BrokerConfig, "storage.yaml": cfg.StorageConfig, "agent.yaml": cfg.AgentConfig}


@pytest.fixture
def keyed_dir(tmp_path):
    """The keys the shipped configs name, made as an operator would with keygen."""
    from bus.security import create_keypair
    keys = tmp_path / "keys"
    for name in ("broker", "node-a", "office-1", "ops"):
        create_keypair(keys, name)
    for sub, name in (("devices", "office-1"), ("nodes", "node-a"), ("operators", "ops")):
        (keys / sub).mkdir()
        (keys / sub / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    return tmp_path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name, keyed_dir):
    path = keyed_dir / name
    path.write_text((CONFIGS / name).read_text())
    loaded = cfg.load(ROLE[name], path)
    assert not loaded.insecure, "shipped configs run with CURVE on"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_config_without_its_keys_names_the_missing_key(name, tmp_path):
    path = tmp_path / name
    path.write_text((CONFIGS / name).read_text())
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(ROLE[name], path)
    assert "key_file" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text,key", [
    ("bogus: 1\n", "bogus"),
    ("heartbeat_interval_ms: fast\n", "heartbeat_interval_ms"),
    ("transfer_window: 12 parsecs\n", "transfer_window"),
    ("insecure: maybe\n", "insecure"),
    ("data_dir: 5\n", "data_dir"),
    ("frontend_bind: localhost\n", "frontend_bind"),
    ("rpo_target: soon\n", "rpo_target"),
    ("rpo_target: 0s\n", "rpo_target"),
    ("list_page_size: 0\n", "list_page_size"),
    ("retention: {keep_lats: 3}\n", "retention"),
    ("retention: {keep_daily: -1}\n", "retention"),
    ("retention: {overrides: [{dataset: '../x', keep_last: 1}]}\n", "retention"),
    ("prune_interval_ms: 0\n", "prune_interval_ms"),
    ("catalog_url: mysql://u@h/db\n", "catalog_url"),
    ("catalog_url: /var/lib/catalog.sqlite3\n", "catalog_url"),
    ("catalog_url: postgresql://u@h:port/db\n", "catalog_url"),
    ("catalog_url: postgresql://u@h:5432\n", "catalog_url"),
    ("catalog_url: 5\n", "catalog_url"),
])
def test_bad_broker_keys_are_refused_naming_key_and_file(tmp_path, text, key):
    assert_refused(tmp_path / "broker.yaml", cfg.BrokerConfig, text, key)


@pytest.mark.parametrize("url", ["", "postgresql://speedsync@db.example:5432/catalog",
                                 "postgres://u@/catalog?host=/run/postgresql", "postgresql:///x?dbname=c"])
def test_catalog_url_is_empty_or_a_postgresql_url(tmp_path, url):
    path = tmp_path / "broker.yaml"
    path.write_text(f"insecure: true\ncatalog_url: '{url}'\n")
    assert cfg.load(cfg.BrokerConfig, path).catalog_url == url


def assert_refused(path, kind, text: str, key: str) -> None:
    path.write_text("insecure: true\n" + text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(kind, path)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text,key", [
    ("gc_interval_ms: 5\n", "gc_interval_ms"),
    ("gc_interval_ms: hourly\n", "gc_interval_ms"),
    ("fault_gc_slice_ms: -1\n", "fault_gc_slice_ms"),
])
def test_bad_storage_gc_keys_are_refused_naming_key_and_file(tmp_path, text, key):
    assert_refused(tmp_path / "storage.yaml", cfg.StorageConfig, text, key)


def test_gc_runs_hourly_by_default(tmp_path):
    path = tmp_path / "storage.yaml"
    path.write_text("insecure: true\n")
    assert cfg.load(cfg.StorageConfig, path).gc_interval_ms == 3_600_000


def test_bad_dataset_entry_names_its_position(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("insecure: true\ndatasets:\n  - {name: a, path: x}\n  - {name: b, path: y, chunk_size: 1KiB}\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(cfg.AgentConfig, path)
    assert "datasets[1].chunk_size" in str(info.value)


@pytest.mark.parametrize("bad_id", ["../../etc", "a/b", "", "x" * 129, ".hidden"])
def test_ids_that_could_become_paths_are_refused(tmp_path, bad_id):
    # insecure: no key file is needed, so only the id can be what is refused
    path = tmp_path / "storage.yaml"
    path.write_text(f"insecure: true\nnode_id: '{bad_id}'\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(cfg.StorageConfig, path)
    assert "node_id" in str(info.value) and "not a valid id" in str(info.value), info.value
    path.write_text("insecure: true\nnode_id: node-a\n")
    assert cfg.load(cfg.StorageConfig, path).node_id == "node-a"  # the same file with a good id loads


def test_relative_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "storage.yaml"
    path.write_text("insecure: true\ndata_dir: ./var/n\n")
    assert cfg.load(cfg.StorageConfig, path).data_dir == str(tmp_path / "var" / "n")


@pytest.mark.parametrize("text,expected", [("1MiB", 1 << 20), ("5MB", 5_000_000), ("512KiB", 512 * 1024),
                                           (4096, 4096), ("1.5GiB", 3 << 29)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("40Mbit", 5_000_000), ("5MB", 5_000_000), ("none", None),
                                           ("100kbit", 12_500)])
def test_rates(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("bad", ["fast", "-1", "10 parsecs", True, 1.5])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text,expected", [("15m", 900.0), ("90s", 90.0), ("500ms", 0.5), ("7d", 604800.0),
                                           ("1.5h", 5400.0), (30, 30.0)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["soon", "-1m", "5 fortnights", True, -3])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_rpo_target_takes_a_duration(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text("insecure: true\nrpo_target: 1h\n")
    assert cfg.load(cfg.BrokerConfig, path).rpo_target == 3600.0
    path.write_text("insecure: true\n")
    assert cfg.load(cfg.BrokerConfig, path).rpo_target == 900.0
