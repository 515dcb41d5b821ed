"""The architecture, checked: logic modules never touch zmq, and `bus` knows
nothing of snapshots (it imports neither `schemas` nor `roles`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent

LOGIC = [
    "bus/frames.py", "bus/errors.py", "bus/credit.py", "bus/heartbeat.py", "bus/pipeline.py",
    *[str(p.relative_to(ROOT)) for p in (ROOT / "schemas").glob("*.py")],
    *[str(p.relative_to(ROOT)) for p in (ROOT / "roles/controller").glob("*.py")],
    *[str(p.relative_to(ROOT)) for p in (ROOT / "roles/storenode").glob("*.py")],
    "roles/appliance/upload.py", "roles/appliance/scanner.py", "roles/appliance/chunker.py",
    "roles/appliance/journal.py", "roles/appliance/progress.py",
    "roles/config.py", "roles/units.py",
]


def imported_modules(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_logic_modules_do_not_import_zmq():
    offenders = [p for p in LOGIC if "zmq" in imported_modules(ROOT / p)]
    assert not offenders, f"logic modules importing zmq: {offenders}"


def test_bus_imports_neither_schemas_nor_roles():
    for path in (ROOT / "bus").glob("*.py"):
        assert not imported_modules(path) & {"schemas", "roles"}, path
