"""Faces in photos: the 5-point template, the similarity transform onto it, the warp, which
face is the photo's main one, and the detector behind a small interface.

Face-recognition teachers are trained on faces aligned onto insightface's 5-point template
(eyes, nose tip, mouth corners at fixed places in a 112x112 crop); a face fed otherwise is
badly hurt. ``align`` estimates the similarity transform (rotation, uniform scale, shift: no
shear) from a face's 5 landmarks onto the template (scaled for other output sizes) with
scikit-image and warps the photo with one bilinear resample. Pure NumPy / scikit-image
except ``MTCNNDetector``, which runs the MTCNN of the PyPI ``mtcnn`` package (MIT; its weights
ship in the wheel, nothing is downloaded) on TensorFlow. Another detector (RetinaFace, SCRFD,
...) plugs in by path: ``--detector package.module:factory``, a callable returning an object
with ``name`` and ``__call__(rgb) -> list[Face]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from distill.errors import BadOption

# insightface's ArcFace template for 112x112, x then y: left eye, right eye, nose tip, left and
# right mouth corners (the image's left and right).
TEMPLATE_112 = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
])
DEFAULT_SIZE = 112


@dataclass(frozen=True)
class Face:
    """One detected face: its box (x0, y0, x1, y1), 5 landmarks [5, 2] (x, y) in the template's
    order, and the detector's confidence."""

    box: tuple[float, float, float, float]
    points: np.ndarray
    confidence: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class Detector(Protocol):
    name: str

    def __call__(self, rgb: np.ndarray) -> list[Face]: ...


# ---------------------------------------------------------------- pure decisions


def template(size: int = DEFAULT_SIZE) -> np.ndarray:
    """The 5-point template for a ``size`` x ``size`` crop: the 112 one, scaled."""
    if size < 32:
        raise BadOption(f"--size must be at least 32, got {size}")
    return TEMPLATE_112 * (size / DEFAULT_SIZE)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 similarity transform (rotation, uniform scale, shift) taking points ``src`` to
    ``dst`` best in least squares (Umeyama, as scikit-image estimates it)."""
    from skimage.transform import SimilarityTransform

    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image 0.26 and later
        return np.asarray(SimilarityTransform.from_estimate(src, dst).params)
    t = SimilarityTransform()
    if not t.estimate(src, dst):
        raise ValueError("degenerate landmarks: no similarity transform")
    return np.asarray(t.params)


def main_face(faces: Sequence[Face], shape: tuple[int, int]) -> int | None:
    """Index of the photo's main face: the largest confidence x area x closeness to the
    centre (1 at the centre, 0 at a corner); None when there is none."""
    if not faces:
        return None
    h, w = shape[:2]
    centre, half_diag = np.array([w / 2, h / 2]), 0.5 * float(np.hypot(w, h))

    def score(f: Face) -> float:
        x0, y0, x1, y1 = f.box
        d = float(np.hypot((x0 + x1) / 2 - centre[0], (y0 + y1) / 2 - centre[1]))
        return f.confidence * f.area * max(0.0, 1.0 - d / half_diag)

    scores = [score(f) for f in faces]
    return int(np.argmax(scores))


def align(rgb: np.ndarray, points: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The face with these 5 landmarks warped onto the template: uint8 [size, size, 3]; what
    falls outside the photo is black."""
    from skimage.transform import AffineTransform, warp

    m = similarity(np.asarray(points, np.float64), template(size))
    out = warp(np.asarray(rgb), AffineTransform(matrix=m).inverse, output_shape=(size, size), order=1,
               mode="constant", cval=0.0, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def parse_points(values: Sequence[float]) -> np.ndarray:
    """10 numbers (x1, y1, ..., x5, y5) as [5, 2] landmarks."""
    pts = np.asarray([float(v) for v in values], np.float64)
    if pts.shape != (10,):
        raise ValueError(f"5 landmarks are 10 numbers, got {len(pts)}")
    return pts.reshape(5, 2)


# ---------------------------------------------------------------- detectors


class MTCNNDetector:
    """MTCNN from the PyPI ``mtcnn`` package, one photo per call: its batched calls return no
    faces at all with ``min_face_size`` above 20 (mtcnn 1.0.0), and photos differ in size."""

    name = "mtcnn"

    def __init__(self, min_face_size: int = 20, threshold: float = 0.9):
        try:
            from mtcnn import MTCNN
        except ImportError:
            raise BadOption("the MTCNN detector needs the `mtcnn` package: pip install 'distill[align]' "
                            "(or pip install mtcnn); its weights ship in the wheel, nothing is downloaded") from None
        self._mtcnn = MTCNN(device="CPU:0")
        self.min_face_size, self.threshold = min_face_size, threshold
        self.name = f"mtcnn(min_face_size={min_face_size},threshold={threshold})"

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        found = self._mtcnn.detect_faces(np.asarray(rgb), min_face_size=self.min_face_size, box_format="xyxy")
        faces = []
        for f in found or ():
            if f["confidence"] < self.threshold:
                continue
            k = f["keypoints"]
            points = np.array([k["left_eye"], k["right_eye"], k["nose"], k["mouth_left"], k["mouth_right"]], np.float64)
            faces.append(Face(tuple(float(v) for v in f["box"]), points, float(f["confidence"])))
        return faces


def load_detector(spec: str) -> Detector:
    """``mtcnn`` (default), or ``package.module:factory``: a callable returning a Detector."""
    if spec == "mtcnn":
        return MTCNNDetector()
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise BadOption(f"--detector must be 'mtcnn' or 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BadOption(f"--detector {spec}: cannot load it ({e})") from None
    detector = factory()
    if not callable(detector) or not hasattr(detector, "name"):
        raise BadOption(f"--detector {spec}: the factory must return an object with `name` and `__call__(rgb)`")
    return detector
