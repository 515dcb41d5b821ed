"""The systemd units in configs/systemd/: each parses, restarts on failure,
reloads with SIGHUP, runs as a dedicated user with the usual hardening, may
write only its data directory, and starts `speedsync <role> --config ...`."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "configs" / "systemd"
ROLES = {"speedsync-broker.service": "broker", "speedsync-storage@.service": "storage",
         "speedsync-agent.service": "agent"}
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}


def parse(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)  # a key given twice is an error
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text(), source=str(path))
    return unit


def test_every_role_has_a_unit_and_nothing_else_is_there():
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(ROLES)


@pytest.mark.parametrize("name", sorted(ROLES))
def test_unit_restarts_reloads_and_is_hardened(name):
    unit = parse(UNITS / name)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{name}: {key}"
    assert service.get("User") and service["User"] not in ("root", "0"), f"{name}: runs as a dedicated user"
    writable = service["ReadWritePaths"].split()
    assert writable and all(p.startswith("/var/lib/speedsync/") for p in writable), writable
    state = service["StateDirectory"]
    assert writable == [f"/var/lib/{state}"], "the state directory systemd makes is the one writable path"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", sorted(ROLES))
def test_unit_runs_its_role_with_a_config_file(name):
    argv = shlex.split(parse(UNITS / name)["Service"]["ExecStart"])
    assert Path(argv[0]).name == "speedsync" and Path(argv[0]).is_absolute()
    assert argv[1] == ROLES[name]
    assert argv[2] == "--config" and argv[3].startswith("/etc/speedsync/") and argv[3].endswith(".yaml")
    assert len(argv) == 4
    if name.endswith("@.service"):
        assert "%i" in argv[3], "each instance runs its own node's config"
