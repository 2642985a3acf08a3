"""Alignment on raw photos: what it gives the teacher, and what it costs over the detector.

Data: ``../shared/data/raw-celeba`` (485 unaligned in-the-wild CelebA photos of 20 people, up
to 360 px). The real mobilefacenet teacher scores same/different-person pairs on (a) the raw
photos squashed to 112x112 (what ``distill embed`` does with them unaligned) and (b) the faces
``distill align`` wrote, with the same pairs protocol (``distill evaluate``, all pairs); and on
pre-aligned crops of comparable people (``celeba/``: 400 people) as the mark to reach. Then the
stage's cost: ``distill align`` end to end (wall, CPU, faces found / photos) and its steady
rate (photos over its one actor's span from the first shard's start to the last one's end) against MTCNN alone on the same
photos in one process (decode + detect, the detector's own rate).

    python bench/align.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MOBILEFACENET,
    SHARED,
    add_idle_args,
    distill_cmd,
    loadavg,
    print_header,
    run_child,
    settle,
    table,
    this_script_cmd,
)

RAW, CELEBA = SHARED / "data" / "raw-celeba", SHARED / "data" / "celeba"


def child_detector(a) -> dict:
    """MTCNN alone, one photo per call as the stage calls it: decode + detect. ``--as-stage``:
    under the TensorFlow settings the stage's actor runs with (deterministic ops, its thread
    count), which its same-bytes rerun needs."""
    from distill.embed.faces import MTCNNDetector
    from distill.images import decode_rgb

    if a.as_stage:
        from distill.workers.embed_actor import _configure_tensorflow

        _configure_tensorflow(a.threads)
    paths = sorted(p for p in RAW.rglob("*") if p.is_file())
    det = MTCNNDetector()
    det(decode_rgb(paths[0].read_bytes()))  # warm-up (graph tracing), untimed
    t0, c0 = time.perf_counter(), time.process_time()
    found = sum(bool(det(decode_rgb(p.read_bytes()))) for p in paths)
    return {"photos": len(paths), "found": found, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


def evaluate(folder: Path, out: Path) -> dict:
    run_child(distill_cmd("evaluate", MOBILEFACENET, "--folders", folder, "--out", out, "--no-progress"), timeout=3600)
    r = json.loads(out.read_text())["targets"][0]
    return {"auc": r["models"]["model"]["auc"], "tar": r["models"]["model"]["tar_at_far"].get("1e-02"),
            "images": r["dataset"]["images"], "identities": r["dataset"]["identities"], "pairs": r["dataset"]["pairs"],
            "same_cos": r["models"]["model"]["same_cosine"], "diff_cos": r["models"]["model"]["different_cosine"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill-bench-align"))
    ap.add_argument("--celeba-people", type=int, default=400, help="pre-aligned CelebA people for the mark")
    ap.add_argument("--child", choices=["detector"], help=argparse.SUPPRESS)
    ap.add_argument("--as-stage", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help=argparse.SUPPRESS)
    add_idle_args(ap)
    a = ap.parse_args()
    if a.child == "detector":
        print(json.dumps(child_detector(a)))
        return 0
    print_header("Alignment: raw photos -> aligned faces (raw-celeba, real teacher)")
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    rows = []
    load = settle(a, "the teacher on squashed photos").label()
    squashed = evaluate(RAW, a.work / "squashed.json")
    load_align = settle(a, "distill align").label()
    t0 = time.perf_counter()
    res = run_child(distill_cmd("align", RAW, "--out", a.work / "aligned", "--no-progress"), timeout=3600, sample_cpu=2)
    wall = time.perf_counter() - t0
    manifest = json.loads((a.work / "aligned" / ".align" / "manifest.json").read_text())
    ledger = a.work / "aligned" / ".align" / "_ledger"
    # The actor's busy span: first shard's start to last shard's end. (Not the sum of the shard
    # records' seconds: the actor takes a second shard while one runs, and each record's
    # seconds start when its shard arrived, so the sum counts the overlap twice.)
    done = [json.loads(p.read_text()) for p in ledger.glob("*.done")]
    shard_seconds = max(d["finished_at"] for d in done) - min(d["finished_at"] - d["seconds"] for d in done)
    aligned = evaluate(a.work / "aligned", a.work / "aligned.json")
    mark_dir = a.work / "celeba-mark"
    mark_dir.mkdir()
    people = [p for p in sorted(CELEBA.iterdir()) if len(list(p.iterdir())) >= 2][:a.celeba_people]
    for p in people:
        (mark_dir / p.name).symlink_to(p)
    mark = evaluate(mark_dir, a.work / "mark.json")
    load_det = settle(a, "MTCNN alone").label()
    det = run_child(this_script_cmd("align.py", "--child", "detector"), timeout=3600).json()
    load_det2 = settle(a, "MTCNN alone, as the stage runs TensorFlow").label()
    det_stage = run_child(this_script_cmd("align.py", "--child", "detector", "--as-stage"), timeout=3600).json()

    for name, r in (("raw photos squashed to 112x112", squashed), ("the same photos, `distill align`ed", aligned),
                    (f"pre-aligned CelebA crops ({r_people(mark)} people, the mark)", mark)):
        rows.append([name, r["images"], r["identities"], f"{r['pairs']:,}", f"{r['auc']:.4f}",
                     "-" if r["tar"] is None else f"{r['tar']:.3f}", f"{r['same_cos']:.3f}", f"{r['diff_cos']:.3f}"])
    print(f"Teacher: mobilefacenet; load avg at the starts: {load}; {load_align}; {load_det}; {load_det2}\n")
    print(table(["images", "images", "people", "pairs", "teacher ROC-AUC", "TAR@FAR 1e-2", "same-person cos",
                 "different-person cos"], rows))
    photos, faces = manifest["rows"], manifest["rows_done"]
    cpu = res.cpu_series[-1][1] if res.cpu_series else float("nan")
    print(f"\n`distill align`: {faces} faces from {photos} photos ({len(manifest['errors'])} without one: "
          f"{', '.join(sorted({e['reason'] for e in manifest['errors']})) or '-'}), {wall:.1f} s wall including "
          f"start-up, {cpu:.1f} CPU s.\n")
    rate_stage = photos / max(shard_seconds, 1e-9)
    rate_det = det["photos"] / det["seconds"]
    rate_det_stage = det_stage["photos"] / det_stage["seconds"]
    print(table(["", "photos/s", "CPU s per photo"], [
        ["MTCNN alone (decode + detect, one process, TensorFlow's defaults)", f"{rate_det:.1f}",
         f"{det['cpu_seconds'] / det['photos']:.3f}"],
        [f"MTCNN alone, as the stage runs TensorFlow (deterministic ops, {a.threads} threads)", f"{rate_det_stage:.1f}",
         f"{det_stage['cpu_seconds'] / det_stage['photos']:.3f}"],
        ["`distill align`, steady (its actor's span from the first shard to the last: decode, detect, warp, JPEG, write)", f"{rate_stage:.1f}",
         f"{cpu / photos:.3f} (whole run, start-up included)"],
        ["stage over the detector run as the stage runs it", f"{100 * (rate_det_stage / rate_stage - 1):.1f}%", ""],
        ["stage over the detector with TensorFlow's defaults", f"{100 * (rate_det / rate_stage - 1):.1f}%", ""],
    ]))
    (a.work / "result.json").write_text(json.dumps({"squashed": squashed, "aligned": aligned, "mark": mark,
                                                    "detector": det, "detector_as_stage": det_stage,
                                                    "align_wall": wall, "align_cpu": cpu,
                                                    "shard_seconds": shard_seconds, "photos": photos, "faces": faces}))
    print(f"\nload average at the end: {loadavg()}")
    return 0


def r_people(r: dict) -> int:
    return r["identities"]


if __name__ == "__main__":
    sys.exit(main())
