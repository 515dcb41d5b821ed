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
    "bus/clock.py", "bus/deadlines.py", "bus/effects.py",
    *[str(p.relative_to(ROOT)) for p in (ROOT / "roles/appliance").glob("*.py")],
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


def imported_full_names(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_role_package_imports_another():
    packages = [p.name for p in (ROOT / "roles").iterdir() if (p / "__init__.py").exists()]
    for package in packages:
        others = {f"roles.{other}" for other in packages if other != package}
        for path in (ROOT / "roles" / package).glob("*.py"):
            bad = {n for n in imported_full_names(path) if any(n == o or n.startswith(o + ".") for o in others)}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_logic_modules_do_not_import_zmq():
    offenders = [p for p in LOGIC if "zmq" in imported_modules(ROOT / p)]
    assert not offenders, f"logic modules importing zmq: {offenders}"


def test_bus_imports_neither_schemas_nor_roles():
    for path in (ROOT / "bus").glob("*.py"):
        assert not imported_modules(path) & {"schemas", "roles"}, path
