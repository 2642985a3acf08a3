"""What a user waits for before the first image is embedded: ``distill -v embed`` of a few
images, whole process, with its start-up breakdown, beside what the pieces cost alone.

Each round runs, in child processes: ``python -c "import tensorflow"`` (what every process
that runs the teacher pays), a bare ``ray.init()`` + one empty actor, and ``distill -v embed``
of ``--images`` JPEGs with the real mobilefacenet teacher and a fresh local Ray (the user's
single-machine command). The ``-v`` line ``start-up ... s: python and imports ..., ray.init
..., teacher actor start ..., first rows ...`` is parsed into phases; medians over rounds.

``--other PYTHONPATH`` adds the same embed run of another checkout, side by side (e.g. the
commit before a change: ``git worktree add /tmp/old REV`` and, because the wheel maps
``distill.shards`` / ``distill.workers`` onto the top-level folders, ``ln -s ../shards
/tmp/old/distill/shards; ln -s ../workers /tmp/old/distill/workers``).

    python bench/startup.py --rounds 3 [--other /tmp/old]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import (  # noqa: E402
    MOBILEFACENET,
    add_idle_args,
    distill_cmd,
    loadavg,
    make_face_jpegs,
    print_header,
    run_child,
    settle,
    table,
)

RAY_ALONE = ("import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, log_to_driver=False)\n"
             "@ray.remote\nclass A:\n    def ready(self): return 1\n"
             "ray.get(A.remote().ready.remote()); print(f'{time.perf_counter() - t:.2f}')")
PHASE = re.compile(r"start-up ([\d.]+) s: (.*)$", re.M)


def phases(stderr: str) -> dict[str, float]:
    """The ``-v`` start-up line as {phase: seconds}, with the total as ``start-up``."""
    m = PHASE.search(stderr)
    if not m:
        raise RuntimeError(f"no start-up line in the output (is this distill too old for -v?):\n{stderr[-2000:]}")
    out = {"start-up": float(m.group(1))}
    for part in m.group(2).split(", "):
        name, secs, _ = part.rsplit(" ", 2)  # "python and imports 0.4 s"
        out[name] = float(secs)
    return out


def embed(listing: Path, out: Path, pythonpath: str | None) -> tuple[float, dict[str, float] | None]:
    shutil.rmtree(out, ignore_errors=True)
    env = {"RAY_ADDRESS": "local", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    cmd = distill_cmd("-v", "embed", listing, "--teacher", MOBILEFACENET, "--out", out, "--no-progress")
    res = run_child(cmd, env=env, cwd=tempfile.gettempdir())
    try:
        return res.seconds, phases(res.stderr)
    except RuntimeError:
        return res.seconds, None  # an older checkout without the breakdown: wall time only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--other", default=None, metavar="PYTHONPATH", help="also time this checkout's embed")
    p.add_argument("--work", default=None)
    add_idle_args(p)
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("Start-up")
    listing = work / "listing.parquet"
    run_child(distill_cmd("listing", make_face_jpegs(work / "images", a.images), "--out", listing))
    runs: dict[str, list] = {"tf": [], "ray": [], "this": [], "other": []}
    loads = []
    for _ in range(a.rounds):
        loads.append(settle(a, "a round").label())
        runs["tf"].append(run_child([sys.executable, "-c", "import tensorflow"]).seconds)
        runs["ray"].append(float(run_child([sys.executable, "-c", RAY_ALONE], env={"RAY_ADDRESS": "local"}).stdout.split()[-1]))
        runs["this"].append(embed(listing, work / "out", None))
        if a.other:
            runs["other"].append(embed(listing, work / "out-other", a.other))

    def med(xs) -> str:
        return f"{statistics.median(xs):.1f}" if xs else "-"

    rows = [["`python -c \"import tensorflow\"`", med(runs["tf"]), ""],
            ["`ray.init()` + one empty actor", med(runs["ray"]), ""]]
    if a.other:
        rows.append([f"`distill embed` of {a.images} images, {a.other}", med([w for w, _ in runs["other"]]), "whole process"])
    rows.append([f"`distill embed` of {a.images} images, this checkout", med([w for w, _ in runs["this"]]), "whole process"])
    names = list(runs["this"][0][1] or {})
    for n in names:
        rows.append([f"  {n}", med([ph[n] for _, ph in runs["this"] if ph]), "-v breakdown"])
    print(table(["what", "seconds (median)", ""], rows))
    print(f"\nrounds {a.rounds}; load at each round's start: {'; '.join(loads)}; at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
