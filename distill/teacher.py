"""The teacher: a TF SavedModel or an ONNX model, its input and output, its input
conventions, its fingerprint.

A model states its input shape and dtype, not how pixels were scaled, so scale, mean and
channel order are explicit (insightface defaults: RGB, ``(x - 127.5) / 128``) and are
recorded in the manifest. Input/output names, the input size and (ONNX) layout are read from
the model file. ``inspect_teacher`` rejects what cannot be fed before any work starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distill.errors import BadInput, BadOption

log = logging.getLogger(__name__)

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """``x' = (x[..., order] - pixel_mean) / pixel_scale`` on uint8 pixels."""

    pixel_mean: float = 127.5
    pixel_scale: float = 128.0
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise BadOption(f"--channel-order must be RGB or BGR, got {self.channel_order!r}")
        if self.pixel_scale == 0:
            raise BadOption("--pixel-scale must not be 0 (it divides the pixels)")

    def apply(self, rgb_uint8: np.ndarray) -> np.ndarray:
        x = rgb_uint8[..., ::-1] if self.channel_order == "BGR" else rgb_uint8
        return (x.astype(np.float32) - np.float32(self.pixel_mean)) / np.float32(self.pixel_scale)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TeacherSpec:
    """What the model file says about itself: a SavedModel's signature, or an ONNX graph's."""

    path: str
    signature: str  # a SavedModel's; "" for an ONNX graph (it has one)
    input_name: str
    output_name: str
    height: int
    width: int
    channels: int
    embedding_dim: int
    format: str = "savedmodel"  # or "onnx"
    layout: str = "NHWC"  # or "NCHW" (insightface's and arcface_torch's ONNX models)


class TeacherError(BadInput):
    """The teacher cannot be used as given; the message says why and what to do."""


ONNX_EXTRA = "pip install 'distill[onnx]' (onnxruntime; onnxruntime-gpu on GPU nodes)"


def inspect_teacher(path: str, signature: str = "serving_default", output: str | None = None) -> TeacherSpec:
    """Read the teacher's input and output and check it can be fed float32 image batches.

    No TensorFlow, no onnxruntime: ``distill.savedmodel`` and ``distill.onnxmodel`` read the
    model files themselves, so the embed driver starts work without importing either; whoever
    runs the teacher loads it (``load_teacher``).
    """
    if os.path.isfile(path):
        return _spec_from_onnx(path, signature, output)
    from distill.savedmodel import SavedModelError, read_signatures

    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise TeacherError(f"{path} is neither a TensorFlow SavedModel (no saved_model.pb) nor an ONNX file; pass "
                           "--teacher DIR (a SavedModel) or --teacher MODEL.onnx")
    try:
        sigs = read_signatures(path)
    except SavedModelError as e:
        raise TeacherError(str(e)) from None
    if signature not in sigs:
        raise TeacherError(
            f"teacher {path} has no signature {signature!r}; it has {sorted(sigs) or 'none'}. "
            "Pass --signature NAME, or re-export the model with a serving signature."
        )
    return _spec(path, sigs[signature].inputs, sigs[signature].outputs, output, signature)


def _spec_from_onnx(path: str, signature: str, output: str | None) -> TeacherSpec:
    from distill.onnxmodel import OnnxError, read_onnx

    require_onnxruntime(path)
    if signature not in ("serving_default", ""):
        raise TeacherError(f"--signature {signature} names a SavedModel signature; the ONNX teacher {path} has one "
                           "graph: drop --signature")
    try:
        graph = read_onnx(path)
    except OnnxError as e:
        raise TeacherError(str(e)) from None
    return _spec(path, graph.inputs, graph.outputs, output, signature=None)


def _spec(path: str, inputs: dict, outputs: dict, output: str | None, signature: str | None) -> TeacherSpec:
    """The spec of a SavedModel signature (``signature``) or an ONNX graph (None): one image
    input, one embedding output."""
    onnx = signature is None
    if len(inputs) != 1:
        where = f"teacher {path}" + ("" if onnx else f" signature {signature!r}")
        raise TeacherError(f"{where} takes {len(inputs)} inputs ({sorted(inputs)}); distill feeds exactly one image "
                           "batch input")
    (input_name, tensor), = inputs.items()
    h, w, layout = image_input(input_name, tensor, onnx)
    output, dim = _embedding_output(path, outputs, output)
    return TeacherSpec(path, signature or "", input_name, output, h, w, 3, dim, "onnx" if onnx else "savedmodel", layout)


def _shape_text(shape) -> str:
    return "unknown" if shape is None else "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def image_input(name: str, tensor, onnx: bool) -> tuple[int, int, str]:
    """(height, width, layout) of a teacher's image input, or a ``TeacherError`` saying what
    to change. Pure. SavedModels take [N, H, W, 3]; ONNX models that or [N, 3, H, W]."""
    shape = tensor.shape
    expected = "[N, H, W, 3] or [N, 3, H, W]" if onnx else "[N, H, W, C]"
    if shape is None or len(shape) != 4:
        raise TeacherError(f"teacher input {name!r} has shape {_shape_text(shape)}; expected {expected} images")
    n, a, b, c = shape
    if n is not None:
        fix = (f"re-export it with a dynamic batch axis, e.g. torch.onnx.export(..., input_names=[{name!r}], "
               f"dynamic_axes={{{name!r}: {{0: 'batch'}}}})" if onnx else "re-export it with a free batch dimension "
               "(None), e.g. tf.TensorSpec([None, H, W, 3])")
        raise TeacherError(f"teacher input {name!r} has a fixed batch size {n} (shape {_shape_text(shape)}); {fix}")
    if onnx and a == 3 and c != 3:
        layout, (h, w) = "NCHW", (b, c)
    elif c in (3, None):
        layout, (h, w) = "NHWC", (a, b)
    else:
        raise TeacherError(f"teacher input {name!r} has shape {_shape_text(shape)}: no axis of 3 channels where "
                           f"{expected} has it; distill feeds RGB images (3 channels)")
    if h is None or w is None:
        example = "[None, 3, 112, 112]" if layout == "NCHW" else "[None, 112, 112, 3]"
        raise TeacherError(
            f"teacher input {name!r} has no fixed height/width (shape {_shape_text(shape)}); "
            f"re-export with the size it was trained at, e.g. {example}"
        )
    if tensor.dtype != "float32":
        raise TeacherError(f"teacher input {name!r} is {tensor.dtype}; distill feeds float32")
    return h, w, layout


def _embedding_output(path: str, outputs: dict, output: str | None) -> tuple[str, int]:
    """(name, dimension) of the output holding the embedding: the only one, the one named
    ``*embed*``, or ``output`` (--teacher-output)."""
    if output is None:
        if len(outputs) == 1:
            output = next(iter(outputs))
        else:
            named = [k for k in outputs if "embed" in k.lower()]
            if len(named) != 1:
                raise TeacherError(
                    f"teacher {path} has outputs {sorted(outputs)}; pass --teacher-output NAME to pick the embedding"
                )
            output = named[0]
    if output not in outputs:
        raise TeacherError(f"teacher {path} has no output {output!r}; it has {sorted(outputs)}")
    out_shape = outputs[output].shape
    if out_shape is None or len(out_shape) != 2 or out_shape[-1] is None:
        raise TeacherError(f"teacher output {output!r} has shape {_shape_text(out_shape)}; expected [N, D] embeddings")
    return output, int(out_shape[-1])


def fetch_teacher(location: str, fingerprint: str | None = None) -> str:
    """A local path holding the teacher at ``location``: the path itself, or for an
    object-store URI a copy in this machine's cache (fetched once, renewed when the store's
    files change): a SavedModel directory, or an ``.onnx`` file with any weight files it names
    beside it. With ``fingerprint`` (the driver's), the copy must be that teacher: a teacher
    replaced on the store mid-run is refused, never mixed into one run's shards."""
    from distill.storage import is_uri, redact

    if not is_uri(location):
        return os.path.abspath(location)
    from distill.mirror import local_copy, local_file

    try:
        if location.lower().endswith(".onnx"):
            path = local_file(location, "--teacher")
            base = location.rsplit("/", 1)[0]
            for rel in _external_files(path):
                local_file(f"{base}/{rel}", "--teacher")  # (lands beside the model: same store folder)
        else:
            path = local_copy(location, "--teacher", units=())
    except FileNotFoundError:
        raise TeacherError(f"teacher {redact(location)} does not exist; pass --teacher DIR, MODEL.onnx or a URI of "
                           "either") from None
    if fingerprint is not None and teacher_fingerprint(path) != fingerprint:
        raise TeacherError(f"the teacher at {redact(location)} is not the one this run started with (its files "
                           "changed on the store); put the run's teacher back, or start a new run (new --out)")
    return path


def _external_files(path: str) -> tuple[str, ...]:
    """The weight files an ONNX model keeps outside itself, each checked to be a plain name
    beside it (where a copy of the model finds them too)."""
    from distill.onnxmodel import OnnxError, read_onnx

    try:
        external = read_onnx(path).external
    except OnnxError as e:
        raise TeacherError(str(e)) from None
    for rel in external:
        if os.path.basename(rel) != rel or rel in (".", ".."):
            raise TeacherError(f"ONNX teacher {path} keeps weights in {rel!r}, not beside it; save it with its "
                               "external data in the model's folder (onnx.save_model(..., location='NAME'))")
    return external


def teacher_fingerprint(path: str) -> str:
    """sha256 of the teacher, streamed: of an ONNX file's bytes (what ``sha256sum`` prints,
    followed by its external weight files, by name); of a SavedModel's files, by relative name."""
    if os.path.isfile(path):
        h = hashlib.sha256()
        _hash_file(h, path)
        for rel in _external_files(path):
            where = os.path.join(os.path.dirname(path), rel)
            if not os.path.isfile(where):
                raise TeacherError(f"ONNX teacher {path} keeps weights in {rel}, which is not beside it; put the "
                                   "model's weight file next to it")
            h.update(rel.encode() + b"\0")
            _hash_file(h, where)
        return h.hexdigest()
    if not os.path.isdir(path):
        raise TeacherError(f"teacher {path} does not exist; pass --teacher DIR (a SavedModel directory) or MODEL.onnx")
    h = hashlib.sha256()
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            if name == "fingerprint.pb":
                continue  # TF rewrites it; not part of the model's meaning
            files.append(os.path.relpath(os.path.join(root, name), path))
    if not files:
        raise TeacherError(f"teacher directory {path} is empty")
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        _hash_file(h, os.path.join(path, rel))
    return h.hexdigest()


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def load_teacher(spec: TeacherSpec, pre: Preprocessing, threads: int | None = None, gpus: float | None = None):
    """The runnable teacher for ``spec``: TensorFlow for a SavedModel, onnxruntime for ONNX
    (``gpus``: the GPUs its holder has, None = whatever onnxruntime offers)."""
    if spec.format == "onnx":
        return OnnxTeacher(spec, pre, threads, gpus)
    return Teacher(spec, pre)


class Teacher:
    """A loaded teacher that maps a uint8 RGB batch [N, H, W, 3] to raw embeddings [N, D].

    Testable without Ray; the embed actor holds one.
    """

    def __init__(self, spec: TeacherSpec, pre: Preprocessing):
        import tensorflow as tf

        self.spec = spec
        self.pre = pre
        self._model = tf.saved_model.load(spec.path)  # keep a reference: signatures need it alive
        self._fn = self._model.signatures[spec.signature]
        gpus = len(tf.config.list_logical_devices("GPU"))
        self.runs_on = (f"SavedModel on TensorFlow {tf.__version__}, {f'{gpus} GPU(s)' if gpus else 'CPU'}, "
                        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} intra-op threads")

    def __call__(self, rgb_uint8: np.ndarray) -> np.ndarray:
        return self.embed(self.pre.apply(rgb_uint8))

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of an already preprocessed float32 batch (``pre.apply`` done elsewhere)."""
        import tensorflow as tf

        out = self._fn(**{self.spec.input_name: tf.constant(x)})[self.spec.output_name]
        return out.numpy().astype(np.float32, copy=False)


def onnx_providers(gpus: float | None, available: list[str] | tuple[str, ...], path: str) -> list[str]:
    """The onnxruntime execution providers for a teacher whose holder has ``gpus`` GPUs (None:
    unknown, use CUDA when onnxruntime has it): CUDA then CPU, or CPU alone. Pure."""
    cuda = "CUDAExecutionProvider" in available
    if gpus is None:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    if gpus > 0 and not cuda:
        raise TeacherError(f"the actor running the ONNX teacher {path} holds {gpus:g} GPU(s), but this onnxruntime "
                           f"has no CUDA provider (it has {', '.join(available)}): pip install onnxruntime-gpu on the "
                           "GPU nodes, or run on CPU (--gpus-per-worker 0)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpus > 0 else ["CPUExecutionProvider"]


def require_onnxruntime(path: str) -> None:
    """Refuse in one line, before any work, when the ONNX teacher cannot be run here."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise TeacherError(f"the teacher {path} is an ONNX model, run by onnxruntime, which is not installed: "
                           f"{ONNX_EXTRA}")


class OnnxTeacher:
    """An ONNX teacher on onnxruntime, the same call shape as ``Teacher``: one session, its
    threads the holder's CPUs (one inter-op thread), deterministic compute, NHWC batches
    transposed for an NCHW model."""

    def __init__(self, spec: TeacherSpec, pre: Preprocessing, threads: int | None = None, gpus: float | None = None):
        require_onnxruntime(spec.path)
        import onnxruntime as ort

        self.spec, self.pre = spec, pre
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.use_deterministic_compute = True
        opts.log_severity_level = 3  # errors only: its warnings name graph internals, not the user's problem
        providers = onnx_providers(gpus, ort.get_available_providers(), spec.path)
        self._session = ort.InferenceSession(spec.path, opts, providers=providers)
        self.runs_on = (f"ONNX on onnxruntime {ort.__version__}, {' then '.join(self._session.get_providers())}, "
                        f"{threads or 'default'} intra-op threads, input {spec.input_name!r} {spec.layout}")

    def __call__(self, rgb_uint8: np.ndarray) -> np.ndarray:
        return self.embed(self.pre.apply(rgb_uint8))

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of an already preprocessed float32 NHWC batch."""
        if self.spec.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        (out,) = self._session.run([self.spec.output_name], {self.spec.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out, np.float32)


def export_keras_teacher(model, out_dir: str, input_name: str = "input", output_name: str = "embeddings") -> str:
    """Save a Keras model taking preprocessed float32 [N, H, W, 3] as a teacher SavedModel.

    Used by the demo's synthetic teacher and by tests; the signature looks like a real
    exported face model (one named input, one named embedding output, free batch).
    """
    import tensorflow as tf

    h, w, c = model.input_shape[1:]

    class _Export(tf.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name=input_name)])
        def serve(self, x):
            return {output_name: self.m(x, training=False)}

    mod = _Export(model)
    sig = mod.serve.get_concrete_function()
    tf.saved_model.save(mod, out_dir, signatures={"serving_default": sig})
    return out_dir
