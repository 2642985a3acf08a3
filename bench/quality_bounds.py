"""What 8 training people allow: reference points for the student on people it never saw.

The quality target asks a student trained on 8 glint12 people for teacher-student cosine >=
0.5 and ROC-AUC >= 0.85 on 4 others. This bench asks what *any* model trained on those 8
people reaches, on the same split (``distill train --val-split 0.34 --val-seed 0``), with
the real mobilefacenet teacher:

1. **Where the held-out people lie in the teacher's space**: the cosine of their (unit)
   teacher embeddings with the nearest training person's mean, and the largest cosine an
   output confined to the top-k principal directions of the training targets can reach.
2. **Closed-form regressors** from pixels to the teacher's unit embedding (ridge on 56x56
   colour pixels; on HOG features), trained on the 8 people (plus their mirrors), scored on
   the 4 held-out people and on ORL: cosine and ROC-AUC, the student's two figures.
3. **The identity curve**: the pixel ridge trained on 1, 2, 4, 6, 8 of the training people at
   an equal 500 images (seeded draws of people holding at least that many, averaged), scored
   on the same held-out people: what one more doubling of the people is worth.

Everything runs in this process in a few minutes (the teacher through ``distill.teacher``, as
the embed actor runs it; NumPy for the rest).

    python bench/quality_bounds.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GLINT12, MOBILEFACENET, ORL, add_idle_args, loadavg, print_header, settle, table  # noqa: E402
from bench.quality import VAL_SEED, VAL_SPLIT  # noqa: E402  (the split the quality table uses)

CURVE_IMAGES = 500  # the three largest training people hold 558-805 images each


def load_people(root: Path, size: int = 112) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [n, size, size, 3] images (converted and resized as ``distill embed`` does), labels, names."""
    from distill.images import decode_rgb, fit

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for k, name in enumerate(names):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                images.append(fit(decode_rgb(f.read_bytes()), size, size))
                labels.append(k)
    return np.stack(images), np.asarray(labels, np.int64), names


def teacher_embeddings(images: np.ndarray, batch: int = 64) -> np.ndarray:
    from distill.teacher import Preprocessing, Teacher, inspect_teacher

    teacher = Teacher(inspect_teacher(str(MOBILEFACENET)), Preprocessing())
    return np.concatenate([teacher(images[i:i + batch]) for i in range(0, len(images), batch)])


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def verification(emb: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC over all pairs, as ``distill evaluate`` scores a folder tree."""
    from distill.metrics import all_pairs, roc_auc

    e = unit(emb)
    i, j, same = all_pairs(labels)
    return roc_auc(np.sum(e[i] * e[j], axis=1), same)


def pixels(images: np.ndarray) -> np.ndarray:
    """56x56 colour (2x2 means), in [0, 1]: a coarse face, the ridge's input."""
    n, h, w, c = images.shape
    return (images.astype(np.float32).reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4)) / 255).reshape(n, -1)


def hog(images: np.ndarray) -> np.ndarray:
    from skimage.feature import hog as _hog

    return np.stack([_hog(x.mean(-1), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2)) for x in images]
                    ).astype(np.float32)


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    mu = x.mean(0)
    a = x - mu
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return lambda z: (z - mu) @ w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lam", type=float, default=100.0, help="ridge penalty (features are in [0, 1] / HOG units)")
    add_idle_args(ap)
    a = ap.parse_args()
    print_header("What 8 training people allow (glint12 split by identity, ORL)")
    from distill.train.validate import heldout_classes

    print(f"load at the start: {settle(a, 'bounds').label()}\n")
    t0 = time.perf_counter()
    images, labels, names = load_people(GLINT12)
    orl_images, orl_labels, _ = load_people(ORL)
    held_ids = heldout_classes(np.bincount(labels), VAL_SPLIT, VAL_SEED)
    held = np.isin(labels, held_ids)
    train_ids = np.unique(labels[~held])
    teacher = unit(teacher_embeddings(images))
    teacher_flip = unit(teacher_embeddings(images[:, :, ::-1]))
    orl_teacher = unit(teacher_embeddings(orl_images))
    print(f"held-out people: {', '.join(names[k] for k in held_ids)} ({held.sum()} images); training: "
          f"{len(train_ids)} people ({(~held).sum()} images); teacher pass {time.perf_counter() - t0:.0f} s\n")

    # 1. Where the held-out people lie.
    tr, te = teacher[~held], teacher[held]
    means = unit(np.stack([tr[labels[~held] == k].mean(0) for k in train_ids]))
    own = unit(np.stack([teacher[labels == k].mean(0) for k in range(len(names))]))
    _, s, vt = np.linalg.svd(tr, full_matrices=False)
    rows = [["teacher itself (ROC-AUC)", f"{verification(te, labels[held]):.3f}", f"{verification(orl_teacher, orl_labels):.3f}"],
            ["cos of a training image to its own person's mean", f"{np.mean(np.sum(tr * own[labels[~held]], 1)):.3f}", ""],
            ["cos of a held-out image to the nearest training person's mean", f"{np.mean((te @ means.T).max(1)):.3f}",
             f"{np.mean((orl_teacher @ means.T).max(1)):.3f}"]]
    for k in (8, 16, 32, 64):
        p = vt[:k]
        rows.append([f"largest cos within the top {k} directions of the training targets "
                     f"({(s[:k] ** 2).sum() / (s ** 2).sum():.0%} of their energy)",
                     f"{np.mean(np.linalg.norm(te @ p.T, axis=1)):.3f}", f"{np.mean(np.linalg.norm(orl_teacher @ p.T, axis=1)):.3f}"])
    print(table(["where the held-out people lie in the teacher's space", "glint12 held-out", "ORL"], rows))

    # 2. Closed-form regressors trained on the 8 people (and their mirrors).
    rows = []
    mirrored = images[~held][:, :, ::-1]
    for name, feat in (("ridge on 56x56 colour pixels", pixels), ("ridge on HOG (9 orientations, 8x8 cells)", hog)):
        x = np.concatenate([feat(images[~held]), feat(mirrored)])
        f = ridge(x, np.concatenate([tr, teacher_flip[~held]]), a.lam)
        p, po = f(feat(images[held])), f(feat(orl_images))
        rows.append([name, f"{np.mean(np.sum(unit(p) * te, 1)):.3f}", f"{verification(p, labels[held]):.3f}",
                     f"{np.mean(np.sum(unit(po) * orl_teacher, 1)):.3f}", f"{verification(po, orl_labels):.3f}"])
    print(table(["trained on the 8 people", "held-out cos", "held-out AUC", "ORL cos", "ORL AUC"], rows))

    # 3. The identity curve (pixel ridge, equal images).
    rng = np.random.default_rng(0)
    x_all, rows = pixels(images), []
    for k in (1, 2, 4, 6, 8):
        got = []
        for _ in range(6 if k < len(train_ids) else 1):
            pool = np.zeros(0, np.int64)
            while len(pool) < CURVE_IMAGES:  # a draw of people with too few images between them is drawn again
                ids = rng.choice(train_ids, k, replace=False)
                pool = np.flatnonzero(np.isin(labels, ids))
            pick = rng.choice(pool, CURVE_IMAGES, replace=False)
            p = ridge(x_all[pick], teacher[pick], a.lam)(x_all[held])
            got.append((np.mean(np.sum(unit(p) * te, 1)), verification(p, labels[held])))
        cos, auc = np.mean(got, axis=0)
        rows.append([k, f"{cos:.3f}", f"{auc:.3f}"])
    print(table([f"training people ({CURVE_IMAGES} images)", "held-out cos", "held-out AUC"], rows))
    print(f"\nload average at the end: {loadavg()}; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
