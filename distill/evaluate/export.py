"""Export the student's embedding path: ``distill export RUN/student --out RUN/export [--tflite]``.

Owns the deployable model. From the latest (or a given) checkpoint it rebuilds the trained
graph, keeps the embedding path only (no classifier) and writes a SavedModel whose
``serving_default`` takes ``images``: uint8 RGB [N, H, W, 3] and returns ``embeddings``:
float32 [N, D], L2-normalised; the student's own first layer scales the pixels.
Optionally ``student.onnx`` (tf2onnx, checked with onnxruntime) and TFLite files: float16 weights, and int8: dynamic range (int8 weights) or, with
``--tflite-int8 full``, integer-only (int8 weights and activations, calibrated on the shards'
own images, none of them among the images it is then checked on).

Export checks itself before publishing: on real shard images the reloaded SavedModel must
match the trained model's normalised embeddings within ``--tolerance`` (max abs diff), and
each TFLite file must agree by cosine >= ``--tflite-min-cosine`` on every image. The whole
output directory is staged beside ``--out`` and renamed into place, so a half-done export
is never what a reader finds. Hands on: ``OUT/saved_model``, ``OUT/*.tflite`` and
``OUT/export.json`` (config, figures, dim, input size) to ``evaluate`` and to deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from distill.errors import BadInput, BadOption, CheckFailed
from distill.metrics import l2_normalise
from distill.mirror import MARKER, Mirror, cache_dir
from distill.options import add_options, config_from_args, option
from distill.outputs import EXPORT, check_output, classify
from distill.storage import is_uri, local_path, make_dir, publish_dir

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
TFLITE_KINDS = ("float16", "int8")
ONNX_FILE = "student.onnx"
ONNX_OPSETS = (13, 18)  # what tf2onnx 1.17 converts a Keras 3 MobileFaceNet at (13: the first with dynamic Split/Squeeze)


@dataclass(frozen=True)
class ExportConfig:
    """The options of ``distill export`` (the CLI is derived from these fields)."""

    student: str = option(help="training output directory (RUN/student; a local path or an object-store URI)",
                          positional=True, path=True, metavar="STUDENT")
    out: str = option(help="export directory (RUN/export; a local path or an object-store URI); replaced as a whole",
                      required=True, path=True, metavar="DIR")
    tflite: bool = option(False, "also write float16 and int8 TFLite files")
    tflite_int8: str = option("dynamic", "the int8 file: dynamic (int8 weights, float activations) or full (int8 "
                              "weights and activations, integer-only ops: phones' NPUs and DSPs; calibrated on "
                              "--calibration-rows of the shards' images)", choices=("dynamic", "full"))
    onnx: bool = option(False, "also write student.onnx (tf2onnx from the SavedModel; dynamic batch), checked with "
                        "onnxruntime like the SavedModel; needs pip install 'distill[onnx]'")
    onnx_opset: int = option(17, "ONNX opset of student.onnx")
    calibration_rows: int = option(256, "shard images that calibrate --tflite-int8 full (taken after the check images, "
                                   "so the check is on images calibration never saw)")
    checkpoint: str | None = option(None, "a checkpoint directory (default: the latest in STUDENT/checkpoints)",
                                    metavar="DIR", path=True)
    best: bool = option(False, "export STUDENT/best, the epoch that scored best on the held-out people (train with "
                        "--val-split or --val-folders)")
    shards: str | None = option(None, "shard directory for the check images (default: the one trained on)",
                                metavar="DIR", path=True)
    check_rows: int = option(64, "images the self-check compares on")
    tolerance: float = option(1e-4, "max abs difference allowed, SavedModel vs trained model")
    tflite_min_cosine: float = option(0.99, "min cosine allowed, TFLite vs trained model")
    full_int8_min_cosine: float = option(0.9, "min cosine allowed, --tflite-int8 full vs trained model")

    def __post_init__(self) -> None:
        for path, option_name in ((self.checkpoint, "--checkpoint"),):
            if path:
                local_path(path, option_name)
        if self.check_rows <= 0:
            raise BadOption(f"--check-rows must be positive, got {self.check_rows}")
        if self.tflite_int8 == "full" and self.calibration_rows <= 0:
            raise BadOption(f"--calibration-rows must be positive, got {self.calibration_rows}")
        if not self.tolerance >= 0:
            raise BadOption(f"--tolerance is a max abs difference, >= 0, got {self.tolerance}")
        for name in ("tflite_min_cosine", "full_int8_min_cosine"):
            if not -1 <= getattr(self, name) <= 1:
                raise BadOption(f"--{name.replace('_', '-')} is a cosine in [-1, 1], got {getattr(self, name)}")
        if not ONNX_OPSETS[0] <= self.onnx_opset <= ONNX_OPSETS[1]:
            raise BadOption(f"--onnx-opset {self.onnx_opset}: tf2onnx converts this student at opsets "
                            f"{ONNX_OPSETS[0]} to {ONNX_OPSETS[1]} (default 17)")
        if self.best and self.checkpoint:
            raise BadOption("pass --best or --checkpoint DIR, not both")
        if self.onnx:
            import importlib.util

            missing = [m for m in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
            if missing:
                raise BadOption(f"--onnx needs {' and '.join(missing)}: pip install 'distill[onnx]' (tf2onnx, "
                                "onnxruntime), or export without --onnx")


@dataclass(frozen=True)
class ExportReport:
    out: str
    saved_model: str
    checkpoint: str
    step: int
    embedding_dim: int
    input_size: tuple[int, int]
    check_rows: int
    max_abs_diff: float
    tolerance: float
    tflite: dict[str, str] = field(default_factory=dict)
    tflite_cosine: dict[str, dict[str, float]] = field(default_factory=dict)
    onnx: str | None = None  # student.onnx, with --onnx
    onnx_opset: int | None = None
    onnx_max_abs_diff: float | None = None  # against the trained model, on the check images
    int8: str = "dynamic"  # the int8 file's kind
    calibration_rows: int = 0  # images that calibrated a full-integer int8 file
    seconds: float = 0.0
    # The side the student computes at: it resizes its input to this inside (None: at input_size).
    resolution: int | None = None


def computes_at(resolution: int | None, input_size) -> str:
    """What the export says of the resolution its student computes at. Pure."""
    h, w = input_size
    if resolution is None or (resolution, resolution) == (h, w):
        return f"computes at {h}x{w}, its input size"
    return f"computes at {resolution}x{resolution}: resizes its {h}x{w} input inside"


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two embedding batches: min and mean. Pure."""
    cos = np.sum(l2_normalise(a) * l2_normalise(b), axis=1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def check_images(location: str, n: int, size: tuple[int, int]) -> np.ndarray:
    """Up to ``n`` real training images, uint8 [n, H, W, 3], from the first shards."""
    import tensorflow as tf

    from distill.shards.reader import ShardReader, open_shards
    from distill.train.stream import decode_stored

    blobs = ShardReader(open_shards(location)).first(n, ["image"]).column("image").to_pylist()
    images = np.stack([decode_stored(tf.constant(data)).numpy() for data in blobs])
    if images.shape[1:3] != tuple(size):
        raise BadInput(f"the shards in {location} hold {images.shape[1]}x{images.shape[2]} images, the student "
                         f"takes {size[0]}x{size[1]}; pass the shards it was trained on with --shards")
    return images


def write_saved_model(embedding_model, size: tuple[int, int], path: str) -> None:
    """The serving SavedModel, through Keras' ExportArchive.

    A plain ``tf.Module`` around a Keras 3 model saves fine for TensorFlow, but the TFLite
    converter then reads its captured variables as garbage; ExportArchive tracks them so both
    work.
    """
    import keras
    import tensorflow as tf

    h, w = size

    def serve(images):
        e = tf.cast(embedding_model(tf.cast(images, tf.float32), training=False), tf.float32)
        return {OUTPUT_NAME: tf.math.l2_normalize(e, axis=1)}

    archive = keras.export.ExportArchive()
    archive.track(embedding_model)
    archive.add_endpoint(
        name="serving_default", fn=serve, input_signature=[tf.TensorSpec([None, h, w, 3], tf.uint8, name=INPUT_NAME)]
    )
    archive.write_out(path, verbose=False)


def _tflite(saved_model: str, kind: str, calibration: np.ndarray | None = None) -> bytes:
    """The TFLite flatbuffer: float16 weights, or int8 weights (dynamic range), or with
    ``calibration`` images integer-only (int8 weights and activations; the uint8 input and the
    float32 embeddings stay as the SavedModel's)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=["serving_default"])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: dynamic-range int8 weights
    if kind == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if calibration is not None:
        conv.representative_dataset = lambda: ({INPUT_NAME: image[None]} for image in calibration)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


def run_tflite(path: str, images: np.ndarray) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # LiteRT not installed: TF's interpreter runs the same flatbuffer
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its deprecation notice, on every call
            interpreter = tf.lite.Interpreter(model_path=path)
    else:
        interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    return runner(**{INPUT_NAME: images})[OUTPUT_NAME]


def choose_checkpoint(cfg: ExportConfig, student: str) -> str:
    """The checkpoint to export: ``--checkpoint``, ``STUDENT/best`` with ``--best``, else the
    latest; ``student``: STUDENT, or its local copy when it is on an object store."""
    from distill.train.checkpoints import BEST, latest_checkpoint

    if cfg.best:
        ckpt = os.path.join(student, BEST)
        if not os.path.isfile(os.path.join(ckpt, "cursor.json")):
            raise FileNotFoundError(f"no {ckpt}: it is written by `distill train` with --val-split or --val-folders; "
                                    "train with one, or export the latest checkpoint (drop --best)")
        return ckpt
    ckpt = cfg.checkpoint or latest_checkpoint(student)
    if ckpt is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(cfg.student, 'checkpoints')}: run `distill train SHARDS --out {cfg.student}` first"
        )
    return ckpt


def run_export(cfg: ExportConfig) -> ExportReport:
    from distill.mirror import RUN_SKIP, RUN_UNITS, local_copy
    from distill.startup import import_tensorflow_quietly
    from distill.train.checkpoints import load_student, read_checkpoint
    from distill.train.student import StudentSpec, build_student, embedding_model

    t0 = time.perf_counter()
    check_output(cfg.out, EXPORT, {"STUDENT": cfg.student, "--shards": cfg.shards, "--checkpoint": cfg.checkpoint})
    ckpt = choose_checkpoint(cfg, local_copy(cfg.student, "STUDENT", RUN_UNITS, RUN_SKIP))
    config, cursor = read_checkpoint(ckpt)
    spec = StudentSpec.from_json(config["student"])
    import_tensorflow_quietly()  # (the checkpoint is found and read: now the slow part)
    model = build_student(spec)
    load_student(model, ckpt)  # (with --ema, the averaged weights)
    emb_model = embedding_model(model)
    full = cfg.tflite and cfg.tflite_int8 == "full"
    try:
        images = check_images(cfg.shards or config["train"]["shards"],
                              cfg.check_rows + (cfg.calibration_rows if full else 0), spec.input_size)
    except FileNotFoundError as e:
        if cfg.shards:
            raise
        raise FileNotFoundError(f"{e}. The self-check reads real images from the shards the student trained on; "
                                "if they moved, pass --shards DIR") from None
    images, calibration = images[:cfg.check_rows], images[cfg.check_rows:]
    if full and not len(calibration):
        raise BadInput(f"the shards hold only {len(images)} images: none left after the {cfg.check_rows} check images "
                       "to calibrate --tflite-int8 full; lower --check-rows")
    want = l2_normalise(emb_model(images, training=False).numpy())

    # OUT on an object store: staged and published in its local copy, then pushed (marker last).
    out = cfg.out.rstrip("/") if is_uri(cfg.out) else local_path(cfg.out, "--out")
    local_out = cache_dir(out) if is_uri(out) else out
    parent = os.path.dirname(local_out)
    make_dir(parent)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    os.chmod(stage, 0o755)  # mkdtemp makes it private; the export is for others to read
    try:
        diff, tflite, cosines = _write_and_check(cfg, emb_model, spec, images, want, stage, calibration)
        onnx_diff = _write_and_check_onnx(cfg, images, want, stage) if cfg.onnx else None
        report = ExportReport(
            out=out, saved_model=os.path.join(out, "saved_model"), checkpoint=ckpt, step=cursor.step,
            embedding_dim=spec.embedding_dim, input_size=spec.input_size, check_rows=len(images),
            resolution=spec.resolution,
            max_abs_diff=diff, tolerance=cfg.tolerance,
            tflite={k: os.path.join(out, os.path.basename(p)) for k, p in tflite.items()}, tflite_cosine=cosines,
            int8=cfg.tflite_int8, calibration_rows=len(calibration), seconds=time.perf_counter() - t0,
            onnx=os.path.join(out, ONNX_FILE) if cfg.onnx else None, onnx_opset=cfg.onnx_opset if cfg.onnx else None,
            onnx_max_abs_diff=onnx_diff,
        )
        _write_report(cfg, report, config, spec, ckpt, stage)
        # The weights exported, as a checkpoint: `distill train --init EXPORT` starts from them.
        shutil.copytree(ckpt, os.path.join(stage, "checkpoint"), ignore=shutil.ignore_patterns(MARKER))
        # (checked again at the swap: only an export of ours, holding nothing else, is replaced)
        publish_dir(stage, local_out, replaceable=lambda old: classify(os.listdir(old), EXPORT)[0] != "foreign")
        if local_out != out:
            Mirror.open(out, units=("",)).push()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def _write_and_check(cfg: ExportConfig, emb_model, spec, images: np.ndarray, want: np.ndarray, stage: str,
                     calibration: np.ndarray):
    """The SavedModel (and TFLite files) in ``stage``, each checked against the trained model's
    normalised embeddings ``want`` of ``images``. Returns (max abs diff, TFLite paths, cosines)."""
    import tensorflow as tf

    sm_dir = os.path.join(stage, "saved_model")
    write_saved_model(emb_model, spec.input_size, sm_dir)
    loaded = tf.saved_model.load(sm_dir)
    got = loaded.signatures["serving_default"](**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()
    diff = float(np.max(np.abs(got - want)))
    if not diff <= cfg.tolerance:
        raise CheckFailed(f"the exported SavedModel differs from the trained model by {diff:.3g} (max abs, "
                          f"normalised embeddings) > --tolerance {cfg.tolerance}; nothing was published")
    tflite, cosines = {}, {}
    for kind in TFLITE_KINDS if cfg.tflite else ():
        path = os.path.join(stage, f"student_{kind}.tflite")
        full = kind == "int8" and cfg.tflite_int8 == "full"
        with open(path, "wb") as f:
            f.write(_tflite(sm_dir, kind, calibration if full else None))
        agree = cosine_agreement(run_tflite(path, images), want)
        least, option_name = ((cfg.full_int8_min_cosine, "--full-int8-min-cosine") if full else
                              (cfg.tflite_min_cosine, "--tflite-min-cosine"))
        if not agree["min"] >= least:  # NaN fails too
            raise CheckFailed(f"TFLite {'full-integer ' if full else ''}{kind} agrees with the trained model only to "
                              f"cosine {agree['min']:.4f} (min over {len(images)} images) < {option_name} {least}; "
                              "nothing was published")
        tflite[kind], cosines[kind] = path, agree
    return diff, tflite, cosines


def _write_and_check_onnx(cfg: ExportConfig, images: np.ndarray, want: np.ndarray, stage: str) -> float:
    """``student.onnx`` from the staged SavedModel by tf2onnx's converter (in a process of its
    own: it rewrites TensorFlow graphs), then run by onnxruntime on the check images and held to
    ``--tolerance`` like the SavedModel. Returns its max abs difference."""
    import subprocess
    import sys

    import onnxruntime

    path = os.path.join(stage, ONNX_FILE)
    proc = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", os.path.join(stage, "saved_model"),
                           "--signature_def", "serving_default", "--opset", str(cfg.onnx_opset), "--output", path],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(path):
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        raise CheckFailed(f"tf2onnx could not convert the SavedModel (opset {cfg.onnx_opset}): {' | '.join(tail)}; "
                          "nothing was published. Try another --onnx-opset, or export without --onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    got = session.run(None, {inp.name: images})[0]
    diff = float(np.max(np.abs(got - want)))
    if not diff <= cfg.tolerance:
        raise CheckFailed(f"the ONNX model differs from the trained model by {diff:.3g} (max abs, normalised "
                          f"embeddings) > --tolerance {cfg.tolerance}; nothing was published")
    return diff


def _write_report(cfg: ExportConfig, report: ExportReport, config: dict, spec, ckpt: str, stage: str) -> None:
    """``export.json``: the options, the figures, the student and the serving signature."""
    from distill.startup import versions

    doc = {
        "config": asdict(cfg), "report": asdict(report), "student": config["student"], "versions": versions(),
        "trained_with": config.get("versions"),
        "signature": {"name": "serving_default", "input": {"name": INPUT_NAME, "dtype": "uint8",
                      "shape": [None, *spec.input_size, 3], "channels": "RGB"},
                      "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, spec.embedding_dim],
                                 "l2_normalised": True},
                      "preprocessing": "(x - 127.5) / 128, the student's first layer"},
    }
    if os.path.isfile(os.path.join(ckpt, "val.json")):
        with open(os.path.join(ckpt, "val.json")) as f:
            doc["validation"] = json.load(f)
    with open(os.path.join(stage, "export.json"), "w") as f:
        json.dump(doc, f, indent=1)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export the student's embedding path as a SavedModel (+ TFLite, ONNX)",
        description="SavedModel with serving_default: images uint8 [N,H,W,3] RGB -> embeddings float32 [N,D], "
                    "L2-normalised. Checked against the trained model on real shard images before publishing.",
    )
    add_options(p, ExportConfig)
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = config_from_args(ExportConfig, args)
    r = run_export(cfg)
    h, w = r.input_size
    print(f"exported step {r.step} from {r.checkpoint}")
    print(f"  saved_model  {r.saved_model}")
    print(f"               images uint8 [N,{h},{w},3] -> embeddings float32 [N,{r.embedding_dim}], L2-normalised")
    print(f"               {computes_at(r.resolution, r.input_size)}")
    print(f"  check        max abs diff {r.max_abs_diff:.2e} on {r.check_rows} shard images (tolerance {r.tolerance:g})")
    for kind, path in r.tflite.items():
        c = r.tflite_cosine[kind]
        what = f" (full integer, calibrated on {r.calibration_rows} images)" if kind == "int8" and r.int8 == "full" else ""
        print(f"  tflite {kind:<7} {path}  cosine min {c['min']:.5f} mean {c['mean']:.5f}{what}")
    if r.onnx:
        print(f"  onnx         {r.onnx}  opset {r.onnx_opset}, max abs diff {r.onnx_max_abs_diff:.2e} (onnxruntime)")
    print(f"  report       {os.path.join(r.out, 'export.json')}")
    return 0
