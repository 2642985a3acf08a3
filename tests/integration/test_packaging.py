"""The built wheel, installed into a fresh venv: ``distill`` is its only top-level import name
(the repository's shards/ and workers/ folders install as distill.shards and distill.workers),
and the CLI entry point runs from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


def test_the_wheel_installs_one_top_level_package(tmp_path):
    # Built from a copy of what a source release holds: setuptools writes build/ beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("distill", "shards", "workers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=600, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("distill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"distill"}, tops
    assert {"distill/shards/dispatch.py", "distill/workers/embed_actor.py", "distill/errors.py",
            "distill/embed/listing.py", "distill/train/loop.py", "distill/evaluate/export.py"} <= set(names)
    assert not [n for n in names if n.startswith(("distill/tests", "distill/bench")) or "__pycache__" in n]

    # A venv that sees this machine's packages (numpy, Ray, TF) but gets distill only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=600, capture_output=True)
    code = ("import distill, distill.shards.dispatch, distill.workers.embed_actor, importlib.util as u; "
            "print(distill.__file__); print(u.find_spec('shards'), u.find_spec('workers'))")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of a checkout on the path
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=clean).stdout.splitlines()
    assert out[0].startswith(str(venv)), out  # the wheel's copy, not the checkout's
    assert out[1] == "None None"
    help_text = subprocess.run([str(venv / "bin" / "distill"), "--help"], check=True, capture_output=True, text=True,
                               timeout=300, cwd=tmp_path, env=clean).stdout
    assert "embed" in help_text and "train" in help_text


def test_the_package_imports_no_top_level_shards_or_workers():
    """Every import of the repository's shards/ and workers/ goes through ``distill.``."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(shards|workers)\b", re.M)
    hits = [str(p.relative_to(ROOT)) for d in ("distill", "shards", "workers", "tests", "bench")
            for p in sorted((ROOT / d).rglob("*.py")) if pattern.search(p.read_text())]
    assert hits == []
