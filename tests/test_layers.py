"""The import structure of src/losslab, read from the source with ``ast`` (every import, deferred
or not, counts): packages form layers without cycles, plumbing modules import nothing above
them, no package reaches into another package's private names or a CLI command's module."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import losslab

ROOT = Path(losslab.__file__).parent
PLUMBING = {"losslab.errors", "losslab.files", "losslab.labels", "losslab.paths"}
COMMAND_IMPORT_EXEMPT: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = ["losslab", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(module: str) -> Iterable[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every losslab import in ``module``;
    ``from losslab.pkg import sub`` of a submodule counts as importing ``losslab.pkg.sub``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "losslab":
                    yield alias.name, None, node.lineno
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "losslab"
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (node.module, alias.name, node.lineno)


def package(module: str) -> str:
    """The top-level part of losslab a module belongs to: ``losslab.masking.build`` -> ``masking``,
    ``losslab.files`` -> ``files``, ``losslab`` itself -> ``losslab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "losslab"


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def module_graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(m) if target in MODULES and target != m} for m in MODULES}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for m, targets in module_graph().items():
        graph.setdefault(package(m), set()).update(package(t) for t in targets if package(t) != package(m))
    return graph


def test_find_cycles_finds_them() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_packages_have_no_import_cycles() -> None:
    assert find_cycles(package_graph()) == []


def test_modules_have_no_import_cycles() -> None:
    cycles = find_cycles(module_graph())
    assert cycles == []


@pytest.mark.parametrize("module", sorted(PLUMBING))
def test_plumbing_modules_import_only_errors(module: str) -> None:
    assert {t for t, _, _ in imports(module)} <= {"losslab.errors"}


def test_data_does_not_import_models() -> None:
    found = [(m, t) for m in MODULES if package(m) == "data" for t, _, _ in imports(m) if package(t) == "models"]
    assert found == []


def test_no_private_names_from_another_package() -> None:
    found = [
        f"{m}:{line} imports {name} from {target}"
        for m in MODULES
        for target, name, line in imports(m)
        if name and name.startswith("_") and not name.startswith("__") and package(target) != package(m)
    ]
    assert found == []


def command_modules() -> set[str]:
    """The modules ``losslab.cli`` names as a subcommand's handler."""
    text = MODULES["losslab.cli"].read_text(encoding="utf-8")
    return {name for name in re.findall(r"""["'](losslab(?:\.\w+)+)["']""", text) if name in MODULES}


def test_command_modules_are_imported_by_the_cli_only() -> None:
    commands = command_modules()
    assert {"losslab.data.prepare", "losslab.compare.study", "losslab.train.command"} <= commands
    found = [
        f"{m}:{line} imports {target}"
        for m in MODULES
        if m != "losslab.cli"
        for target, _, line in imports(m)
        if target in commands and target != m and (m, target) not in COMMAND_IMPORT_EXEMPT
    ]
    assert found == []


LAYERS = [
    {"losslab", "losslab.errors", "losslab.files", "losslab.paths", "losslab.labels", "losslab.config"},
    {"losslab.data"},
    {"losslab.models"},
    {"losslab.losses"},
    {"losslab.masking"},
    {"losslab.eval"},
    {"losslab.train"},
    {"losslab.integrations"},
    {"losslab.compare"},
    {"losslab.audit"},
    {"losslab.cli"},
]
"""docs/architecture.md's layers, bottom first: a package imports only from its own layer or below."""


def test_packages_import_only_from_the_layers_below() -> None:
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert set(level) >= {".".join(m.split(".")[:2]) for m in MODULES}, "a new package: give it a layer"
    upward = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        for target, _, line in imports(module)
        if level[".".join(target.split(".")[:2])] > level[".".join(module.split(".")[:2])]
    ]
    assert upward == []
