"""The layout shows the architecture: the embed and train halves never import each other, the
shard layer imports nothing above it, and a checkout runs without being installed."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

EMBED = ["distill/embed", "workers/embed_actor.py", "workers/align_actor.py"]
TRAIN = ["distill/train", "workers/train_worker.py"]


def _files(parts: list[str]):
    for part in parts:
        p = ROOT / part
        yield from sorted(p.rglob("*.py")) if p.is_dir() else [p]


def imported(path) -> set[str]:
    """Every module a file imports, at the top or inside a function, resolved to its dotted name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from distill import train`
    return out


def _offenders(parts: list[str], forbidden: str) -> list[str]:
    return [f"{p.relative_to(ROOT)}: {m}" for p in _files(parts) for m in sorted(imported(p))
            if m == forbidden or m.startswith(forbidden + ".")]


@pytest.mark.parametrize("half,other", [(EMBED, "distill.train"), (TRAIN, "distill.embed")])
def test_the_halves_never_import_each_other(half, other):
    assert _offenders(half, other) == []


def test_the_shard_layer_imports_nothing_above_it():
    above = ("distill.embed", "distill.train", "distill.evaluate", "distill.workers", "tensorflow", "ray", "keras")
    hits = [o for name in above for o in _offenders(["shards"], name)]
    assert hits == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from distill import train\n    import distill.embed.listing as l\n")
    assert {"distill.train", "distill.embed.listing"} <= imported(f)


def test_a_checkout_runs_without_being_installed():
    # -S: no site-packages, so no editable install either: only the checkout on sys.path.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import distill.shards.plan, distill.workers; "
            "print(distill.shards.plan.__file__); print(distill.workers.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], check=True, capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out == [str(ROOT / "shards" / "plan.py"), str(ROOT / "workers" / "__init__.py")]


def test_no_function_is_over_80_lines():
    """A reader holds a function in their head (architecture.md, "Sizes")."""
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in _files(["distill", "shards", "workers"]) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
