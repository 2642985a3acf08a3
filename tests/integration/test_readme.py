"""The README, typed as a user types it.

The commands of the README's "The pipeline" block are read from README.md itself (so the two
cannot drift) and run verbatim, with the block's placeholders filled in with small shared data,
by the installed ``distill`` command from a fresh folder, with relative paths (training for 2
epochs instead of 20: the one liberty taken, to keep the suite short). Then the
training options are printed to a file with ``--print-config`` and used with ``--config`` from
another folder, and that run goes on with ``--resume``, from a third.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOBILEFACENET, ORL, ROOT
from support import SHARED

pytestmark = pytest.mark.integration

# What the block's placeholders stand for here: ../shared beside the folder the commands run in.
PLACEHOLDERS = {
    "PHOTOS": "photos",  # a few raw CelebA photos, copied in by the test
    "SOURCE...": "../shared/data/orl",
    "TEACHER": "../shared/teachers/mobilefacenet",
    "FACES": "../shared/data/orl",
}


def pipeline_commands(readme: str) -> list[str]:
    """The ``distill ...`` lines of the first code block under "## The pipeline", comments cut."""
    section = readme.split("\n## The pipeline\n", 1)[1]
    block = section.split("```", 2)[1]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("distill ")]


# The one liberty taken: 2 epochs instead of the default 20 (400 faces; the same command otherwise).
SHORTER = {"train": ["--epochs", "2"]}


def fill(command: str) -> list[str]:
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command)]
    return words + SHORTER.get(words[1], [])


def test_the_pipeline_block_is_found_and_uses_only_known_placeholders():
    commands = pipeline_commands((ROOT / "README.md").read_text())
    verbs = [c.split()[1] for c in commands]
    assert verbs == ["align", "listing", "embed", "status", "train", "export", "evaluate"], verbs
    unknown = {w for c in commands for w in shlex.split(c) if re.fullmatch(r"[A-Z][A-Z.]+", w)} - set(PLACEHOLDERS)
    assert unknown <= {"RUN"}, unknown  # (RUN appears inside paths only)


def _distill() -> list[str]:
    """The installed console script, as a user runs it (``python -m distill`` in a bare checkout)."""
    script = Path(sys.executable).parent / "distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distill"]


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(_distill() + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"distill {' '.join(argv)} (in {cwd}) exited {proc.returncode}\n{proc.stdout}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, ray_address):
    """(home, work, stdout by verb): the pipeline block run in ``home/work``, ``home/shared`` being ../shared."""
    if not (SHARED / "data" / "raw-celeba").is_dir() or not ORL.is_dir() or not MOBILEFACENET.is_dir():
        pytest.skip("needs ../shared/data/raw-celeba, ../shared/data/orl and ../shared/teachers/mobilefacenet")
    home = tmp_path_factory.mktemp("readme")
    work = home / "work"
    work.mkdir()
    os.symlink(SHARED, home / "shared")  # ../shared, as beside a checkout
    raw = SHARED / "data" / "raw-celeba"
    for person in sorted(p for p in raw.iterdir() if p.is_dir())[:2]:
        (work / "photos" / person.name).mkdir(parents=True)
        for photo in sorted(person.iterdir())[:3]:
            shutil.copy(photo, work / "photos" / person.name / photo.name)
    outputs = {}
    for command in pipeline_commands((ROOT / "README.md").read_text()):
        argv = fill(command)[1:]
        outputs[argv[0]] = _run(argv, work, _env(ray_address)).stdout
    return home, work, outputs


def _env(ray_address: str) -> dict:
    # The session's Ray cluster, reached as `ray job submit` would have it (RAY_ADDRESS).
    return {**os.environ, "RAY_ADDRESS": ray_address}


def test_the_readme_pipeline_runs_verbatim_from_a_fresh_folder(readme_run):
    home, work, outputs = readme_run
    run = work / "RUN"
    assert "align complete: 6 faces from 6 photos" in outputs["align"], outputs["align"]
    assert len(list((run / "faces").glob("*/*.jpg"))) == 6
    assert "listing: folders, 400 rows, 40 classes" in outputs["listing"]
    assert "embed complete: 400/400 rows" in outputs["embed"]
    assert "[complete]" in outputs["status"]
    assert (run / "export" / "saved_model" / "saved_model.pb").is_file()
    results = json.loads((run / "eval.json").read_text())
    paths = {t["dataset"]["path"] for t in results["targets"]}
    assert paths == {str(home / "shared" / "data" / "orl")}, paths  # recorded absolute, as given relative


def test_print_config_then_config_from_elsewhere_then_resume(readme_run, ray_address):
    home, work, _ = readme_run
    env = _env(ray_address)
    run = work / "RUN"
    # --print-config in one folder, --config from another: the file's paths are absolute.
    (work / "conf").mkdir()
    printed = _run(["train", "RUN/shards", "--out", "RUN/again", "--max-steps", "2", "--print-config"], work, env)
    (work / "conf" / "train.toml").write_text(printed.stdout)
    assert f'out = "{run / "again"}"' in printed.stdout
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    _run(["train", "--config", "../work/conf/train.toml"], elsewhere, env)
    steps = sorted(p.name for p in (run / "again" / "checkpoints").iterdir())
    assert steps == ["ckpt-000000002"], steps
    # ... and goes on with the options it was started with, from a third folder.
    _run(["train", "--resume", "work/RUN/again", "--max-steps", "3"], home, env)
    assert "ckpt-000000003" in {p.name for p in (run / "again" / "checkpoints").iterdir()}


# Slips a user makes, each with the line that refuses it; typed in the README's folder against its real run.
SLIPS = [
    (["export", "RUN/student", "--out", "RUN"], "--out {RUN} contains the input STUDENT {RUN}/student"),
    (["export", "RUN/student", "--out", "RUN/student/export"], "is inside the input STUDENT"),
    (["export", "RUN/student", "--out", "RUN/faces"], "is not empty and is no earlier output of `distill export`"),
    (["export", "RUN/student", "--out", "RUN/mine"], "holds mine.png, notes.txt, which `distill export` does not write"),
    (["export", "RUN/student", "--out", "RUN/x", "--tolerance", "-1"], "--tolerance is a max abs difference"),
    (["export", "RUN/student", "--out", "RUN/x", "--onnx-opset", "3"], "--onnx-opset 3: tf2onnx converts"),
    (["train", "RUN/shards", "--out", "RUN/shards"], "--out {RUN}/shards is the input SHARDS"),
    (["train", "RUN/shards", "--out", "RUN"], "contains the input SHARDS"),
    (["train", "RUN/shards", "--out", "RUN/faces"], "is no earlier output of `distill train`"),
    (["train", "--resume", "RUN/shards"], "that is a shard directory (made by `distill embed`)"),
    (["train", "RUN/shards", "--out", "RUN/s2", "--init", "/nonexistent"], "--init /nonexistent: no such folder"),
    (["train", "RUN/shards", "--out", "RUN/s2", "--batch-size", "-5"], "--batch-size must be positive, got -5"),
    (["embed", "RUN/listing.parquet", "--teacher", "../shared/teachers/mobilefacenet", "--out", "RUN/student"],
     "is no earlier output of `distill embed`"),
    (["embed", "RUN/listing.parquet", "--teacher", "T", "--out", "RUN/s3", "--batch-size", "-5"],
     "--batch-size must be positive, got -5"),
    (["listing", "photos", "--out", "photos/listing.parquet"], "is inside the input SOURCE"),
    (["listing", "photos", "--out", "RUN/eval.json"], "exists and is not a listing file distill wrote"),
    (["listing", "photos", "--out", "/proc/x"], "--out /proc/x: cannot write a file in /proc"),
    (["align", "photos", "--out", "photos/aligned"], "is inside the input SOURCE"),
    (["export-npy", "RUN/shards", "--out", "RUN/faces"], "is no earlier output of `distill export-npy`"),
    (["evaluate", "RUN/export", "--folders", "../shared/data/orl", "--out", "RUN/listing.parquet"],
     "exists and is not a results file distill wrote"),
    (["evaluate", "RUN/export", "--folders", "../shared/data/orl", "--plot", "RUN/mine/mine.png"],
     "exists and is not a ROC plot distill wrote"),
    (["evaluate", "RUN/export", "--folders", "photos/{PERSON}"], "images directly and no identity sub-folders"),
    (["demo", "--out", "RUN"], "is no earlier output of `distill demo`"),
    (["train", "RUN/shards", "--out", "s3://bucket/student"], "the store at 127.0.0.1:9 does not answer"),
]

_RUNNER = """
import contextlib, io, json, os, sys
from distill.cli import main
out = []
for argv, env in json.loads(sys.argv[1]):
    os.environ.update(env)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue(), "tensorflow" in sys.modules, "ray" in sys.modules])
print(json.dumps(out))
"""


def _checksums(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_slips_are_refused_in_one_line_before_any_work_and_touch_nothing(readme_run):
    _, work, _ = readme_run
    run = work / "RUN"
    (run / "mine").mkdir()
    (run / "mine" / "export.json").write_text("{}")  # an export's marker, and a file of the user's beside it
    (run / "mine" / "notes.txt").write_text("mine")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(run / "mine" / "mine.png")
    person = sorted(p.name for p in (work / "photos").iterdir())[0]
    slips = [([a.replace("{PERSON}", person) for a in argv], want.replace("{RUN}", str(run))) for argv, want in SLIPS]
    envs = [{"AWS_ENDPOINT_URL": "http://127.0.0.1:9"} if any(a.startswith("s3://") for a in argv) else {}
            for argv, _ in slips]
    before = _checksums(work)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([[a, e] for (a, _), e in zip(slips, envs)])],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (argv, want), (rc, err, tf, ray) in zip(slips, json.loads(proc.stdout.splitlines()[-1])):
        lines = [line for line in err.splitlines() if " INFO " not in line and " WARNING " not in line]
        assert rc == 2 and len(lines) == 1 and want in lines[0], (argv, rc, err)
        assert lines[0].startswith(f"distill {argv[0]}: error: "), (argv, lines)
        assert not tf and not ray, (argv, "imported TensorFlow or Ray before refusing")
    assert _checksums(work) == before
    assert not (run / "x").exists() and not (run / "s2").exists() and not (run / "s3").exists()
