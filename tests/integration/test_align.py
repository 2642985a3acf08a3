"""``distill align`` on real raw photos (raw-celeba): aligned crops the teacher recognises,
a photo without a face counted and listed, SIGKILL mid-run then rerun: every photo once, the
same bytes as an uninterrupted run; and the insightface pack it can write."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MOBILEFACENET, run_cli
from support import CHILD_ENV, SHARED

pytestmark = pytest.mark.integration

RAW = SHARED / "data" / "raw-celeba"
PEOPLE, PER_PERSON = 4, 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    pytest.importorskip("mtcnn")
    if not RAW.is_dir():
        pytest.skip("../shared/data/raw-celeba is not here")
    root = tmp_path_factory.mktemp("raw") / "photos"
    for person in sorted(p.name for p in RAW.iterdir())[:PEOPLE]:
        (root / person).mkdir(parents=True)
        for f in sorted((RAW / person).iterdir())[:PER_PERSON]:
            (root / person / f.name).symlink_to(f)
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(np.full((200, 160, 3), 128, np.uint8)).save(root / sorted(os.listdir(root))[0] / "blank.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3)).astype(np.uint8)).save(root / sorted(os.listdir(root))[1] / "noise.png")
    return root


def _align(photos: Path, out: Path, address: str, *extra, check: bool = True):
    return run_cli("align", photos, "--out", out, "--shard-size", 4, "--address", address, "--no-progress", *extra,
                   check=check, timeout=900)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "_ledger" not in p.parts and p.name != "listing.parquet"}


@pytest.fixture(scope="module")
def aligned(photos, tmp_path_factory, ray_address):
    out = tmp_path_factory.mktemp("aligned") / "faces"
    r = _align(photos, out, ray_address, "--heartbeat", 0.1)
    return out, r


def test_the_main_face_of_every_photo_is_aligned_and_the_faceless_are_listed(photos, aligned):
    out, r = aligned
    manifest = json.loads((out / ".align" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "align"
    reasons = {Path(e["path"]).name: e["reason"] for e in manifest["errors"]}
    assert reasons.get("blank.jpg") == "no face found" and reasons.get("noise.png") == "no face found"
    faces = sorted(out.rglob("*.jpg"))
    assert len(faces) == manifest["rows_done"] >= PEOPLE * PER_PERSON - 4  # (MTCNN may miss a hard photo or two)
    assert len(faces) + len(manifest["errors"]) == PEOPLE * PER_PERSON + 2  # every photo: a face or a reason
    from PIL import Image

    assert {Image.open(f).size for f in faces} == {(112, 112)}
    assert {f.parent.name for f in faces} == {p.name for p in photos.iterdir()}  # the identity layout kept
    assert "without a face" in r.stdout and "distill listing" in r.stdout
    # Off a terminal, the heartbeat: shards and photos done of the 42 (11 shards of 4), the pace, the time left.
    beats = re.findall(r"INFO distill\.embed\.sharded: align: (\d+)/11 shards done, (\d+)/42 photos \(\d+\.\d%\), [\d,]+ "
                       r"img/s, ETA \S+$", r.stderr, re.M)
    assert beats, r.stderr[-3000:]
    status = run_cli("status", out / ".align", "--errors").stdout
    assert "align run" in status and "no face found" in status


def test_the_teacher_recognises_the_aligned_faces(aligned, tmp_path):
    out, _ = aligned
    scored = run_cli("evaluate", MOBILEFACENET, "--folders", out, "--out", tmp_path / "eval.json", "--no-progress")
    auc = json.loads((tmp_path / "eval.json").read_text())["targets"][0]["models"]["model"]["auc"]
    assert auc > 0.9, scored.stdout  # same-person crops far closer than different people's


def test_sigkill_mid_run_and_rerun_align_every_photo_once_with_the_same_bytes(photos, aligned, tmp_path, ray_address):
    reference, _ = aligned
    out = tmp_path / "faces"
    args = [sys.executable, "-m", "distill", "align", str(photos), "--out", str(out), "--shard-size", "4", "--address",
            ray_address, "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **CHILD_ENV})
    ledger, deadline = out / ".align" / "_ledger", time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        done = list(ledger.glob("*.done")) if ledger.is_dir() else []
        if done:
            proc.send_signal(signal.SIGKILL)  # a shard or more done, others in flight
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    _align(photos, out, ray_address)
    assert _files(out) == _files(reference)


def test_an_insightface_pack_of_the_aligned_faces(photos, aligned, tmp_path, ray_address):
    # The finished run again with --rec (a copy of it): nothing is aligned twice, the pack is written.
    out = tmp_path / "faces"
    shutil.copytree(aligned[0], out, symlinks=True)
    r = _align(photos, out, ray_address, "--rec")
    assert "insightface pack" in r.stdout
    pack = ("train.rec", "train.idx", "property")
    assert {k: v for k, v in _files(out).items() if k not in pack} == _files(aligned[0])  # no face rewritten
    listing = run_cli("listing", out / "train.rec", "--out", tmp_path / "l.parquet").stdout
    faces = len(list(out.rglob("*.jpg")))
    assert f"{faces} rows, {PEOPLE} classes" in listing
