"""The align worker: loads the detector once, turns whole shards of photos into aligned faces.

``AlignWorker`` is a plain class (unit-testable without Ray); ``distill align`` wraps it with
``ray.remote`` exactly as the teacher pass wraps ``EmbedWorker``, through the same shard plan,
ledger and dispatcher. ``align_shard`` is a generator: rows finished after each photo batch
(the progress bar), then the shard's done record once every file is durable.

Per photo: read, decode (PIL, RGB), find the faces (the detector, or the landmarks given for
that file), keep the main one (``distill.embed.faces.main_face``; all of them with
``all_faces``), warp each onto the template and write it as a JPEG under ``out`` at the
photo's own relative path (``_k`` before the extension for a photo's k-th face after its
first). A photo with no face, or that cannot be read, is an error row with its reason,
never dropped silently. Exactly-once lives in the writes: every JPEG is written atomically
and deterministically (the same photo gives the same bytes), then the shard's record file
(``part-NNNNN.parquet`` under ``out/.align``: one row per photo and face with the source,
the output, box, 5 points, confidence; the photos that gave none, with their reason, in its
footer) is written atomically, and only then is the shard marked done.
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from distill.images import UnreadableImage, read_file
from distill.shards.format import RowError, ShardRecord, sha256
from distill.shards.plan import Shard
from distill.shards.records import encode_records
from distill.storage import open_storage, write_file_atomic

if TYPE_CHECKING:
    from distill.embed.listing import ListingRows

BATCH = 16  # photos between progress reports
NO_FACE = "no face found"


@dataclass(frozen=True)
class AlignTask:
    """Everything an actor needs, fixed for the whole run (shipped once, at construction)."""

    out: str  # the aligned faces' root
    records: str  # out/.align: record files and manifest
    run_id: str
    detector: str  # "mtcnn" or "package.module:factory"
    size: int = 112
    all_faces: bool = False
    quality: int = 95
    roots: tuple[tuple[int, str, str], ...] = ()  # (first row, source root, prefix) of each listing source
    landmarks: tuple[tuple[str, tuple[float, ...]], ...] = ()  # given landmarks by file name, when no detector
    threads: int | None = None


def output_name(path: str, index: int, roots: tuple[tuple[int, str, str], ...], face: int = 0) -> str:
    """Where an aligned face goes, relative to ``out``: the photo's path relative to its
    source's root (under the source's prefix when a listing has several), as ``.jpg``; a
    photo outside its root goes by its listing index. Pure."""
    first, root, prefix = max((r for r in roots if r[0] <= index), key=lambda r: r[0], default=(0, "", ""))
    rel = os.path.relpath(path, root) if root and os.path.abspath(path).startswith(root.rstrip("/") + "/") \
        else f"{index:09d}{os.path.splitext(path)[1]}"
    stem = os.path.splitext(rel)[0] + (f"_{face}" if face else "")
    return os.path.join(prefix, stem + ".jpg") if prefix else stem + ".jpg"


class AlignWorker:
    def __init__(self, task: AlignTask):
        from distill.embed.faces import load_detector

        if not task.landmarks:
            from distill.workers.embed_actor import _configure_tensorflow

            _configure_tensorflow(task.threads)  # deterministic ops, fixed threads: a rerun finds the same faces
        self.task = task
        self.given = {name: np.asarray(p, np.float64).reshape(5, 2) for name, p in task.landmarks}
        self.detector = None if self.given else load_detector(task.detector)
        self.records = open_storage(task.records)
        self._compute = threading.Lock()  # one shard on the detector at a time: the same floats as any rerun

    def ready(self) -> bool:
        return True

    def _faces(self, path: str, rgb: np.ndarray):
        from distill.embed.faces import Face, main_face

        if self.given:
            points = self.given.get(os.path.basename(path))
            if points is None:
                return []
            return [Face((float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()),
                          float(points[:, 1].max())), points, 1.0)]
        faces = self.detector(rgb)
        if self.task.all_faces or not faces:
            return faces
        return [faces[main_face(faces, rgb.shape)]]

    def align_one(self, index: int, path: str) -> tuple[list[dict], RowError | None]:
        """One photo: its record rows (one per face written), or the reason for none."""
        from PIL import Image

        from distill.embed.faces import align
        from distill.images import decode_rgb

        try:
            rgb = decode_rgb(read_file(path))
        except UnreadableImage as e:
            return [], RowError(index, path, e.reason)
        faces = self._faces(path, rgb)
        if not faces:
            return [], RowError(index, path, NO_FACE)
        rows = []
        for k, face in enumerate(faces):
            crop = align(rgb, face.points, self.task.size)
            buf = io.BytesIO()
            Image.fromarray(crop, "RGB").save(buf, format="JPEG", quality=self.task.quality)
            name = output_name(path, index, self.task.roots, k)
            target = os.path.join(self.task.out, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write_file_atomic(target, buf.getvalue())
            rows.append({"index": index, "source": path, "output": name, "face": k, "box": list(face.box),
                         "points": face.points.reshape(-1).tolist(), "confidence": face.confidence})
        return rows, None

    def align_shard(self, shard: Shard, rows: ListingRows) -> Iterator[int | dict]:
        t0 = time.perf_counter()
        records, errors = [], []
        with self._compute:
            for lo in range(0, len(rows), BATCH):
                hi = min(lo + BATCH, len(rows))
                for i in range(lo, hi):
                    got, err = self.align_one(int(rows.index[i]), rows.path[i])
                    records.extend(got)
                    if err is not None:
                        errors.append(err)
                yield hi - lo
        data = encode_records(records, errors, self.task.run_id, shard)
        self.records.write_atomic(shard.name, data)
        yield ShardRecord(k=shard.k, rows=len(records), bytes=len(data), sha256=sha256(data), errors=tuple(errors),
                          seconds=time.perf_counter() - t0, finished_at=time.time()).to_json()
