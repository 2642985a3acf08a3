"""``distill status``: how far a teacher pass is, from the manifest and the ledger.

Reads only small files (and the ledger); never Ray or TensorFlow, so it answers at once,
also while ``embed`` runs. The numbers come from a pure ``summarize`` for testing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

from distill.options import add_options, config_from_args, option
from distill.shards.ledger import LedgerState
from distill.shards.plan import shard_at, shard_name

RECENT_SECONDS = 300.0


@dataclass(frozen=True)
class StatusConfig:
    """The options of ``distill status`` (the CLI is derived from these fields)."""

    shards: str = option(help="shard directory given to `distill embed --out`", positional=True, path=True, metavar="SHARDS")
    ledger: str = option("file", "the ledger embed used: 'file' or redis://...")
    errors: bool = option(False, "list every unreadable row with its reason")
    as_json: bool = option(False, "print JSON instead of text", flag="--json")
    verify: bool = option(False, "read every done shard and check its size and sha256 against its record; exit 1 "
                          "when one does not match")


def summarize(manifest: Mapping[str, Any], state: LedgerState, now: float) -> dict[str, Any]:
    """Counts, rates and ETA. Pure: the clock comes in as ``now``."""
    total_rows = manifest["rows"]
    shard_size = manifest["shard_size"]
    counts = state.counts(now)
    done = list(state.done.values())
    rows_done = sum(r.rows for r in done)
    errors = sum(len(r.errors) for r in done)
    processed = rows_done + errors
    spans = [(r.finished_at - r.seconds, r.finished_at, r.rows + len(r.errors)) for r in done if r.finished_at]
    overall = recent = None
    if spans:
        start = min(s for s, _, _ in spans)
        end = max(e for _, e, _ in spans)
        overall = processed / (end - start) if end > start else None
        window = [(s, e, n) for s, e, n in spans if e >= now - RECENT_SECONDS]
        if window:
            w_start = max(min(s for s, _, _ in window), now - RECENT_SECONDS)
            recent = sum(n for _, _, n in window) / max(now - w_start, 1e-9)
    rate = recent or overall
    remaining = total_rows - processed
    leases = sorted(
        ({"shard": shard_name(k), "owner": lease.owner, "expires_in": round(lease.expires - now, 1)}
         for k, lease in state.leases.items() if k not in state.done and lease.expires > now),
        key=lambda d: d["shard"],
    )
    return {
        "out": manifest.get("out"),
        "run_id": manifest["run_id"],
        "rows_total": total_rows,
        "rows_unlabelled": int(manifest.get("unlabelled") or 0),  # listing rows of no identity (label -1)
        "rows_done": rows_done,
        "errors": errors,
        "shards_total": state.num_shards,
        **{f"shards_{k}": v for k, v in counts.items()},
        "complete": counts["done"] == state.num_shards,
        "images_per_second_recent": recent,
        "images_per_second_overall": overall,
        "eta_seconds": remaining / rate if rate and remaining > 0 and not counts["done"] == state.num_shards else None,
        "leases": leases,
        "pending_rows": sum(shard_at(k, total_rows, shard_size).rows for k in range(state.num_shards) if k not in state.done),
    }


def format_status(s: Mapping[str, Any], manifest: Mapping[str, Any], error_rows: list | None = None) -> str:
    pct = 100.0 * (s["rows_done"] + s["errors"]) / max(1, s["rows_total"])
    if manifest.get("kind") == "align":
        what = (f"align run {s['run_id']}: {manifest['rows']} photos, {manifest['size']}x{manifest['size']} crops by "
                f"{manifest['detector']}" + (", every face" if manifest.get("all_faces") else ", the main face"))
        done = f"rows:   {s['rows_done']} faces written, {s['errors']} photos without one, of {s['rows_total']} photos"
    else:
        what = (f"run {s['run_id']}: {manifest['rows']} rows ({_labelled(manifest)}), {manifest['num_classes']} classes, "
                f"teacher dim {manifest['embedding_dim']} ({'flip on' if manifest['flip'] else 'flip off'}, "
                f"{manifest['dtype']})")
        done = f"rows:   {s['rows_done']} embedded, {s['errors']} unreadable, of {s['rows_total']} ({pct:.1f}%)"
    lines = [
        what,
        f"shards: {s['shards_done']} done, {s['shards_leased']} leased, {s['shards_pending']} pending of {s['shards_total']}"
        + ("  [complete]" if s["complete"] else ""),
        done,
    ]
    views = manifest.get("views")
    if views:
        lines.append(f"views:  {views['count']} augmented teacher views per image (seed {views['seed']})")
    norm = manifest.get("teacher_norm")
    if norm:
        # What the targets look like: raw norms far from 1 are why the distillation compares directions.
        lines.append(f"targets: raw teacher norm {norm['mean']:.2f} +- {norm['std']:.2f} (min {norm['min']:.2f}, "
                     f"max {norm['max']:.2f}, {norm['rows']} rows)")
    rate = s["images_per_second_recent"] or s["images_per_second_overall"]
    if rate:
        eta = f", ETA {_hms(s['eta_seconds'])}" if s["eta_seconds"] else ""
        which = "last 5 min" if s["images_per_second_recent"] else "overall"
        lines.append(f"speed:  {rate:.1f} img/s ({which}){eta}")
    for lease in s["leases"][:10]:
        lines.append(f"leased: {lease['shard']} by {lease['owner']} (expires in {lease['expires_in']:.0f}s)")
    if len(s["leases"]) > 10:
        lines.append(f"leased: ... and {len(s['leases']) - 10} more")
    if error_rows is not None:
        for e in error_rows:
            lines.append(f"error:  index {e['index']} {e['path']}: {e['reason']}")
    elif s["errors"]:
        lines.append("        (--errors lists the unreadable rows)")
    return "\n".join(lines)


def _labelled(manifest: Mapping[str, Any]) -> str:
    """Labelled and unlabelled listing rows: the classifier terms train on the labelled ones only."""
    unlabelled = int(manifest.get("unlabelled") or 0)
    return f"{manifest['rows'] - unlabelled} labelled, {unlabelled} unlabelled"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_status(cfg: StatusConfig) -> dict[str, Any]:
    from distill.shards.ledger import open_ledger
    from distill.shards.manifest import load_manifest

    manifest = load_manifest(cfg.shards)
    ledger = open_ledger(cfg.ledger, cfg.shards, manifest["num_shards"], manifest["run_id"])
    try:
        state = ledger.snapshot()
    finally:
        ledger.close()
    s = summarize(manifest, state, time.time())
    s["out"] = cfg.shards
    if cfg.verify:
        s["verify"] = _verify(cfg.shards, state)
    if cfg.errors:
        s["error_rows"] = [
            {"shard": r.k, "index": e.index, "path": e.path, "reason": e.reason}
            for r in sorted(state.done.values(), key=lambda r: r.k) for e in r.errors
        ]
    return s


def _verify(location: str, state: LedgerState) -> dict[str, Any]:
    from tqdm import tqdm

    from distill.shards.verify import Expected, check
    from distill.storage import open_storage

    expected = [Expected(shard_name(k), r.bytes, r.sha256) for k, r in sorted(state.done.items())]
    total = sum(e.bytes for e in expected)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", dynamic_ncols=True, leave=False) as bar:
        bad, _ = check(open_storage(location, create=False), expected, checksum=True, progress=bar.update)
    return {"shards": len(expected), "bytes": total, "mismatches": [{"name": m.name, "why": m.why} for m in bad]}


def format_verify(v: Mapping[str, Any]) -> str:
    if not v["mismatches"]:
        return f"verify: {v['shards']} done shards ({v['bytes'] / 1e6:,.1f} MB) match their records (size, sha256)"
    lines = [f"verify: {len(v['mismatches'])} of {v['shards']} done shards do not match their records:"]
    lines += [f"  {m['name']}: {m['why']}" for m in v["mismatches"]]
    lines.append("  rerun the same `distill embed` command with --verify: it removes and re-embeds them")
    return "\n".join(lines)


def add_cli(sub) -> None:
    p = sub.add_parser("status", help="progress of a teacher pass: shards, rows, errors, speed",
                       description="Show shards done/leased/pending, rows, unreadable rows and throughput.")
    add_options(p, StatusConfig)
    p.set_defaults(func=_main)


def _main(a) -> int:
    from distill.shards.manifest import load_manifest

    cfg = config_from_args(StatusConfig, a)
    s = run_status(cfg)
    if cfg.as_json:
        print(json.dumps(s, indent=1))
    else:
        print(format_status(s, load_manifest(cfg.shards), s.get("error_rows")))
        if cfg.verify:
            print(format_verify(s["verify"]))
    return 1 if cfg.verify and s["verify"]["mismatches"] else 0
