"""The teacher: a TF SavedModel, its signature, its input conventions, its fingerprint.

A SavedModel states its input shape and dtype, not how pixels were scaled, so scale, mean
and channel order are explicit (insightface defaults: RGB, ``(x - 127.5) / 128``) and are
recorded in the manifest. Signature input/output names and the input size are read from
the model. ``inspect_teacher`` rejects what cannot be fed before any work starts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distill.errors import BadInput, BadOption

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
    """What the SavedModel says about itself."""

    path: str
    signature: str
    input_name: str
    output_name: str
    height: int
    width: int
    channels: int
    embedding_dim: int


class TeacherError(BadInput):
    """The teacher cannot be used as given; the message says why and what to do."""


def inspect_teacher(path: str, signature: str = "serving_default", output: str | None = None) -> TeacherSpec:
    """Read the SavedModel's signature and check it can be fed [N, H, W, 3] float32 batches.

    No TensorFlow: ``distill.savedmodel`` reads ``saved_model.pb`` itself, so the embed driver
    starts work without importing it; whoever runs the teacher loads it (``Teacher``).
    """
    from distill.savedmodel import SavedModelError, read_signatures

    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise TeacherError(f"{path} is not a TensorFlow SavedModel (no saved_model.pb); pass --teacher DIR")
    try:
        sigs = read_signatures(path)
    except SavedModelError as e:
        raise TeacherError(str(e)) from None
    return _spec_from_signatures(sigs, path, signature, output)


def _shape_text(shape) -> str:
    return "unknown" if shape is None else "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def _spec_from_signatures(sigs: dict, path: str, signature: str, output: str | None) -> TeacherSpec:
    if signature not in sigs:
        raise TeacherError(
            f"teacher {path} has no signature {signature!r}; it has {sorted(sigs) or 'none'}. "
            "Pass --signature NAME, or re-export the model with a serving signature."
        )
    sig = sigs[signature]
    if len(sig.inputs) != 1:
        raise TeacherError(
            f"teacher {path} signature {signature!r} takes {len(sig.inputs)} inputs ({sorted(sig.inputs)}); "
            "distill feeds exactly one image batch input"
        )
    (input_name, spec), = sig.inputs.items()
    shape = spec.shape
    if shape is None or len(shape) != 4:
        raise TeacherError(f"teacher input {input_name!r} has shape {_shape_text(shape)}; expected [N, H, W, C] images")
    n, h, w, c = shape
    if n is not None:
        raise TeacherError(
            f"teacher input {input_name!r} has a fixed batch size {n} (shape {_shape_text(shape)}); re-export it "
            "with a free batch dimension (None), e.g. tf.TensorSpec([None, H, W, 3])"
        )
    if c not in (3, None):
        raise TeacherError(f"teacher input {input_name!r} has {c} channels (shape {_shape_text(shape)}); "
                           "distill feeds RGB (3)")
    if h is None or w is None:
        raise TeacherError(
            f"teacher input {input_name!r} has no fixed height/width (shape {_shape_text(shape)}); "
            "re-export with the size it was trained at, e.g. [None, 112, 112, 3]"
        )
    if spec.dtype != "float32":
        raise TeacherError(f"teacher input {input_name!r} is {spec.dtype}; distill feeds float32")
    outputs = sig.outputs
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
    return TeacherSpec(path, signature, input_name, output, h, w, 3, int(out_shape[-1]))


def fetch_teacher(location: str, fingerprint: str | None = None) -> str:
    """A local directory holding the teacher at ``location``: the path itself, or for an
    object-store URI a copy in this machine's cache (fetched once, renewed when the store's
    files change). With ``fingerprint`` (the driver's), the copy must be that teacher: a
    teacher replaced on the store mid-run is refused, never mixed into one run's shards."""
    from distill.storage import is_uri, redact

    if not is_uri(location):
        return os.path.abspath(location)
    from distill.mirror import local_copy

    try:
        path = local_copy(location, "--teacher", units=())
    except FileNotFoundError:
        raise TeacherError(f"teacher {redact(location)} does not exist; pass --teacher DIR or URI (a SavedModel "
                           "directory)") from None
    if fingerprint is not None and teacher_fingerprint(path) != fingerprint:
        raise TeacherError(f"the teacher at {redact(location)} is not the one this run started with (its files "
                           "changed on the store); put the run's teacher back, or start a new run (new --out)")
    return path


def teacher_fingerprint(path: str) -> str:
    """sha256 over the SavedModel's files (relative names and bytes), streamed."""
    if not os.path.isdir(path):
        raise TeacherError(f"teacher directory {path} does not exist; pass --teacher DIR (a SavedModel directory)")
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
        with open(os.path.join(path, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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

    def __call__(self, rgb_uint8: np.ndarray) -> np.ndarray:
        return self.embed(self.pre.apply(rgb_uint8))

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of an already preprocessed float32 batch (``pre.apply`` done elsewhere)."""
        import tensorflow as tf

        out = self._fn(**{self.spec.input_name: tf.constant(x)})[self.spec.output_name]
        return out.numpy().astype(np.float32, copy=False)


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
