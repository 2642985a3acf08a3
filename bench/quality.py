"""Student quality on real faces, judged on people the student never saw.

Data: ``../shared/data/glint12`` (12 real people, 4,811 aligned 112x112 faces), split by
identity with a fixed seed (``distill.train.validate.heldout_classes``, the split ``distill train
--val-split`` makes): students train on 8 people and are judged on the other 4; plus ORL
(40 other people, grey 92x112, resized) as a second unseen set. Teacher: the real
mobilefacenet SavedModel.

One ``distill embed --views K`` of all 12 people (the teacher pass is not part of any
recipe's budget), then per recipe, side by side, the real CLI: ``distill train`` (with
``--val-split``, so the held-out people are scored at every epoch end: the curve),
``distill export`` and ``distill evaluate`` on the held-out people and on ORL with the
teacher scored on the same pairs (the last checkpoint: choosing the epoch on the held-out
people would flatter them). Every recipe gets the same training budget in samples
seen; wall and CPU minutes are measured. Writes ``bench/results/quality.json``, the table
(markdown, stdout) and ``docs/quality.png`` (held-out cosine against samples seen).

    python bench/quality.py [--epochs 18] [--views 4] [--only NAME,...] [--seeds 0,1]

The defaults' row comes first; every row gets the same budget (``--epochs`` over the 8 people).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    GLINT12,
    MOBILEFACENET,
    ORL,
    ROOT,
    add_idle_args,
    distill_cmd,
    loadavg,
    print_header,
    run_child,
    settle,
    table,
)  # noqa: E402

VAL_SPLIT, VAL_SEED, SEED = 0.34, 0, 0

# name -> distill train options (beside the shared ones). Plain images unless the recipe says views.
PLAIN = ["--view-prob", "0"]
NO_CONTRAST = ["--contrast-weight", "0"]
RECIPES = {
    "softmax only (no teacher)": ["--distill-weight", "0", "--ce-weight", "1", *NO_CONTRAST, *PLAIN],
    "raw MSE + softmax 1/1 (the first defaults)": ["--distill-loss", "mse", "--ce-weight", "1", *NO_CONTRAST, *PLAIN],
    "nMSE": [*NO_CONTRAST, *PLAIN],
    "nMSE + views (the previous defaults)": NO_CONTRAST,
    "nMSE + contrast": PLAIN,
    "contrast + views": ["--distill-weight", "0"],
    "nMSE + contrast + teacher-centre ArcFace 0.1 + views": ["--margin", "teacher", "--ce-weight", "0.1"],
    "nMSE + contrast + views, width 0.35": ["--width", "0.35"],
    "nMSE + contrast + views, width 1.0": ["--width", "1.0"],
}
HEADLINE = "defaults: nMSE + contrast + views"


def more_people(guard, work: Path, extra: Path, heldout: list[str], views: int, epochs: int) -> list[dict]:
    """What more identities give: the 8 training people alone, and with every identity folder
    of ``extra`` added as further training people, each embedded on its own and trained with
    the default recipe for whole epochs at no more samples than ``epochs`` epochs over the 8
    people (the larger set gets the whole epochs that fit: fewer samples, never more), judged
    on the held-out glint12 people only (``extra`` is not unseen for the second row)."""
    train8 = [p.name for p in sorted(GLINT12.iterdir()) if p.is_dir() and p.name not in heldout]
    extra = extra.resolve()
    steps = epochs * (sum(len(list((GLINT12 / p).iterdir())) for p in train8) // 64)
    unseen = work / "unseen"
    arms = []
    for name, extra_dirs in (("defaults, 8 people (control)", []),
                             (f"defaults, 8 people + {extra.name} ({len(list(extra.glob('*/')))} more)", sorted(extra.glob("*/")))):
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
        root = work / slug
        people = root / "people"
        if people.exists():
            shutil.rmtree(people)
        people.mkdir(parents=True)
        for p in train8:
            (people / p).symlink_to(GLINT12 / p)
        for d in extra_dirs:
            (people / f"{extra.name}_{d.name}").symlink_to(d.resolve())
        run_child(distill_cmd("listing", people, "--out", root / "listing.parquet"), timeout=600)
        run_child(distill_cmd("embed", root / "listing.parquet", "--teacher", MOBILEFACENET, "--out", root / "shards",
                              "--views", views, "--shard-size", 512, "--no-progress"), timeout=3 * 3600)
        arms.append((name, root / "shards"))
    rows = []
    for name, shards in arms:  # (trained after both teacher passes: those are not part of the budget)
        rows_total = json.loads((shards / "manifest.json").read_text())["rows"]
        rows.append(train_recipe(guard, work, name, ["--val-folders", str(unseen)], max(1, steps // (rows_total // 64)),
                                 shards, unseen, split=False, sets=("unseen",)))
    return rows


def heldout_people(listing: Path) -> list[str]:
    """The names of the people ``--val-split`` holds out, from the listing's label counts (the
    shards hold every listing row: their counts are the same)."""
    import numpy as np
    import pyarrow.parquet as pq

    from distill.embed.listing import read_listing_info
    from distill.train.validate import heldout_classes

    info = read_listing_info(str(listing))
    counts = np.bincount(pq.read_table(listing, columns=["label"]).column("label").to_numpy(),
                         minlength=len(info.label_names))
    return [info.label_names[k] for k in heldout_classes(counts, VAL_SPLIT, VAL_SEED)]


def folder_of(people: list[str], out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in people:
        (out / p).symlink_to(GLINT12 / p)
    return out


def train_recipe(guard, work: Path, name: str, opts: list[str], epochs: int, shards: Path, unseen: Path, split: bool = True,
                 sets: tuple[str, ...] = ("unseen", "orl"), seed: int = SEED) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
    student, export = work / slug / "student", work / slug / "export"
    for d in (student, export):  # (not the recipe's folder: more_people keeps its shards there)
        if d.exists():
            shutil.rmtree(d)
    load = settle(guard, name).label()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: training {epochs} epochs (load {load})", file=sys.stderr, flush=True)
    held = ["--val-split", VAL_SPLIT, "--val-seed", VAL_SEED] if split else []
    # Every recipe here ran before the relational term existed: it is off unless a recipe says so.
    train = run_child(distill_cmd("train", shards, "--out", student, "--epochs", epochs, "--seed", seed, *held,
                                  "--no-progress", "--pair-weight", "0", *opts), timeout=3 * 3600, sample_cpu=5)
    # The last checkpoint, not --best: picking the epoch on the held-out people would flatter them.
    run_child(distill_cmd("export", student, "--out", export), timeout=1800)
    scores = {}
    for set_name, folder in (("unseen", unseen), ("orl", ORL)):
        if set_name not in sets:
            continue
        out = work / slug / f"eval-{set_name}.json"
        run_child(distill_cmd("evaluate", export, "--folders", folder, "--teacher", MOBILEFACENET, "--out", out,
                              "--no-progress"), timeout=1800)
        scores[set_name] = json.loads(out.read_text())
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    epochs_recs = [r for r in records if r["kind"] == "epoch"]
    curve = [(r["seen"], r.get("val_cos"), r.get("val_auc")) for r in records if r["kind"] in ("val", "epoch")]
    best = json.loads((student / "best" / "val.json").read_text())
    seen = epochs_recs[-1]["seen"] if epochs_recs else 0
    train_seconds = sum(r["seconds"] for r in epochs_recs)
    return {
        "name": name, "options": opts, "seed": seed, "epochs": epochs, "samples_seen": seen, "load_at_start": load,
        "wall_seconds": train.seconds, "train_seconds": train_seconds,
        "cpu_seconds": train.cpu_series[-1][1] if train.cpu_series else None,
        "images_per_sec": seen / max(train_seconds, 1e-9),
        "best_epoch_val": best, "curve": curve,
        "unseen": _summary(scores["unseen"]), "orl": _summary(scores["orl"]) if "orl" in scores else None,
    }


def _summary(r: dict) -> dict:
    r = r["targets"][0]
    m = r["models"]
    # (accuracy: 10-fold since evaluate's results format 2; documents written before hold the best accuracy)
    return {"student_auc": m["model"]["auc"], "student_accuracy": m["model"]["accuracy_mean"],
            "teacher_auc": m["teacher"]["auc"], "teacher_accuracy": m["teacher"]["accuracy_mean"],
            "cosine": r["mean_cosine"], "images": r["dataset"]["images"], "identities": r["dataset"]["identities"],
            "pairs": r["dataset"]["pairs"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        pts = [(s, c) for s, c, _ in r["curve"] if c is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r["name"])
    ax.set_xlabel("samples seen")
    ax.set_ylabel("mean teacher-student cosine, held-out people")
    ax.set_title("glint12: 8 people train, 4 never seen (validation images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(doc: dict) -> None:
    """The markdown table of a results document."""
    results, people = doc["results"], doc["heldout_people"]
    rows = []
    for r in results:
        u, o = r["unseen"], r["orl"]
        orl = [f"{o['student_auc']:.3f}", f"{o['cosine']:.3f}", f"{o['teacher_auc']:.3f}"] if o else ["(not scored)"] * 3
        rows.append([r["name"], f"{r['samples_seen']:,}", f"{r['train_seconds'] / 60:.1f}",
                     f"{(r['cpu_seconds'] or 0) / 60:.1f}", f"{r['images_per_sec']:.0f}",
                     f"{u['student_auc']:.3f}", f"{u['student_accuracy']:.3f}", f"{u['cosine']:.3f}",
                     f"{u['teacher_auc']:.3f}", *orl,
                     f"{r['best_epoch_val'].get('epochs_done', '')} ({r['best_epoch_val']['val_auc']:.3f})"])
    u0, o0 = results[0]["unseen"], next((r["orl"] for r in results if r["orl"]), None)
    orl = f"ORL: {o0['images']} images, {o0['identities']} people. " if o0 else ""
    print(f"Held-out people: {', '.join(people)} ({u0['images']} images, {u0['pairs']:,} pairs); {orl}Teacher pass "
          f"(embed of the 12 people, {doc['embed']['views']} views): {doc['embed']['seconds']:.0f} s.\n")
    print(table(["recipe", "samples seen", "train min", "CPU min", "img/s", "unseen AUC", "unseen acc",
                 "unseen cos", "teacher AUC", "ORL AUC", "ORL cos", "ORL teacher AUC", "best epoch (val AUC)"], rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill-bench-quality"))
    ap.add_argument("--epochs", type=int, default=18,
                    help="training budget of every row, in epochs over the 8 people (18: ~51k samples, ~9 minutes here)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds: each chosen row once per seed")
    ap.add_argument("--views", type=int, default=4, help="teacher views stored per image")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all; 'none': no recipe)")
    ap.add_argument("--more-people", type=Path, metavar="DIR",
                    help="also two rows on what more identities give: the 8 people alone and with DIR's identity "
                         "folders added (e.g. ../shared/data/orl), judged on the held-out people")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "quality.png")
    ap.add_argument("--report", action="store_true", help="only print the table of --json (and redraw --png)")
    add_idle_args(ap)
    a = ap.parse_args()
    if a.report:
        doc = json.loads(a.json.read_text())
        plot(doc["results"], a.png)
        report(doc)
        return 0
    print_header("Student quality on people it never saw (glint12 split by identity, ORL)")
    a.work.mkdir(parents=True, exist_ok=True)
    listing, shards = a.work / "listing.parquet", a.work / "shards"
    run_child(distill_cmd("listing", GLINT12, "--out", listing), timeout=600)
    people = heldout_people(listing)
    unseen = folder_of(people, a.work / "unseen")
    print(f"held-out people: {', '.join(people)}", file=sys.stderr)
    recipes = {HEADLINE: [], **RECIPES}
    chosen = [n for n in recipes if not a.only or n in a.only.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    embed_seconds, emb, manifest, results = 0.0, None, {}, []
    if chosen:  # one teacher pass of all 12 people serves every recipe
        t0 = time.perf_counter()
        emb = run_child(distill_cmd("embed", listing, "--teacher", MOBILEFACENET, "--out", shards, "--views", a.views,
                                    "--shard-size", 512, "--no-progress"), timeout=3 * 3600)
        embed_seconds = time.perf_counter() - t0
        manifest = json.loads((shards / "manifest.json").read_text())
    results += [train_recipe(a, a.work, n + (f", seed {seed}" if seeds != [SEED] else ""), recipes[n], a.epochs, shards,
                             unseen, seed=seed) for n in chosen for seed in seeds]
    if a.more_people:
        results += more_people(a, a.work, a.more_people, people, a.views, a.epochs)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"heldout_people": people, "embed": {"seconds": embed_seconds, "views": a.views,
                                  "stdout": emb.stdout[-400:] if emb else ""}, "teacher_norm": manifest.get("teacher_norm"),
                                  "results": results}, indent=1))
    plot(results, a.png)
    report(json.loads(a.json.read_text()))
    print(f"\nload average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
