"""The architecture, checked over the full transitive import closure:
- the cores (`roles/controller`, `roles/storenode`, `roles/appliance`) and the
  pure `bus/` modules never reach zmq, however indirectly;
- no role package imports another role's package;
- `bus` knows nothing of snapshots (it imports neither `schemas` nor `roles`);
- nothing under `roles/` imports `bench`.
"""

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
OURS = ("bus", "schemas", "roles", "bench")
ROLE_PACKAGES = ("roles.controller", "roles.storenode", "roles.appliance")
PURE_BUS = ("bus.clock", "bus.deadlines", "bus.effects", "bus.frames", "bus.errors", "bus.credit",
            "bus.heartbeat", "bus.pipeline", "bus.linkfaults", "bus.pacing", "bus.zap")


def module_path(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset:
    """Fully qualified names this module imports (ours resolved to modules, others to top-level names)."""
    path = module_path(name)
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            for alias in node.names:
                if module_path(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return frozenset(n for n in found if n)


def closure(name: str) -> set:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.split(".")[0] in OURS and module_path(current) is not None:
            todo.extend(direct_imports(current))
    return seen


def modules_under(package: str) -> list:
    folder = ROOT / Path(*package.split("."))
    return sorted(f"{package}.{p.stem}" if p.stem != "__init__" else package for p in folder.glob("*.py"))


CORE_MODULES = [m for pkg in ROLE_PACKAGES for m in modules_under(pkg)] + list(PURE_BUS)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_cores_and_pure_bus_never_reach_zmq(module):
    reached = {n.split(".")[0] for n in closure(module)}
    assert "zmq" not in reached, f"{module} reaches zmq through {sorted(closure(module))}"


@pytest.mark.parametrize("package", ROLE_PACKAGES)
def test_no_role_package_imports_another(package):
    others = [p for p in ROLE_PACKAGES if p != package]
    for module in modules_under(package):
        crossing = [n for n in closure(module) if any(n == o or n.startswith(o + ".") for o in others)]
        assert not crossing, f"{module} imports {crossing}"


def test_bus_imports_neither_schemas_nor_roles():
    for module in modules_under("bus"):
        reached = {n.split(".")[0] for n in closure(module)}
        assert not reached & {"schemas", "roles"}, module


def test_nothing_under_roles_imports_bench():
    for path in (ROOT / "roles").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        assert not any(n.split(".")[0] == "bench" for n in direct_imports(module)), module
