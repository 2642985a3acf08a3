"""``distill export-npy``: the shard embeddings in the layout of the original notes.

Per shard k: ``<k>_emb.npy`` (float32 [rows, D]) and ``<k>_img.foo`` (one image path per
line, in row order; ``rec:<index>`` for rows that came from a .rec). Streams one shard at a
time, reading only the ``index``, ``path`` and ``embedding`` columns. A run that is not
complete is refused (its missing shards would be missing files), unless ``--partial`` asks
for the done shards and says how many it wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distill.errors import BadInput
from distill.options import add_options, config_from_args, option
from distill.startup import show_progress


@dataclass(frozen=True)
class ExportNpyConfig:
    """The options of ``distill export-npy`` (the CLI is derived from these fields)."""

    shards: str = option(help="shard directory made by `distill embed`", positional=True, path=True, metavar="SHARDS")
    out: str = option(help="output directory", required=True, path=True, metavar="DIR")
    partial: bool = option(False, "export the done shards of an unfinished run (default: refuse it)")
    progress: bool | None = option(None, "progress bars (default: on a terminal only, so logs hold no bar frames)")


@dataclass(frozen=True)
class ExportNpyReport:
    rows: int
    shards: int
    of_shards: int


def run_export_npy(cfg: ExportNpyConfig) -> ExportNpyReport:
    import numpy as np
    from tqdm import tqdm

    from distill.outputs import NPY, check_output
    from distill.shards.manifest import load_manifest
    from distill.shards.reader import ShardReader, ShardSet, embeddings
    from distill.storage import make_dir

    check_output(cfg.out, NPY, {"SHARDS": cfg.shards})
    manifest = load_manifest(cfg.shards)
    shards = ShardSet.from_manifest(cfg.shards, manifest)
    total = int(manifest["num_shards"])
    if not shards.complete and not cfg.partial:
        raise BadInput(f"the run in {cfg.shards} is not complete: {len(shards.names)} of {total} shards are done. "
                       "Finish it (rerun its `distill embed` command), or pass --partial to export the done ones")
    make_dir(cfg.out)
    reader = ShardReader(shards)
    ks = [s["k"] for s in sorted(manifest["shards"], key=lambda s: s["k"])]
    rows = 0
    for pos in tqdm(range(len(ks)), desc="export-npy", unit="shard", disable=not show_progress(cfg.progress)):
        with reader.open(pos) as f:
            cols = [c for c in ("index", "path", "embedding") if c in f.columns]
            t = f.read(0, f.rows, cols)
        emb = embeddings(t.column("embedding"), shards.embedding_dim)
        index = t.column("index").to_pylist()
        paths = t.column("path").to_pylist() if "path" in cols else [None] * len(index)
        names = [p if p is not None else f"rec:{i}" for p, i in zip(paths, index)]
        np.save(os.path.join(cfg.out, f"{ks[pos]}_emb.npy"), emb)
        with open(os.path.join(cfg.out, f"{ks[pos]}_img.foo"), "w") as f:
            f.writelines(f"{n}\n" for n in names)
        rows += len(names)
    return ExportNpyReport(rows, len(ks), total)


def add_cli(sub) -> None:
    p = sub.add_parser("export-npy", help="write <k>_emb.npy + <k>_img.foo per shard (the original notes' layout)")
    add_options(p, ExportNpyConfig)
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = config_from_args(ExportNpyConfig, args)
    r = run_export_npy(cfg)
    partial = f" (partial: {r.shards} of {r.of_shards} shards)" if r.shards < r.of_shards else ""
    print(f"export-npy: {r.rows} rows in {r.shards} shards{partial} -> {cfg.out}")
    return 0
