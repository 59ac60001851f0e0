"""The package's import graph (every import, also lazy and TYPE_CHECKING ones) has no cycle."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import p4q_lightning

ROOT = Path(p4q_lightning.__file__).parent
PACKAGE = "p4q_lightning"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``
    only, ``from pkg import obj`` as ``pkg``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t if t in MODULES else base for t in subs]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name and target != PACKAGE:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_import_graph_is_acyclic():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("model", "data"),
        ("quant", "data"),
        ("training", "module"),
        ("model", "module"),
        ("model", "demo"),
        ("model", "training"),
        ("quant", "demo"),
        ("quant", "training"),
        ("data", "training"),
        ("data", "module"),
    ],
)
def test_layers_do_not_reach_upwards(importer: str, imported: str):
    prefix, target = f"{PACKAGE}.{importer}", f"{PACKAGE}.{imported}"
    offending = {
        (m, t)
        for m, deps in GRAPH.items()
        if m == prefix or m.startswith(prefix + ".")
        for t in deps
        if t == target or t.startswith(target + ".")
    }
    assert not offending, offending


def test_nothing_in_training_is_typed_on_the_lightning_module():
    """The training helpers take the classifier, option groups and trainer numbers they use."""
    typed = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "training").rglob("*.py")
        if "LightningModule" in path.read_text()
    ]
    assert not typed, typed
