"""``distill ledger``: look at a run's shard ledger, or rebuild it from the shard files.

The shard files are the truth (each footer names its run and shard); the ledger is a cache
of who works on what. ``rebuild`` restores a lost, flushed or damaged ledger (file or Redis)
from ``manifest.json`` (run id, shard count) and the files alone; a rerun of ``distill
embed`` then redoes only the shards without a valid file. ``show`` prints the counts and
the live leases. Neither needs Ray or TensorFlow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from distill.errors import BadOption
from distill.options import add_options, config_from_args, option
from distill.shards.format import ShardRecord
from distill.shards.ledger import LedgerState


@dataclass(frozen=True)
class LedgerConfig:
    """The options of ``distill ledger show`` (the CLI is derived from these fields)."""

    shards: str = option(help="shard directory with manifest.json (path, or s3:// gs:// URI)", positional=True, path=True, metavar="SHARDS")
    ledger: str = option("file", "'file' (next to the shards) or redis://[:PASSWORD@]HOST:PORT/DB, as given to "
                         "distill embed")


@dataclass(frozen=True)
class RebuildConfig(LedgerConfig):
    """The options of ``distill ledger rebuild``."""

    force: bool = option(False, "rebuild even while drivers hold live leases (they lose them)")
    progress: bool | None = option(None, "progress bar over the shard files (default: on a terminal only)")


ACTIONS = {
    "rebuild": (RebuildConfig, "restore the ledger's done set from the shard files; drops all leases"),
    "show": (LedgerConfig, "done / leased / pending counts and the live leases"),
}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ledger",
        help="show or rebuild a run's shard ledger",
        description="Show a run's shard ledger, or rebuild it from the shard files (the truth).",
    )
    sub = p.add_subparsers(dest="ledger_action", required=True, metavar="ACTION")
    for action, (cls, help_) in ACTIONS.items():
        q = sub.add_parser(action, help=help_, description=help_)
        add_options(q, cls)
        q.set_defaults(func=lambda a, cls=cls: run(config_from_args(cls, a)))


# ---------------------------------------------------------------- pure reports

def rebuild_summary(records: Iterable[ShardRecord], num_shards: int, where: str) -> str:
    recs = sorted(records, key=lambda r: r.k)
    rows = sum(r.rows for r in recs)
    errors = sum(len(r.errors) for r in recs)
    missing = num_shards - len(recs)
    lines = [f"rebuilt {where}: {len(recs)} of {num_shards} shards done ({rows:,} rows, {errors} row errors)"]
    if missing:
        todo = sorted(set(range(num_shards)) - {r.k for r in recs})
        lines.append(f"{missing} shards to do (first: {', '.join(map(str, todo[:10]))}); "
                     "rerun the same `distill embed` command to finish them")
    else:
        lines.append("every shard has a valid file")
    return "\n".join(lines)


def show_lines(state: LedgerState, now: float, where: str, max_leases: int = 20) -> list[str]:
    c = state.counts(now)
    lines = [f"{where}: {c['done']} done, {c['leased']} leased, {c['pending']} pending of {state.num_shards} shards"]
    live = sorted((lease for k, lease in state.leases.items() if k not in state.done and lease.expires > now),
                  key=lambda lease: lease.k)
    for lease in live[:max_leases]:
        lines.append(f"  shard {lease.k:>6}  {lease.owner}  expires in {lease.expires - now:.0f}s")
    if len(live) > max_leases:
        lines.append(f"  ... and {len(live) - max_leases} more leases")
    return lines


def live_owners(state: LedgerState, now: float) -> list[str]:
    return sorted({lease.owner for k, lease in state.leases.items() if k not in state.done and lease.expires > now})


# ---------------------------------------------------------------- the command

def records_with_progress(storage, run_id: str, num_shards: int, progress: bool | None) -> list[ShardRecord]:
    """``shards.reconcile.records_from_files`` with a progress bar: verifying reads every
    file whole (about 40 GB for emore), which takes minutes."""
    from tqdm import tqdm

    from distill.shards.reconcile import adopt_file, shard_files
    from distill.startup import show_progress

    records = []
    for k in tqdm(sorted(shard_files(storage, num_shards)), desc="verify shards", unit="shard",
                  disable=not show_progress(progress)):
        r = adopt_file(storage, run_id, k)
        if r is not None:
            records.append(r)
    return records


def run(cfg: LedgerConfig | RebuildConfig) -> int:
    from distill.shards.ledger import open_ledger
    from distill.shards.manifest import load_manifest
    from distill.storage import open_storage

    m = load_manifest(cfg.shards)
    run_id, num_shards = m["run_id"], int(m["num_shards"])
    ledger = open_ledger(cfg.ledger, cfg.shards, num_shards, run_id)
    try:
        if not isinstance(cfg, RebuildConfig):  # show
            print("\n".join(show_lines(ledger.snapshot(), time.time(), ledger.describe())))
            return 0
        owners = live_owners(ledger.snapshot(), time.time())
        if owners and not cfg.force:
            raise BadOption(
                f"{ledger.describe()} has live leases held by {', '.join(owners[:5])}; stop those drivers "
                "first (their shards would be done twice), or pass --force"
            )
        records = records_with_progress(open_storage(cfg.shards, create=False), run_id, num_shards, cfg.progress)
        ledger.rebuild(records)
        print(rebuild_summary(records, num_shards, ledger.describe()))
        return 0
    finally:
        ledger.close()
