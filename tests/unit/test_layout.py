"""The layout shows the architecture: every module imports only what its row of
docs/architecture.md's import table allows (the table is read here, so the two cannot drift),
the embed and train halves never import each other, and no function is over 80 lines."""

from __future__ import annotations

import ast
import re

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


def module_name(path) -> str:
    """The dotted name a file has once installed: shards/ and workers/ sit inside distill."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("shards", "workers"):
        parts.insert(0, "distill")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in _files(["distill", "shards", "workers"])}


def import_table() -> dict[int, dict]:
    """docs/architecture.md's "Who may import whom": row -> its part, the rows and names it may
    import, whether its own modules may import each other, and what it must never import."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("## Who may import whom", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        names = lambda cell: re.findall(r"`([^`]+)`", cell)  # noqa: E731
        spans = [range(int(a), int(b or a) + 1) for a, b in re.findall(r"rows? (\d+)(?:-(\d+))?", cells[2])]
        rows[int(cells[0])] = {"part": names(cells[1]), "rows": {r for span in spans for r in span},
                               "names": names(cells[2]), "each_other": "each other" in cells[2],
                               "never": names(cells[3])}
    return rows


def _in(module: str, part: list[str]) -> bool:
    return any(module == p.removesuffix(".*") or (p.endswith(".*") and module.startswith(p[:-1])) for p in part)


def _ours(module: str) -> str | None:
    """The module of ours an imported name is (``from distill.x import f`` names distill.x.f too)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def test_the_import_table_covers_every_module_once():
    rows = import_table()
    assert sorted(rows) == list(range(1, len(rows) + 1)) and len(rows) >= 8
    homes = {m: [k for k, r in rows.items() if _in(m, r["part"])] for m in MODULES}
    assert {m: h for m, h in homes.items() if len(h) != 1} == {}


def test_every_module_imports_only_what_its_row_of_the_table_allows():
    rows = import_table()
    row_of = {m: next(k for k, r in rows.items() if _in(m, r["part"])) for m in MODULES}
    wrong = []
    for module, path in MODULES.items():
        row = rows[row_of[module]]
        for name in sorted(imported(path)):
            if any(name == n or name.startswith(n + ".") for n in row["never"]):
                wrong.append(f"{module} imports {name}: its row {row_of[module]} says never")
            target = _ours(name)
            if target in (None, "distill", module):
                continue
            allowed = (row_of[target] in row["rows"] or any(target == n or target.startswith(n + ".") for n in row["names"])
                       or (row["each_other"] and row_of[target] == row_of[module]))
            if not allowed:
                wrong.append(f"{module} imports {target} (row {row_of[target]}): row {row_of[module]} may not")
    assert wrong == []


def test_the_table_check_catches_an_import_against_it():
    rows = import_table()
    shard_row = next(r for r in rows.values() if _in("distill.shards.plan", r["part"]))
    assert "distill.embed" in shard_row["never"] and "tensorflow" in shard_row["never"]
    assert not any(_in("distill.train.loop", rows[k]["part"]) for k in shard_row["rows"])

def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from distill import train\n    import distill.embed.listing as l\n")
    assert {"distill.train", "distill.embed.listing"} <= imported(f)


def test_no_function_is_over_80_lines():
    """A reader holds a function in their head (architecture.md, "Sizes")."""
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in _files(["distill", "shards", "workers"]) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
