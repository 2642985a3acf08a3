"""``distill export-npy``: the shard embeddings in the layout of the original notes.

Per shard k: ``<k>_emb.npy`` (float32 [rows, D]) and ``<k>_img.foo`` (one image path per
line, in row order; ``rec:<index>`` for rows that came from a .rec). Streams one shard at a
time, reading only the ``index``, ``path`` and ``embedding`` columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportNpyConfig:
    shards: str
    out: str


def run_export_npy(cfg: ExportNpyConfig) -> int:
    import numpy as np
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from distill.shards.manifest import load_manifest
    from distill.shards.storage import open_storage

    manifest = load_manifest(cfg.shards)
    storage = open_storage(cfg.shards, create=False)
    os.makedirs(cfg.out, exist_ok=True)
    dim = manifest["embedding_dim"]
    rows = 0
    for s in tqdm(manifest["shards"], desc="export-npy", unit="shard"):
        with storage.open_input(s["name"]) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("index", "path", "embedding") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols)
        emb = t.column("embedding").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, dim)
        if "path" in cols:
            names = t.column("path").to_pylist()
        else:
            names = [f"rec:{i}" for i in t.column("index").to_pylist()]
        np.save(os.path.join(cfg.out, f"{s['k']}_emb.npy"), emb)
        with open(os.path.join(cfg.out, f"{s['k']}_img.foo"), "w") as f:
            f.writelines(f"{n}\n" for n in names)
        rows += len(names)
    return rows


def add_cli(sub) -> None:
    p = sub.add_parser("export-npy", help="write <k>_emb.npy + <k>_img.foo per shard (the original notes' layout)")
    p.add_argument("shards", help="shard directory made by `distill embed`")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=lambda a: print(f"export-npy: {run_export_npy(ExportNpyConfig(a.shards, a.out))} rows -> {a.out}"))
