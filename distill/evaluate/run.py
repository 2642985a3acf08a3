"""Evaluate: how well a model (student or teacher) verifies faces, and how close it is to the teacher.

Owns ``distill evaluate``. It takes an exported student (uint8 RGB in, L2-normalised
embeddings out, preprocessing inside) or a teacher (float32 in, preprocessed by
``distill.teacher.Preprocessing``), either a SavedModel or an ONNX file; the input's dtype,
read from the file, tells them apart. Two kinds of data:

- an identity folder tree (one folder per person): over all distinct same/different pairs
  (a seeded, balanced sample of distinct pairs for big folders) of cosine similarities,
  ROC-AUC, TAR at FAR, and accuracy by 10 folds of the shuffled pairs as insightface does
  (threshold chosen on 9, scored on the 10th); the mean teacher-student cosine when
  ``--teacher`` is given;
- an insightface verification ``.bin`` (a pickle, read by a restricted unpickler): the
  standard protocol with flip test, squared-L2 distance, 10 contiguous folds.

It hands on one results dict whatever the sets, ``{"targets": [one per set], ...}`` (printed
as tables, saved as JSON with ``--out``); the demo puts it in its summary. Everything that
decides a number (pairs, AUC, accuracy, folds, which TAR is supported, a collapsed model) is
a pure numpy function of ``distill.metrics``, tested without TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from distill.errors import BadInput, BadOption, DistillError, IncompatibleRun
from distill.evaluate.gates import Gate, judge, parse_gates
from distill.heldout import check_readable, load_bin, scan_folders
from distill.metrics import (
    BIN_FOLDS,
    FARS,
    FOLDS,
    MIN_FALSE_ACCEPTS,
    TAR_RULE,
    all_pairs,
    best_accuracy,
    best_distance_threshold,
    collapse_warning,
    far_key,
    far_supported,
    fold_accuracy,
    kfold_accuracy,
    l2_normalise,
    mean_cosine,
    min_impostor_pairs,
    pair_counts,
    roc_auc,
    roc_curve,
    sample_pairs,
    tar_table,
)
from distill.options import add_options, config_from_args, option
from distill.startup import show_progress
from distill.storage import local_path
from distill.teacher import CHANNEL_ORDERS, Preprocessing

log = logging.getLogger(__name__)

# All pairs of 2,000 images is ~2M scores: still one matrix product. Above that, sample.
ALL_PAIRS_MAX_IMAGES = 2000
DEFAULT_SAMPLED_PAIRS = 20000


@dataclass(frozen=True)
class EvaluateConfig:
    """The options of ``distill evaluate`` (the CLI is derived from these fields)."""

    model: str = option(help="`distill export` output (RUN/export, or its student.onnx; uint8 input) or a teacher "
                             "(SavedModel or ONNX; float32 input); a local path or an object-store URI",
                        positional=True, path=True, metavar="MODEL")
    folders: str | None = option(None, "identity folder tree: one sub-folder of images per person (several: "
                                 "comma-separated)", metavar="DIR[,DIR...]", group="data (one or more; one model load)", path="list")
    bin: str | None = option(None, "insightface verification set (lfw.bin,cfp_fp.bin,agedb_30.bin: several, "
                             "comma-separated; paths or object-store URIs)", metavar="FILE[,FILE...]", group="data (one or more; one model load)", path="list")
    teacher: str | None = option(None, "teacher (SavedModel directory or ONNX file): also evaluate it and the "
                                 "teacher-student cosine", metavar="DIR|MODEL.onnx", path=True)
    pairs: int | None = option(None, f"sample this many distinct pairs (half same, half different; all of a kind "
                               f"when fewer exist); default: all pairs up to "
                               f"{ALL_PAIRS_MAX_IMAGES} images, else {DEFAULT_SAMPLED_PAIRS}", metavar="N")
    seed: int = option(0, "seed of the pair sample and of the shuffle the accuracy's folds are cut from")
    out: str | None = option(None, "write the results as JSON here (a local path or an object-store URI)",
                             metavar="FILE", path=True)
    json: bool = option(False, "print the results as JSON on stdout instead of the tables")
    plot: str | None = option(None, "draw the ROC curves (TAR against FAR, log) of the model and the teacher on every "
                              "set into this PNG", metavar="FILE.png", path=True)
    batch_size: int = option(64, "images per model call")
    flip_test: bool = option(False, "folder mode: the flip test, each image's embedding plus its mirror's (.bin "
                             "always does; --flip is the old name)", aliases=("flip",))
    # How float32 (teacher) models are fed. None: as the shard manifest recorded it (``shards``,
    # or the shards an exported MODEL was trained on, when they were embedded by ``teacher``),
    # else Preprocessing's defaults. Given and different from the record: an error.
    pixel_mean: float | None = option(None, "float32 (teacher) models: x' = (x - mean) / scale; default: as the shards "
                                      "recorded (--shards, or those an exported MODEL was trained on), else 127.5",
                                      group="teacher input conventions")
    pixel_scale: float | None = option(None, "default: as recorded, else 128", group="teacher input conventions")
    channel_order: str | None = option(None, "default: as recorded, else RGB", choices=CHANNEL_ORDERS,
                                       group="teacher input conventions")
    signature: str = option("serving_default", "signature of MODEL", group="teacher input conventions")
    shards: str | None = option(None, "the teacher's shard directory (RUN/shards): feed the teacher as its manifest "
                                "recorded (preprocessing, signature, output); --teacher defaults to its teacher",
                                metavar="DIR", group="teacher input conventions", path=True)
    min_tar: str | None = option(None, "quality gate: exit 1 unless the model's TAR at FAR reaches TAR on every set "
                                 "(e.g. 1e-3=0.6; several: comma-separated; a FAR the set's impostor pairs cannot "
                                 "support fails)", metavar="FAR=TAR[,...]", group="quality gates")
    max_tar_gap: str | None = option(None, "quality gate: exit 1 when the teacher's TAR at FAR exceeds the model's by "
                                     "more than GAP on any set (needs --teacher)", metavar="FAR=GAP[,...]",
                                     group="quality gates")
    progress: bool | None = option(None, "progress bars (default: on a terminal only, so logs hold no bar frames)")

    def __post_init__(self) -> None:
        if self.max_tar_gap and not (self.teacher or self.shards):
            raise BadOption("--max-tar-gap compares the model with its teacher: pass --teacher (or --shards)")
        if not self.gates and (self.min_tar or self.max_tar_gap):  # (parsing refuses a malformed gate)
            raise BadOption("--min-tar / --max-tar-gap: no gate given; expected FAR=VALUE, e.g. 1e-3=0.6")
        if not self.targets:
            raise BadOption("pass --folders DIR (identity folder tree) and/or --bin FILE (insightface .bin); each takes "
                            "several, comma-separated")
        if len(set(self.targets)) < len(self.targets):
            raise BadOption("a verification set is given twice: " + ", ".join(p for _, p in self.targets))
        if self.plot is not None:
            local_path(self.plot, "--plot")
            if not self.plot.lower().endswith(".png"):
                raise BadOption(f"--plot {self.plot}: the ROC curves are drawn as a PNG; name the file FILE.png")
        if self.pairs is not None and self.pairs < 2:
            raise BadOption(f"--pairs must be at least 2 (half same, half different), got {self.pairs}")
        if self.batch_size < 1:
            raise BadOption(f"--batch-size must be positive, got {self.batch_size}")
        if self.seed < 0:
            raise BadOption(f"--seed must be >= 0, got {self.seed}")
        if self.pixel_scale == 0:
            raise BadOption("--pixel-scale divides the pixels: it cannot be 0")

    @property
    def gates(self) -> tuple[Gate, ...]:
        return parse_gates(self.min_tar, "min_tar") + parse_gates(self.max_tar_gap, "max_tar_gap")

    @property
    def targets(self) -> tuple[tuple[str, str], ...]:
        """(kind, path) of every verification set, in the order given: folders, then .bin files."""
        split = lambda text: [p.strip() for p in (text or "").split(",") if p.strip()]  # noqa: E731
        return tuple(("folders", p) for p in split(self.folders)) + tuple(("bin", p) for p in split(self.bin))


# ---------------------------------------------------------------------------------------
# Models: exported students (uint8 in) and teachers (float32 in), one call shape.


def resolve_model_dir(path: str) -> str:
    """An ONNX file, a SavedModel directory, or an export directory holding one in ``saved_model/``."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    inner = os.path.join(path, "saved_model")
    if os.path.isfile(os.path.join(inner, "saved_model.pb")):
        return inner
    raise FileNotFoundError(
        f"{path} is neither a TensorFlow SavedModel (no saved_model.pb, nor saved_model/saved_model.pb) nor an ONNX "
        "file; pass a `distill export` output directory (or its student.onnx) or a teacher"
    )


PREPROCESSING_OPTIONS = ("pixel_mean", "pixel_scale", "channel_order")


@dataclass(frozen=True)
class TeacherRecord:
    """How a shard run fed its teacher, from its ``manifest.json``."""

    manifest: str
    teacher: str
    fingerprint: str
    preprocessing: Preprocessing
    signature: str
    output: str

    @classmethod
    def read(cls, shards: str) -> "TeacherRecord":
        from distill.shards.manifest import load_manifest

        m = load_manifest(shards)
        sig = m["teacher_signature"]
        return cls(os.path.join(shards, "manifest.json"), m["teacher"], m["teacher_fingerprint"],
                   Preprocessing(**m["preprocessing"]), sig.get("name", ""), sig["output"])


def trained_on(model: str) -> str | None:
    """The shard directory an exported student was trained on (its checkpoint's config), if known."""
    # (export/saved_model and export/student.onnx both sit beside export/checkpoint)
    path = os.path.join(os.path.dirname(os.path.abspath(resolve_model_dir(model))), "checkpoint", "config.json")
    try:
        with open(path) as f:
            return json.load(f)["train"]["shards"]
    except (OSError, ValueError, KeyError):
        return None


def teacher_record(cfg: EvaluateConfig) -> tuple[TeacherRecord | None, str | None]:
    """(the record that fixes how the teacher is fed, the teacher to evaluate).

    ``--shards``: that run's record; ``--teacher`` must be the teacher it embedded with (or
    is taken from it). Otherwise, when MODEL is an export whose training shards are readable
    and were embedded by ``--teacher`` (same fingerprint): their record. Else none."""
    from distill.teacher import fetch_teacher, teacher_fingerprint

    if cfg.shards:
        record = TeacherRecord.read(cfg.shards)
        teacher = cfg.teacher or record.teacher
        if teacher_fingerprint(fetch_teacher(teacher)) != record.fingerprint:
            raise IncompatibleRun(
                f"--teacher {teacher} is not the teacher that embedded {cfg.shards} ({record.teacher}, fingerprint "
                f"{record.fingerprint[:12]}); pass that teacher, or drop --shards and give its preprocessing options")
        return record, teacher
    if not cfg.teacher:
        return None, None
    shards = trained_on(cfg.model)
    if shards is None:
        return None, cfg.teacher
    try:
        record = TeacherRecord.read(shards)
    except (DistillError, OSError, KeyError) as e:
        log.debug("no teacher record from %s (%s)", shards, e)
        return None, cfg.teacher
    return (record if teacher_fingerprint(fetch_teacher(cfg.teacher)) == record.fingerprint else None), cfg.teacher


def choose_preprocessing(record: TeacherRecord | None, given: dict[str, Any]) -> Preprocessing:
    """The recorded preprocessing, refusing given options that differ from it; without a
    record, the given options over the defaults. Pure."""
    given = {k: v for k, v in given.items() if v is not None}
    if record is None:
        return Preprocessing(**given)
    rec = record.preprocessing
    diffs = [f"--{k.replace('_', '-')} {v} (recorded: {getattr(rec, k)})" for k, v in given.items() if v != getattr(rec, k)]
    if diffs:
        raise IncompatibleRun(
            f"{record.manifest} recorded how the teacher was fed, and {', '.join(diffs)} differs: scores would not "
            "be the teacher's. Drop the option(s), or evaluate without the record (no --shards).")
    return rec


class Embedder:
    """uint8 RGB [N, H, W, 3] -> raw embeddings [N, D], for any model evaluate reads: a
    SavedModel or ONNX file, an exported student (uint8 in) or a teacher (float32 in)."""

    def __init__(self, path: str, pre: Preprocessing, signature: str = "serving_default", output: str | None = None):
        from distill.teacher import TeacherError, inspect_teacher, load_teacher

        path = resolve_model_dir(path)
        self.path = path
        self.computes_at: str | None = None  # an exported student's resolution, from its export.json
        onnx = os.path.isfile(path)
        inputs, outputs = _model_io(path, signature)
        (input_name, tensor), = inputs.items()
        if tensor.dtype == "float32":
            self.kind = "teacher"
            spec = inspect_teacher(path, signature if not onnx else "", output)
            self._teacher = load_teacher(spec, pre)
            self.height, self.width = spec.height, spec.width
            self.dim = spec.embedding_dim
            return
        if tensor.dtype != "uint8":
            raise TeacherError(f"{path}: input {input_name!r} is {tensor.dtype}; evaluate reads exported students "
                               "(uint8 images) and teachers (float32)")
        self.kind, self._teacher, self._input = "student", None, input_name
        self._output = "embeddings" if "embeddings" in outputs else next(iter(outputs))
        shape = tensor.shape
        if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
            raise TeacherError(f"{path}: input {input_name!r} has no fixed height/width ({shape}); re-export it")
        self.height, self.width = shape[1], shape[2]
        self.dim = int(outputs[self._output].shape[-1])
        self.computes_at = _student_resolution(path, (self.height, self.width))
        if onnx:
            from distill.teacher import require_onnxruntime

            require_onnxruntime(path)
            import onnxruntime

            self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        else:
            import tensorflow as tf

            self._model = tf.saved_model.load(path)  # keep a reference: the signature needs it alive
            self._fn = self._model.signatures[signature]
            self._session = None

    def __call__(self, rgb_uint8: np.ndarray) -> np.ndarray:
        if self._teacher is not None:
            return self._teacher(rgb_uint8)
        if self._session is not None:
            (out,) = self._session.run([self._output], {self._input: np.ascontiguousarray(rgb_uint8, np.uint8)})
            return np.asarray(out, np.float32)
        import tensorflow as tf

        out = self._fn(**{self._input: tf.constant(rgb_uint8, dtype=tf.uint8)})[self._output]
        return out.numpy().astype(np.float32, copy=False)


def _student_resolution(path: str, input_size: tuple[int, int]) -> str | None:
    """'computes at 64x64: resizes its 112x112 input inside', from the export.json beside an
    exported student (its saved_model/ or student.onnx); None when there is none."""
    from distill.evaluate.export import computes_at

    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(os.path.join(base, "export.json")) as f:
            student = json.load(f)["student"]
    except (OSError, ValueError, KeyError):
        return None
    return computes_at(student.get("resolution"), input_size)


def _model_io(path: str, signature: str) -> tuple[dict, dict]:
    """(inputs, outputs) of a SavedModel signature or an ONNX graph, read from the file
    without loading the model; exactly one input."""
    if os.path.isfile(path):
        from distill.onnxmodel import read_onnx

        graph = read_onnx(path)
        inputs, outputs = graph.inputs, graph.outputs
    else:
        from distill.savedmodel import read_signatures

        sigs = read_signatures(path)
        if signature not in sigs:
            raise BadInput(f"{path} has no signature {signature!r}; pass a SavedModel exported by `distill export` or "
                           "a teacher")
        inputs, outputs = sigs[signature].inputs, sigs[signature].outputs
    if len(inputs) != 1:
        raise BadInput(f"{path} takes {len(inputs)} inputs ({', '.join(inputs)}); evaluate feeds one image batch")
    return inputs, outputs


def embed_all(
    models: dict[str, "Embedder"],
    n: int,
    blob_at: Callable[[int], bytes],
    name_of: Callable[[int], str],
    batch_size: int,
    flip: bool,
    progress: bool | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], list[int]]:
    """Raw embeddings of images ``0..n-1`` by every model, in one streaming pass.

    Each batch is read and decoded once (any format, grey to RGB), resized to each model's
    input, and embedded; memory holds one batch of pixels, not the set. With ``flip`` the
    mirrored image's embedding is added (insightface's flip test), before any norm.
    Returns (embeddings per model: one row per readable image, in order; seconds inside each
    model; the indices that could not be read, which have no row).
    """
    from tqdm import tqdm

    from distill.images import UnreadableImage, decode_rgb, fit

    out: dict[str, list[np.ndarray]] = {role: [] for role in models}
    seconds = {role: 0.0 for role in models}
    bad: list[int] = []
    with tqdm(total=n, desc="embed " + "+".join(models), unit="img", leave=False, disable=not show_progress(progress)) as bar:
        for a in range(0, n, batch_size):
            images = []
            for k in range(a, min(a + batch_size, n)):
                try:
                    images.append(decode_rgb(blob_at(k)))
                except UnreadableImage as e:
                    log.warning("skipping %s: %s", name_of(k), e.reason)
                    bad.append(k)
            for role, m in models.items():
                if not images:
                    break
                batch = np.stack([fit(img, m.height, m.width) for img in images])
                t0 = time.perf_counter()
                e = m(batch)
                if flip:
                    e = e + m(np.ascontiguousarray(batch[:, :, ::-1]))
                seconds[role] += time.perf_counter() - t0
                out[role].append(e)
            bar.update(min(a + batch_size, n) - a)
    embeddings = {
        role: np.concatenate(rows) if rows else np.zeros((0, models[role].dim), np.float32) for role, rows in out.items()
    }
    return embeddings, seconds, bad


def remap_pairs(
    i: np.ndarray, j: np.ndarray, same: np.ndarray, embedded: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs over image numbers -> pairs over embedding rows (row r is image ``embedded[r]``);
    pairs with an image that has no row (unreadable) are dropped."""
    row = np.full(n, -1, np.int64)
    row[embedded] = np.arange(len(embedded))
    ri, rj = row[i], row[j]
    ok = (ri >= 0) & (rj >= 0)
    return ri[ok], rj[ok], same[ok]


# ---------------------------------------------------------------------------------------
# The stage.


ROC = "_roc"  # (FAR, TAR) arrays in a model's results until the plot takes them out


def _pair_figures(ranking: np.ndarray, cosine: np.ndarray, same: np.ndarray) -> dict[str, Any]:
    """What both kinds of set report: ranking scores (higher = more alike) for the AUC, TAR and
    ROC; cosine similarities for the means and the collapse check."""
    auc = roc_auc(ranking, same)
    same_cos, diff_cos = float(cosine[same].mean()), float(cosine[~same].mean())
    warning = collapse_warning(same_cos, diff_cos, auc, float(cosine.std()))
    return {"auc": auc, "tar_at_far": tar_table(ranking, same), "same_cosine": same_cos, "different_cosine": diff_cos,
            "collapsed": warning is not None, "collapse_warning": warning, ROC: roc_curve(ranking, same)}


def _folds(accs: np.ndarray, thresholds: np.ndarray, unit: str) -> dict[str, Any]:
    return {"accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
            "fold_accuracies": [float(a) for a in accs], f"fold_thresholds_{unit}": [float(t) for t in thresholds]}


def _verification(emb: np.ndarray, i: np.ndarray, j: np.ndarray, same: np.ndarray, seed: int) -> dict[str, Any]:
    e = l2_normalise(emb)
    scores = np.sum(e[i] * e[j], axis=1)
    accs, thresholds = fold_accuracy(scores, same, seed)
    return {**_folds(accs, thresholds, "cosine"), "threshold_cosine": best_accuracy(scores, same)[1],
            **_pair_figures(scores, scores, same)}


def _choose_pairs(cfg: EvaluateConfig, folders: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                   dict[str, Any]]:
    """The pairs of a folder (all, or a distinct sample) and what the dataset block says of them."""
    same_available, impostor_available = pair_counts(labels)
    requested = cfg.pairs if cfg.pairs is not None else (
        DEFAULT_SAMPLED_PAIRS if len(labels) > ALL_PAIRS_MAX_IMAGES else None)
    if requested is None:
        i, j, same = all_pairs(labels)
    else:
        i, j, same = sample_pairs(labels, requested, cfg.seed)
        asked = f"--pairs {requested}" if cfg.pairs is not None else f"the default sample of {requested} pairs"
        for kind, want, have in (("same-person", requested // 2, same_available),
                                 ("different-person", requested - requested // 2, impostor_available)):
            if want > have:
                log.warning("--folders %s: %s asks for %d %s pairs and only %d distinct ones exist: using all of them",
                            folders, asked, want, kind, have)
    all_same, all_impostor = int(same.sum()) == same_available, int((~same).sum()) == impostor_available
    return i, j, same, {"pairs_requested": requested, "same_pairs_available": same_available,
                        "impostor_pairs_available": impostor_available, "all_same_pairs": all_same,
                        "all_impostor_pairs": all_impostor, "sampled": not (all_same and all_impostor)}


def _evaluate_folders(cfg: EvaluateConfig, models: dict[str, Embedder], folders: str,
                      scanned: tuple[list[str], np.ndarray, list[str]]) -> dict[str, Any]:
    from distill.images import read_file

    paths, labels, _ = scanned
    i, j, same, pairs = _choose_pairs(cfg, folders, labels)
    needed = np.unique(np.concatenate([i, j]))  # a sample touches only some images: read only those
    embeddings, seconds, bad = embed_all(
        models, len(needed), lambda k: read_file(paths[needed[k]]), lambda k: paths[needed[k]],
        cfg.batch_size, cfg.flip_test, cfg.progress,
    )
    embedded = np.delete(needed, bad)
    i, j, same = remap_pairs(i, j, same, embedded, len(paths))
    if same.all() or not same.any():
        raise BadInput(f"--folders {folders}: need both same-identity and different-identity pairs")
    results: dict[str, Any] = {"models": {}}
    for role, emb in embeddings.items():
        r = _verification(emb, i, j, same, cfg.seed)
        r["images_per_second"] = len(embedded) * (2 if cfg.flip_test else 1) / max(seconds[role], 1e-9)
        results["models"][role] = r
    results["dataset"] = {
        "kind": "folders",
        "path": folders,
        "images": int(len(embedded)),
        "skipped": int(len(bad)),
        "identities": int(len(np.unique(labels[embedded]))),
        "pairs": int(len(same)),  # distinct pairs, all of them scored (those of unreadable images dropped)
        "same_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
        **pairs,
        # All pairs are mostly "different": accuracy is read against this majority rate.
        "chance_accuracy": float(max(same.mean(), 1 - same.mean())),
        "seed": cfg.seed,  # of the pair sample and of the folds' shuffle
        "folds": min(FOLDS, len(same)),
        "flip_test": cfg.flip_test,
    }
    results["mean_cosine"] = _cosine(embeddings)
    return results


def _evaluate_bin(cfg: EvaluateConfig, models: dict[str, Embedder], path: str, blobs: list[bytes],
                  same: np.ndarray) -> dict[str, Any]:
    raw, seconds, bad = embed_all(
        models, len(blobs), blobs.__getitem__, lambda k: f"{path} image {k}", cfg.batch_size, True, cfg.progress
    )
    if bad:
        raise BadInput(f"{path}: {len(bad)} images cannot be decoded (first: #{bad[0]}); the protocol needs every pair")
    results: dict[str, Any] = {"models": {}}
    embeddings = {}
    for role, e in raw.items():
        emb = l2_normalise(e)
        embeddings[role] = emb
        dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
        accs, thresholds = kfold_accuracy(dist, same)
        results["models"][role] = {
            **_folds(accs, thresholds, "sq_l2"),
            "threshold_sq_l2": best_distance_threshold(dist, same),
            **_pair_figures(-dist, 1 - dist / 2, same),  # (squared L2 of unit vectors = 2 - 2 cos)
            "images_per_second": 2 * len(blobs) / max(seconds[role], 1e-9),
        }
    results["dataset"] = {"kind": "bin", "path": path, "pairs": int(len(same)), "same_pairs": int(same.sum()),
                          "impostor_pairs": int((~same).sum()), "chance_accuracy": float(max(same.mean(), 1 - same.mean())),
                          "folds": BIN_FOLDS, "flip_test": True}
    results["mean_cosine"] = _cosine(embeddings)
    return results


def _cosine(embeddings: dict[str, np.ndarray]) -> float | None:
    if "teacher" not in embeddings:
        return None
    a, b = embeddings["model"], embeddings["teacher"]
    if a.shape[1] != b.shape[1]:
        log.warning("model dim %d != teacher dim %d: no teacher-student cosine", a.shape[1], b.shape[1])
        return None
    return mean_cosine(a, b)


def _tar_head() -> str:
    return " ".join(f"{'TAR@' + far_key(f):>11}" for f in FARS)


def _tar_cells(r: dict[str, Any]) -> str:
    """TAR at each FAR, or '-' where the impostor pairs are too few to support it."""
    tars = r.get("tar_at_far") or {}
    return " ".join(f"{tars[far_key(f)]:>11.4f}" if tars.get(far_key(f)) is not None else f"{'-':>11}" for f in FARS)


def _tar_gap(models: dict[str, Any]) -> str:
    """'1e-02 0.0123, 1e-03 0.2400' where both TARs are supported; '' without a teacher. Pure."""
    if "teacher" not in models or "model" not in models:
        return ""
    m, t = (models[r].get("tar_at_far") or {} for r in ("model", "teacher"))
    keys = [far_key(f) for f in FARS if m.get(far_key(f)) is not None and t.get(far_key(f)) is not None]
    return ", ".join(f"at FAR {k} {t[k] - m[k]:+.4f}" for k in keys)


def tar_note(ds: dict[str, Any]) -> str:
    """The table's footnote on TAR@FAR: the rule, and what would fill a '-'. Pure."""
    n = ds["impostor_pairs"]
    rule = f"TAR@FAR: shown where distinct impostor pairs x FAR >= {MIN_FALSE_ACCEPTS}"
    missing = [f for f in FARS if not far_supported(n, f)]
    if not missing:
        return f"{rule} (here {n:,})"
    needs = " and ".join(f"{far_key(f)} needs {min_impostor_pairs(f):,}" for f in missing)
    text = f"{rule}; '-': {needs}, there are {n:,}"
    if ds["kind"] != "folders":
        return f"{text} in this set"
    if ds.get("all_impostor_pairs"):
        return f"{text}, every distinct impostor pair of this folder:\n  more identities or images are needed"
    available = ds["impostor_pairs_available"]
    reachable = [f for f in missing if far_supported(available, f)]
    hints = [f"--pairs {2 * min_impostor_pairs(reachable[-1])} supports {far_key(reachable[-1])}"] if reachable else []
    if len(reachable) < len(missing):
        hints.append(f"the folder's {available:,} distinct impostor pairs cannot support "
                     f"{' or '.join(far_key(f) for f in missing if f not in reachable)}: more identities or images are "
                     "needed")
    return f"{text}:\n  " + "; ".join(hints)


def format_table(results: dict[str, Any]) -> str:
    """Plain-text tables of ``run_evaluate``'s results, one per verification set."""
    head = [f"{role}: {results['kinds'][role]}, {what}" for role, what in results.get("computes_at", {}).items()]
    return "\n\n".join(["\n".join(head)] * bool(head) + [_format_target(t, results["kinds"]) for t in results["targets"]])


def _format_target(t: dict[str, Any], kinds: dict[str, str]) -> str:
    ds = t["dataset"]
    folders = ds["kind"] == "folders"
    if folders:
        how = ("all of them" if not ds["sampled"] else f"a sample of {ds['pairs_requested']:,} asked, seed {ds['seed']}")
        lines = [f"{ds['path']}: {ds['images']} images, {ds['identities']} identities; {ds['pairs']:,} distinct pairs "
                 f"({ds['same_pairs']:,} same, {ds['impostor_pairs']:,} different: {how})"]
        short = [f"all {ds[k + '_pairs_available']:,} distinct {k} pairs" for k in ("same", "impostor")
                 if ds["sampled"] and ds["all_" + k + "_pairs"]]
        if short:
            lines.append(f"  (the sample asked for more than exist: it holds {' and '.join(short)})")
        unit, thr_key, digits = "cos thr", "threshold_cosine", 4
    else:
        lines = [f"{ds['path']}: {ds['pairs']:,} pairs ({ds['same_pairs']:,} same), insightface's protocol: flip test, "
                 f"{ds['folds']} folds"]
        unit, thr_key, digits = "sq-L2 thr", "threshold_sq_l2", 2
    lines.append(f"{'model':<10} {'kind':<8} {'ROC-AUC':>8} {'accuracy':>17} {unit:>9} {_tar_head()} {'img/s':>8}")
    for role, r in t["models"].items():
        acc = f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f}"
        lines.append(f"{role:<10} {kinds[role]:<8} {r['auc']:>8.4f} {acc:>17} {r[thr_key]:>9.{digits}f} {_tar_cells(r)} "
                     f"{r['images_per_second']:>8.1f}")
    for role, r in t["models"].items():
        if r.get("collapsed"):
            lines.append(f"WARNING {role}: {r['collapse_warning']}")
    gap = _tar_gap(t["models"])
    if gap:
        lines.append(f"TAR gap, teacher minus model: {gap}")
    if t.get("mean_cosine") is not None:
        lines.append(f"mean teacher-student cosine: {t['mean_cosine']:.4f}")
    shuffled = "of the shuffled pairs" if folders else "in the set's order"
    lines.append(f"accuracy: {ds['folds']} folds {shuffled}, each scored at the threshold chosen on the others "
                 f"(mean +- std); always answering 'different' scores {ds['chance_accuracy']:.4f}")
    lines.append("cos thr: cosine similarity at or above which a pair is called the same person (the best over all "
                 "pairs)" if folders else "sq-L2 thr: squared L2 distance of the unit embeddings below which a pair is "
                 "called the same person (the best over all pairs)")
    lines.append(tar_note(ds))
    return "\n".join(lines)


def check_outputs(cfg: EvaluateConfig) -> None:
    """``--out`` and ``--plot``: new files, or ones an earlier evaluate wrote; apart from the inputs."""
    from distill.outputs import EVALUATION, PLOT, check_output

    inputs = [("MODEL", cfg.model), ("--teacher", cfg.teacher), ("--shards", cfg.shards)] + [
        (f"--{kind}", path) for kind, path in cfg.targets]
    if cfg.out:
        check_output(cfg.out, EVALUATION, inputs)
    if cfg.plot:
        check_output(cfg.plot, PLOT, inputs, option="--plot")


RESULTS_FORMAT = "distill-evaluate/2"


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Embed, score, print nothing; returns the results (and writes ``cfg.out``), the same
    shape for one set or several: ``{"targets": [one dict per set, in order], "kinds",
    "paths", "preprocessing", ...}``. The models are loaded once for all of them."""
    from distill.mirror import local_copy
    from distill.startup import import_tensorflow_quietly

    check_outputs(cfg)
    # (MODEL on an object store: a local copy of the finished export)
    if cfg.model.lower().endswith(".onnx"):
        from distill.teacher import fetch_teacher

        cfg = replace(cfg, model=fetch_teacher(cfg.model))  # (with the weight files it names beside it)
    else:
        cfg = replace(cfg, model=local_copy(cfg.model, "MODEL"))
    # Bad paths, and a bad or hostile .bin, are refused before any model is loaded.
    resolve_model_dir(cfg.model)
    scanned = {path: scan_folders(path) for kind, path in cfg.targets if kind == "folders"}
    for path, (paths, _, _) in scanned.items():
        check_readable(path, paths)
    bins = {path: load_bin(path) for kind, path in cfg.targets if kind == "bin"}
    record, teacher = teacher_record(cfg)
    if teacher:
        from distill.teacher import fetch_teacher

        teacher = fetch_teacher(teacher)  # (a teacher on an object store: this machine's copy)
        resolve_model_dir(teacher)
    import_tensorflow_quietly()
    pre = choose_preprocessing(record, {k: getattr(cfg, k) for k in PREPROCESSING_OPTIONS})
    if record is not None:
        log.info("teacher preprocessing as %s recorded it: %s, signature %s -> %s", record.manifest,
                 pre.to_json(), record.signature, record.output)
    models = {"model": Embedder(cfg.model, pre, cfg.signature)}
    if teacher:
        models["teacher"] = Embedder(teacher, pre, record.signature if record else "serving_default",
                                     record.output if record else None)
    every = []
    for kind, path in cfg.targets:
        t0 = time.perf_counter()
        results = (_evaluate_folders(cfg, models, path, scanned[path]) if kind == "folders"
                   else _evaluate_bin(cfg, models, path, *bins[path]))
        results["seconds"] = time.perf_counter() - t0
        every.append(results)
    curves = [(f"{os.path.basename(r['dataset']['path'].rstrip('/'))}: {role} (AUC {m['auc']:.4f})", *m.pop(ROC))
              for r in every for role, m in r["models"].items()]
    if cfg.plot:
        from distill.evaluate.plot import plot_roc
        from distill.storage import make_dir

        make_dir(os.path.dirname(os.path.abspath(cfg.plot)), "--plot")
        plot_roc(curves, cfg.plot, f"ROC: {os.path.basename(cfg.model.rstrip('/'))}")
    results = {
        "format": RESULTS_FORMAT,
        "targets": every,
        "paths": {role: m.path for role, m in models.items()},
        "kinds": {role: m.kind for role, m in models.items()},
        "computes_at": {role: m.computes_at for role, m in models.items() if m.computes_at},
        "preprocessing": pre.to_json(),
        "preprocessing_from": record.manifest if record else None,
        "tar_at_far_rule": {"rule": TAR_RULE, "min_false_accepts": MIN_FALSE_ACCEPTS,
                            "min_impostor_pairs": {far_key(f): min_impostor_pairs(f) for f in FARS}},
    }
    if cfg.gates:
        results["gates"] = judge(results, cfg.gates)
    if cfg.out:
        _write_json(cfg.out, results)
    return results


def _write_json(path: str, obj: Any) -> None:
    from distill.mirror import write_output

    write_output(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), "--out")  # never half of it


def add_cli(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="verification ROC-AUC / accuracy of a student or teacher, and teacher-student cosine",
        description="Evaluate an exported student (or a teacher), a SavedModel or an ONNX file, on identity folder trees and/or "
        "insightface verification .bin files (several in one call: one model load).",
    )
    add_options(p, EvaluateConfig)
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = config_from_args(EvaluateConfig, args)
    results = run_evaluate(cfg)
    if cfg.json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return 1 if any(not v["passed"] for v in results.get("gates", [])) else 0
    print(format_table(results))
    if cfg.out:
        print(f"results: {cfg.out}")
    if cfg.plot:
        print(f"ROC curves: {cfg.plot}")
    return _report_gates(results.get("gates", []))


def _report_gates(verdicts: list[dict[str, Any]]) -> int:
    """One line per gate and set; 1 when any failed (for CI pipelines that retrain students)."""
    for v in verdicts:
        print(f"gate {v['gate']} on {v['set']}: {'pass' if v['passed'] else 'FAIL'}: {v['reason']}")
    failed = [v for v in verdicts if not v["passed"]]
    if failed:
        print(f"distill evaluate: {len(failed)} of {len(verdicts)} quality gate verdicts failed", file=sys.stderr)
        return 1
    return 0
