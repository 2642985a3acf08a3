"""Tiny shard directories for the trainer's tests, written with the real shard format.

Images are class-coloured blobs with noise; the "teacher" embedding is a fixed random
projection of the 4x4-pooled pixels, computed on the mirrored image for ``embedding_flip``,
so a student can learn it and a swapped flip target is detectable.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def toy_images(n: int, classes: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    colours = rng.integers(30, 226, size=(classes, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        c = labels[i]
        cx, cy = (c * 0.37) % 1, (c * 0.61) % 1  # each class's blob sits somewhere else
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 8)[..., None]
        img = 40 + blob * colours[c] + rng.normal(0, 12, (size, size, 3))
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
    return imgs, labels


def toy_teacher(imgs: np.ndarray, dim: int, seed: int = 1) -> np.ndarray:
    n, s = imgs.shape[0], imgs.shape[1]
    pooled = imgs.reshape(n, 4, s // 4, 4, s // 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    proj = np.random.default_rng(seed).normal(0, 1, (pooled.shape[1], dim)) / np.sqrt(pooled.shape[1])
    return ((pooled - 127.5) / 128 @ proj).astype(np.float32)


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_toy_shards(
    out: Path, *, rows: int = 96, shard_size: int = 32, classes: int = 4, size: int = 32, dim: int = 8,
    flip: bool = True, images: bool = True, dtype: str = "float32", drop_shards: int = 0, seed: int = 0,
    unlabelled: float = 0.0,
) -> Path:
    """A complete (or, with ``drop_shards``, incomplete) shard directory. Index = listing row.
    ``unlabelled`` (a multiple of 1/4): that share of the rows, every 4th first, has label -1
    (no known identity); with 1.0 the shards hold no classes at all."""
    from distill.shards.format import ShardRecord, encode_shard, sha256, shard_schema
    from distill.shards.manifest import build_manifest, run_id, write_manifest
    from distill.shards.plan import plan_shards
    from distill.storage import open_storage

    imgs, labels = toy_images(rows, classes, size, seed)
    labels = np.where(np.arange(rows) % 4 < round(unlabelled * 4), -1, labels)
    classes = 0 if unlabelled >= 1 else classes
    emb = toy_teacher(imgs, dim)
    emb_flip = toy_teacher(imgs[:, :, ::-1], dim)
    identity = {
        "listing_fingerprint": f"toy-{rows}-{classes}-{size}-{seed}-{unlabelled}", "rows": rows, "num_classes": classes,
        "unlabelled": int((labels < 0).sum()),
        "teacher_fingerprint": "toy", "input_size": [size, size],
        "preprocessing": {"pixel_mean": 127.5, "pixel_scale": 128.0, "channel_order": "RGB"},
        "embedding_dim": dim, "dtype": dtype, "flip": flip, "images": images, "shard_size": shard_size,
        "batch_size": 32,
    }
    storage = open_storage(str(out))
    schema = shard_schema(dim, dtype, flip, images, paths=False)
    plan = plan_shards(rows, shard_size)
    records = []
    for sh in plan[: len(plan) - drop_shards]:
        sl = slice(sh.start, sh.stop)
        data = encode_shard(
            schema, index=np.arange(sh.start, sh.stop), label=labels[sl], embedding=emb[sl],
            embedding_flip=emb_flip[sl] if flip else None,
            image=[png(im) for im in imgs[sl]] if images else None,
            run_id=run_id(identity), k=sh.k, start=sh.start, stop=sh.stop,
        )
        storage.write_atomic(sh.name, data)
        records.append(ShardRecord(k=sh.k, rows=sh.rows, bytes=len(data), sha256=sha256(data)))
    write_manifest(storage, build_manifest(identity, records, len(plan)))
    return out
