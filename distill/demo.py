"""``distill demo``: the whole pipeline on synthetic faces, no downloads, no cluster, no Redis.

Owns the end-to-end run and its summary. In one output directory (``--out``, default
``demo-run``) it makes a synthetic identity dataset and a held-out set of other identities
(``distill.synthetic``), trains and exports a small ResNet teacher on the training set, then
runs the real stages exactly as a user would: listing -> embed (local Ray, file ledger) ->
train -> export -> evaluate (teacher vs student on the held-out identities). It prints and
saves (``summary.json``) a table of what each stage did, its wall time and throughput, the
verification results and where every output is.

Rerunning into the same ``--out`` reuses finished stages (recorded in ``demo.json`` after
each one) and lets embed and train resume on their own; a different configuration into the
same directory is refused rather than mixed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from distill.errors import BadOption, CheckFailed, IncompatibleRun
from distill.options import add_options, option
from distill.startup import show_progress

log = logging.getLogger(__name__)

STAGES = ("data", "teacher", "listing", "embed", "train", "export", "evaluate")
STATE = "demo.json"
SUMMARY = "summary.json"
FORMAT = "distill-demo/1"
HELDOUT_FIRST = 100_000  # held-out identity numbers: never among the training identities
# Fields that do not change what the demo computes, so a rerun may change them freely.
NOT_IDENTITY = ("out", "address", "progress")


# The --quick preset: a smaller, faster configuration (for tests), under the options given.
QUICK = {
    "identities": 30,
    "per_identity": 10,
    "heldout_identities": 8,
    "heldout_per_identity": 8,
    "size": 64,
    "embedding_dim": 64,
    "teacher_epochs": 10,
    "epochs": 12,
    "batch_size": 16,
    "lr": 1e-2,
}


def _q(name: str) -> str:
    return f"; --quick: {QUICK[name]}" if name in QUICK else ""


@dataclass(frozen=True)
class DemoConfig:
    """The options of ``distill demo`` (the CLI is derived from these fields)."""

    out: str = option("demo-run", "output directory (a rerun resumes; finished stages are reused)", metavar="DIR", path=True)
    identities: int = option(40, "training identities" + _q("identities"), group="data")
    per_identity: int = option(20, "images per training identity" + _q("per_identity"), group="data")
    heldout_identities: int = option(10, "held-out identities (evaluation only)" + _q("heldout_identities"),
                                     group="data")
    heldout_per_identity: int = option(10, "images per held-out identity" + _q("heldout_per_identity"), group="data")
    size: int = option(112, "image size (teacher and student input)" + _q("size"), group="data")
    embedding_dim: int = option(128, "teacher (and student) embedding dim" + _q("embedding_dim"), group="teacher")
    teacher_epochs: int = option(6, "epochs of synthetic teacher training" + _q("teacher_epochs"), group="teacher")
    views: int = option(2, "teacher views per image (`distill embed --views`)", group="teacher")
    epochs: int = option(8, "student epochs" + _q("epochs"), group="student")
    batch_size: int = option(32, "student batch size" + _q("batch_size"), group="student")
    lr: float = option(5e-3, "student learning rate" + _q("lr"), group="student")
    width: float | None = option(None, "student width (default: the default student's)", group="student")
    shard_size: int = option(256, "rows per shard", group="teacher")
    seed: int = option(0, "seed of data, teacher and student")
    address: str | None = option(None, "an existing Ray cluster for the embed stage (default: RAY_ADDRESS when it is "
                                 "set, else start a local one)")
    progress: bool | None = option(None, "progress bars (default: on a terminal only)")

    def __post_init__(self) -> None:
        for name in ("teacher_epochs", "epochs", "batch_size", "embedding_dim", "shard_size"):
            if getattr(self, name) < 1:
                raise BadOption(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "width"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise BadOption(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("views", "seed"):
            if getattr(self, name) < 0:
                raise BadOption(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.size < 32:
            raise BadOption(f"--size must be at least 32 (the student's smallest input), got {self.size}")
        for name in ("identities", "heldout_identities"):
            if getattr(self, name) < 2:
                raise BadOption(f"--{name.replace('_', '-')} must be at least 2 (verification needs pairs), got "
                                f"{getattr(self, name)}")
        for name in ("per_identity", "heldout_per_identity"):
            if getattr(self, name) < 2:
                raise BadOption(f"--{name.replace('_', '-')} must be at least 2 (same-identity pairs), got "
                                f"{getattr(self, name)}")
        if self.identities * self.per_identity < self.batch_size:
            raise BadOption(
                f"{self.identities} x {self.per_identity} training images make no batch of {self.batch_size}; "
                "lower --batch-size or raise --identities/--per-identity"
            )


# The default takes ~3-6 minutes on a 2-core CPU; --quick is the same pipeline, smaller.
# Measured on 2 busy cores: a student from scratch needs ~200 optimizer steps at a high
# learning rate before its embeddings separate unseen identities, so --quick keeps the step
# count and shrinks the images (64 px) and the set instead.


# ---------------------------------------------------------------------------------------
# Pure decisions.


def resolve_config(overrides: dict[str, Any], quick: bool) -> DemoConfig:
    """The default (or ``--quick``) preset, then every option the user gave explicitly."""
    base = replace(DemoConfig(), **QUICK) if quick else DemoConfig()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def identity(cfg: DemoConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IDENTITY}


def check_same_run(state: dict[str, Any] | None, cfg: DemoConfig) -> None:
    """Refuse to mix two configurations in one output directory."""
    if state is None:
        return
    have, want = state.get("config", {}), identity(cfg)
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        shown = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff)
        raise IncompatibleRun(
            f"{cfg.out} holds a demo run made with other options ({shown}); rerun with the same options to "
            "resume it, or pass another --out (or delete the directory) to start a new one"
        )


def stage_actions(done: set[str]) -> dict[str, str]:
    """``reuse`` a stage recorded as finished, ``run`` the others (embed and train resume)."""
    return {s: ("reuse" if s in done else "run") for s in STAGES}


def per_second(images: int, seconds: float) -> float | None:
    return images / seconds if seconds > 0 and images > 0 else None


def paths(out: str) -> dict[str, str]:
    out = os.path.abspath(out)
    return {
        "train_data": os.path.join(out, "data", "train"),
        "heldout_data": os.path.join(out, "data", "heldout"),
        "teacher": os.path.join(out, "teacher"),
        "listing": os.path.join(out, "listing.parquet"),
        "shards": os.path.join(out, "shards"),
        "student": os.path.join(out, "student"),
        "export": os.path.join(out, "export"),
        "evaluation": os.path.join(out, "evaluation.json"),
        "summary": os.path.join(out, SUMMARY),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The plain-text table the demo ends with."""
    lines = [f"{'stage':<9} {'status':<7} {'seconds':>8} {'images':>7} {'images/s':>9}  output"]
    for name in STAGES:
        r = summary["stages"][name]
        ips = f"{r['images_per_second']:9.1f}" if r.get("images_per_second") else f"{'-':>9}"
        secs = f"{r['seconds']:8.1f}" if r.get("seconds") is not None else f"{'-':>8}"
        lines.append(f"{name:<9} {r['status']:<7} {secs} {r.get('images', 0):>7} {ips}  {r.get('output', '')}")
    lines.append(f"total wall time this run: {summary['seconds']:.1f} s")
    v = summary["verification"]
    lines.append("")
    lines.append(
        f"verification on {v['identities']} held-out identities never seen in training "
        f"({v['images']} images, {v['pairs']} pairs, {v['same_pairs']} same):"
    )
    lines.append(f"{'model':<8} {'ROC-AUC':>8} {'accuracy (10-fold)':>18}")
    for role in ("teacher", "student"):
        r = v[role]
        lines.append(f"{role:<8} {r['auc']:>8.4f} {r['accuracy_mean']:>8.4f} +- {r['accuracy_std']:.4f}")
    for role in ("teacher", "student"):
        if v[role].get("collapse_warning"):
            lines.append(f"WARNING {role}: {v[role]['collapse_warning']}")
    if v.get("mean_cosine") is not None:
        lines.append(f"mean teacher-student cosine: {v['mean_cosine']:.4f}")
    lines.append(f"(always answering 'different' scores {v['chance_accuracy']:.4f} accuracy on these pairs)")
    lines.append("")
    lines.append(f"student model: {summary['outputs']['export']}   summary: {summary['outputs']['summary']}")
    lines.append(
        f"evaluate it yourself: distill evaluate {summary['outputs']['export']} "
        f"--folders {summary['outputs']['heldout_data']} --teacher {summary['outputs']['teacher']}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The stages: each returns its record (seconds, images, images_per_second, output, ...).


def _data(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.synthetic import make_identity_dataset

    make_identity_dataset(p["train_data"], cfg.identities, cfg.per_identity, cfg.size, cfg.seed)
    make_identity_dataset(
        p["heldout_data"], cfg.heldout_identities, cfg.heldout_per_identity, cfg.size, cfg.seed, first=HELDOUT_FIRST
    )
    images = cfg.identities * cfg.per_identity + cfg.heldout_identities * cfg.heldout_per_identity
    return {"images": images, "output": os.path.dirname(p["train_data"])}


def _teacher(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.synthetic import train_synthetic_teacher

    if os.path.isfile(os.path.join(p["teacher"], "saved_model.pb")):
        # Published by rename, so whole: a run stopped before recording it still made it.
        return {"images": 0, "output": p["teacher"], "note": "found complete"}
    report = train_synthetic_teacher(
        p["train_data"], p["teacher"], embedding_dim=cfg.embedding_dim, epochs=cfg.teacher_epochs, seed=cfg.seed,
        size=cfg.size, verbose=2 if show_progress(cfg.progress) else 0,
    )
    return {
        "images": report.epochs * report.images,
        "images_per_second": report.images_per_second,
        "output": p["teacher"],
        "train_accuracy": report.train_accuracy,
        "params": report.params,
    }


def _listing(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.embed.listing import ListingConfig, build_listing

    info = build_listing(ListingConfig(sources=(p["train_data"],), out=p["listing"]))
    return {"images": info.rows, "output": p["listing"], "classes": info.num_classes}


def _embed(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    import ray

    from distill.embed.run import EmbedConfig, run_embed
    from distill.views import ViewSpec

    try:
        report = run_embed(
            EmbedConfig(
                listing=p["listing"], teacher=p["teacher"], out=p["shards"], shard_size=cfg.shard_size,
                views=ViewSpec(count=cfg.views), address=cfg.address, progress=cfg.progress,
            )
        )
    finally:
        ray.shutdown()  # frees the actors' CPUs and memory for training
    if not report.complete or report.errors:
        raise CheckFailed(
            f"embed finished {report.rows_done}/{report.rows_total} rows with {report.errors} errors; "
            f"see `distill status {p['shards']}` and rerun `distill demo` to resume"
        )
    return {
        "images": report.rows_this_run,
        "images_per_second": report.images_per_second or None,
        "output": p["shards"],
        "shards": report.shards_total,
    }


def _train(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.train.run import TrainConfig, run_train

    # The default recipe of `distill train`, scored on the held-out identities at every epoch end.
    steps = cfg.epochs * (cfg.identities * cfg.per_identity // cfg.batch_size)
    report = run_train(
        TrainConfig(
            shards=p["shards"], out=p["student"], epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            width=cfg.width, seed=cfg.seed, warmup_steps=max(1, steps // 20), val_folders=p["heldout_data"],
            progress=cfg.progress,
        )
    )
    return {
        "images": report.samples_trained,
        "images_per_second": report.images_per_sec or None,
        "output": p["student"],
        "steps": report.steps,
        "final": report.final,
        "resumed_from_step": report.resumed_from_step,
    }


def _export(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.evaluate.export import ExportConfig, run_export

    report = run_export(ExportConfig(student=p["student"], out=p["export"]))
    # No images/s: the export's few check images say nothing about speed.
    return {"images": 0, "output": p["export"], "check_rows": report.check_rows,
            "max_abs_diff": report.max_abs_diff, "step": report.step}


def _evaluate(cfg: DemoConfig, p: dict[str, str]) -> dict[str, Any]:
    from distill.evaluate.run import EvaluateConfig, run_evaluate

    r = run_evaluate(
        EvaluateConfig(
            model=p["export"], folders=p["heldout_data"], teacher=p["teacher"], out=p["evaluation"],
            progress=cfg.progress,
        )
    )
    images = 2 * r["targets"][0]["dataset"]["images"]  # student and teacher each embed every held-out image
    return {"images": images, "output": p["evaluation"], "results": r}


RUNNERS: dict[str, Callable[[DemoConfig, dict[str, str]], dict[str, Any]]] = {
    "data": _data,
    "teacher": _teacher,
    "listing": _listing,
    "embed": _embed,
    "train": _train,
    "export": _export,
    "evaluate": _evaluate,
}


# ---------------------------------------------------------------------------------------
# The run.


def _read_state(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    from distill.storage import write_file_atomic

    write_file_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def verification_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The held-out figures of ``distill evaluate``'s results (one set: the held-out folder)."""
    target = results["targets"][0]
    ds = target["dataset"]
    keys = ("auc", "accuracy_mean", "accuracy_std", "threshold_cosine", "collapse_warning")
    return {
        "identities": ds["identities"],
        "images": ds["images"],
        "pairs": ds["pairs"],
        "same_pairs": ds["same_pairs"],
        "chance_accuracy": ds["chance_accuracy"],
        "teacher": {k: target["models"]["teacher"][k] for k in keys},
        "student": {k: target["models"]["model"][k] for k in keys},
        "mean_cosine": target["mean_cosine"],
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary (also written to OUT/summary.json)."""
    from distill.outputs import DEMO, check_output

    out = os.path.abspath(cfg.out)
    cfg = replace(cfg, out=out)
    check_output(out, DEMO)
    os.makedirs(out, exist_ok=True)
    state = _read_state(out)
    check_same_run(state, cfg)
    from distill.startup import import_tensorflow_quietly

    import_tensorflow_quietly()  # (the options and the run are checked: now the slow part)
    if state is None:
        state = {"format": FORMAT, "config": identity(cfg), "stages": {}}
        _write_json(os.path.join(out, STATE), state)
    p = paths(out)
    # (an evaluation recorded before its results took one shape for any number of sets is redone)
    done = {s for s, r in state["stages"].items() if s != "evaluate" or "targets" in r.get("results", {})}
    actions = stage_actions(done)
    ran: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for name in STAGES:
        if actions[name] == "reuse":
            log.info("demo: %s already done, reusing %s", name, state["stages"][name].get("output"))
            ran[name] = {**state["stages"][name], "status": "reused"}
            continue
        log.info("demo: %s ...", name)
        t0 = time.perf_counter()
        record = RUNNERS[name](cfg, p)
        record["seconds"] = time.perf_counter() - t0
        if record.get("images_per_second") is None:
            record["images_per_second"] = per_second(record.get("images", 0), record["seconds"])
        state["stages"][name] = record
        _write_json(os.path.join(out, STATE), state)  # the stage counts as done from here on
        ran[name] = {**record, "status": "ran"}
    results = ran["evaluate"]["results"]
    summary = {
        "config": identity(cfg),
        "stages": {n: {k: v for k, v in r.items() if k != "results"} for n, r in ran.items()},
        "verification": verification_summary(results),
        "outputs": p,
        "seconds": time.perf_counter() - t_start,
    }
    _write_json(p["summary"], summary)
    return summary


# ---------------------------------------------------------------------------------------
# CLI.


def add_cli(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on synthetic faces: no downloads, no cluster (a few minutes on a CPU)",
        description="Make synthetic identities, train a small teacher, then listing -> embed -> train -> export -> "
        "evaluate on held-out identities, and print a summary. Rerun to resume; finished stages are reused.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster configuration (~1-2 minutes; for tests): "
                   "the --quick values below, under any option given")
    add_options(p, DemoConfig)
    p.set_defaults(func=_main)


def _main(args) -> int:
    names = [f.name for f in fields(DemoConfig)]
    cfg = resolve_config({n: getattr(args, n, None) for n in names}, args.quick)
    summary = run_demo(cfg)
    print(format_summary(summary))
    return 0
