"""No private attribute of another object is used in ``src/`` beyond a short list, each entry
with the reason no public API does the job (the README's architecture section repeats it)."""

from __future__ import annotations

import ast
from pathlib import Path

import p4q_lightning

ROOT = Path(p4q_lightning.__file__).parent

# (file, expression): why
ALLOWED = {
    ("export/int8.py", "torch._int_mm"): "torch's only int8 x int8 -> int32 GEMM",
    ("quant/quantizer.py", "t._version"): "a tensor's in-place version counter (cache keys)",
}


def _owner(node: ast.AST) -> str:
    return ast.unparse(node)


def private_uses() -> set[tuple[str, str]]:
    """``x._name`` where ``x`` is not ``self``, ``cls`` or ``super()`` (dunders excluded)."""
    found = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and _owner(owner.func) == "super":
                continue
            found.add((str(path.relative_to(ROOT)), f"{_owner(owner)}.{name}"))
    return found


def test_only_the_listed_private_attributes_are_used():
    assert private_uses() == set(ALLOWED)


def test_the_redesign_removed_these_private_apis():
    names = {expr.rsplit(".", 1)[1] for _, expr in private_uses()}
    gone = {"_data_source", "_DataLoaderSource", "_last_lr", "_MODEL_CONFIG_PATHS"}
    assert not names & (gone | {"_qkv_same_embed_dim", "_trainer"})
