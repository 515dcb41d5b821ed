"""End to end: a bad configuration stops a command at start with exit 2.

Every role's config is loaded strictly: an unknown key, a wrong type or a bad
unit is refused before anything runs, and stderr names the key and the file
(DESIGN.md "Configuration"). Each case starts from a config that would run,
so a refusal is due to the one bad key alone.
"""

from __future__ import annotations

import pytest

from tests.harness import free_ports

EXIT_USAGE = 2


def good_configs(cluster) -> dict:
    front, back, status = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    return {
        "broker": {"frontend_bind": front, "backend_bind": back, "status_bind": status,
                   "data_dir": str(cluster.root / "var" / "broker")},
        "storage": {"node_id": "node-a", "broker": back, "data_dir": str(cluster.root / "var" / "node-a")},
        "agent": {"device_id": "office-1", "brokers": [front], "state_dir": str(cluster.root / "var" / "office-1"),
                  "datasets": [{"name": "fileserver", "path": str(cluster.root / "snapshots"), "priority": 1}]},
    }


# (role, key as named in the error, how to break the config)
CASES = [
    ("broker", "frontend_bnd", lambda c: c.update(frontend_bnd="tcp://127.0.0.1:1")),
    ("broker", "heartbeat_interval_ms", lambda c: c.update(heartbeat_interval_ms="fast")),
    ("broker", "transfer_window", lambda c: c.update(transfer_window="8 parsecs")),
    ("broker", "insecure", lambda c: c.update(insecure="yes please")),
    ("storage", "colour", lambda c: c.update(colour="blue")),
    ("storage", "store_threads", lambda c: c.update(store_threads=[8])),
    ("storage", "window", lambda c: c.update(window="32MiBs")),
    ("storage", "fault_write_rate", lambda c: c.update(fault_write_rate="8 furlongs")),
    ("storage", "node_id", lambda c: c.update(node_id="../node-a")),
    ("agent", "max_active_transfer", lambda c: c.update(max_active_transfer=1)),
    ("agent", "max_active_transfers", lambda c: c.update(max_active_transfers=1.5)),
    ("agent", "datasets[0].chunk_size", lambda c: c["datasets"][0].update(chunk_size="1 MiBB")),
    ("agent", "datasets[0].colour", lambda c: c["datasets"][0].update(colour="red")),
    ("agent", "datasets[0].priority", lambda c: c["datasets"][0].update(priority="high")),
    # values that used to pass and then crash the role: a zero rate divides by zero, a heartbeat or
    # window past its message's schema limit makes the first WELCOME / READY / CREDIT unbuildable
    ("agent", "limit", lambda c: c.update(limit=0)),
    ("agent", "limit", lambda c: c.update(limit="0Mbit")),
    ("agent", "read_limit", lambda c: c.update(read_limit=0)),
    ("agent", "schedule", lambda c: c.update(schedule=[{"days": "all", "from": "00:00", "to": "24:00",
                                                         "limit": 0}])),
    ("agent", "heartbeat_interval_ms", lambda c: c.update(heartbeat_interval_ms=600_001)),
    ("broker", "heartbeat_interval_ms", lambda c: c.update(heartbeat_interval_ms=600_001)),
    ("broker", "idle_heartbeat_interval_ms", lambda c: c.update(idle_heartbeat_interval_ms=600_001)),
    ("broker", "heartbeat_interval_ms", lambda c: c.update(heartbeat_interval_ms=0)),
    ("broker", "transfer_window", lambda c: c.update(transfer_window="2TiB")),
    ("storage", "window", lambda c: c.update(window="2TiB")),
    ("storage", "fault_write_rate", lambda c: c.update(fault_write_rate=0)),
    ("storage", "heartbeat_interval_ms", lambda c: c.update(heartbeat_interval_ms=-5)),
]


def _command(role: str, config) -> list:
    if role == "agent":
        return ["agent", "--config", config, "--once", "--json"]
    return [role, "--config", config]


@pytest.mark.parametrize("role,key,break_it", CASES, ids=[f"{r}-{k}-{i}" for i, (r, k, _) in enumerate(CASES)])
def test_bad_key_exits_2_naming_key_and_file(cluster, role, key, break_it):
    conf = good_configs(cluster)[role]
    break_it(conf)
    path = cluster.write_config(f"bad-{role}", conf)

    result = cluster.run(*_command(role, path), timeout_s=30)

    assert result.rc == EXIT_USAGE, str(result)
    assert key in result.stderr and str(path) in result.stderr, str(result)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_restore_with_a_bad_agent_config_exits_2_and_writes_nothing(cluster, tmp_path):
    conf = good_configs(cluster)["agent"]
    conf["threads"] = "two"
    path = cluster.write_config("bad-agent", conf)
    out = tmp_path / "restored.img"

    result = cluster.run("restore", "--config", path, "--dataset", "fileserver", "--snapshot", "s1", "--out", out,
                         timeout_s=30)

    assert result.rc == EXIT_USAGE, str(result)
    assert "threads" in result.stderr and str(path) in result.stderr, str(result)
    assert not out.exists()


def test_missing_config_file_and_bad_usage_exit_2(cluster):
    missing = cluster.root / "nowhere.yaml"
    result = cluster.run("broker", "--config", missing, timeout_s=30)
    assert result.rc == EXIT_USAGE and str(missing) in result.stderr, str(result)

    path = cluster.write_config("agent", good_configs(cluster)["agent"])
    result = cluster.run("agent", "--config", path, "--json", timeout_s=30)  # --json needs --once
    assert result.rc == EXIT_USAGE and "--once" in result.stderr, str(result)
