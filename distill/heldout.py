"""Held-out verification sets, read without TensorFlow: insightface's ``.bin`` (a pickle, read
by a restricted unpickler) and identity folder trees (``distill.folders``' rules), with the
checks that refuse an unusable one before any model loads.

Below both ``distill.train`` (validation during training) and ``distill.evaluate``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any, Callable

import numpy as np

from distill.errors import BadInput

log = logging.getLogger(__name__)


class UnsafePickle(BadInput):
    """The .bin asks to build something a verification set never holds."""


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle(f"_codecs.encode called with {type(text).__name__}, {encoding!r}; a .bin only uses latin1 bytes")
    return text.encode("latin1")


def _safe_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    # Booleans (issame), bytes (images) and integers (uint8 image buffers); object arrays are
    # allowed because their elements are unpickled by this same restricted unpickler.
    dt = np.dtype(spec)
    if dt.kind not in "buiSO":
        raise UnsafePickle(f"numpy dtype {dt} is not used by verification .bin files")
    return dt


def _allowed() -> dict[tuple[str, str], Callable]:
    reconstruct = np.array([True]).__reduce__()[0]  # numpy's own _reconstruct, whatever its module
    scalar = np.bool_(True).__reduce__()[0]
    table: dict[tuple[str, str], Callable] = {
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and numpy 2 names
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    return table


class BinUnpickler(pickle.Unpickler):
    """Loads ``(bins, issame_list)`` and nothing else.

    What real insightface .bin files need: lists, tuples, bytes (Python 2 ``str`` read with
    ``encoding="bytes"``) and booleans need no globals at all. Files re-saved from Python 3
    at protocol 2 add ``_codecs.encode``; files saved with numpy arrays (issame as a bool
    array, images as uint8/bytes/object arrays) add numpy's array reconstruction and dtype.
    Those are the only globals allowed, each restricted further; any other (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``, ...) is refused before it can be called.
    """

    _table = None

    def find_class(self, module: str, name: str):
        if BinUnpickler._table is None:
            BinUnpickler._table = _allowed()
        fn = BinUnpickler._table.get((module, name))
        if fn is None:
            raise UnsafePickle(
                f"refusing to load {module}.{name} from the .bin: a verification set holds only image bytes "
                "and booleans, so this file is not one (or was tampered with). Nothing from it was run."
            )
        return fn


def loads_bin(data: bytes) -> tuple[list[bytes], np.ndarray]:
    """Parse a verification .bin into (encoded images, issame per pair), checking its shape."""
    try:
        obj = BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickle:
        raise
    except Exception as e:  # a truncated or non-pickle file raises many types
        raise BadInput(f"not a verification .bin (pickle of (bins, issame_list)): {e}") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BadInput(f"a verification .bin holds (bins, issame_list); this one holds a {type(obj).__name__}")
    bins, issame = obj
    images = [_as_bytes(b, k) for k, b in enumerate(bins)]
    try:
        same = np.asarray([bool(x) for x in issame], dtype=bool) if not isinstance(issame, np.ndarray) else issame
        same = same.astype(bool).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BadInput(f"issame_list of the .bin is not a list of booleans: {e}") from e
    if len(images) != 2 * len(same):
        raise BadInput(f"the .bin has {len(images)} images for {len(same)} pairs; expected 2 images per pair")
    return images, same


def _as_bytes(b: Any, k: int) -> bytes:
    if isinstance(b, (bytes, bytearray)):
        return bytes(b)
    if isinstance(b, np.ndarray) and b.dtype == np.uint8:
        return b.tobytes()
    if isinstance(b, np.bytes_):
        return bytes(b)
    raise BadInput(f"image {k} of the .bin is a {type(b).__name__}, not encoded image bytes")


def load_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """A .bin from a path or an object-store URI (read whole: it is decoded whole)."""
    from distill.storage import is_uri

    if is_uri(path):
        from distill.storage import read_store_bytes, redact

        try:
            data = read_store_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{redact(path)}: no such object on the store") from None
    else:
        with open(path, "rb") as f:
            data = f.read()
    try:
        return loads_bin(data)
    except ValueError as e:
        raise type(e)(f"{path}: {e}") from None


def scan_folders(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, labels, identity names) of an identity folder tree (``distill.folders``:
    the rules ``distill listing`` follows); labels follow sorted names."""
    from distill.folders import scan_identities

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--folders {root} is not a directory; pass a folder with one sub-folder per identity")
    tree = scan_identities(root)
    paths = [p for files in tree.files for p in files]
    labels = np.concatenate([np.full(len(f), k, np.int64) for k, f in enumerate(tree.files)] or [np.zeros(0, np.int64)])
    people = [name for name, files in zip(tree.names, tree.files) if files]
    if not people and tree.loose:
        raise BadInput(f"--folders {root} holds {tree.loose} images directly and no identity sub-folders: verification "
                       "needs to know who is who; put each person's images in a sub-folder of their own (ROOT/NAME/*.jpg)")
    if len(people) < 2:
        raise BadInput(f"--folders {root} has {len(people)} identity sub-folder(s) with images"
                       + (f" ({people[0]})" if people else "") + ": verification needs at least two people; pass a "
                       "folder with one sub-folder of images per person")
    if max(len(f) for f in tree.files) < 2:
        raise BadInput(f"--folders {root}: no identity has two images, so there are no same-person pairs; pass a folder "
                       "with two or more images of some people")
    if tree.skipped:
        log.info("--folders %s: skipped %d file(s) that are not images", root, tree.skipped)
    return paths, labels, list(tree.names)


# How many images of a folder are tried before it is refused as unreadable (spread over it).
READABLE_TRIES = 32


def check_readable(root: str, paths: list[str], tries: int = READABLE_TRIES) -> None:
    """Refuse a folder none of whose images decodes, trying up to ``tries`` of them spread
    over the listing and stopping at the first good one (cheap: no TensorFlow, usually one read)."""
    from distill.images import UnreadableImage, decode_rgb, read_file

    picks = np.unique(np.linspace(0, len(paths) - 1, min(tries, len(paths))).round().astype(np.int64))
    first = None
    for k in picks.tolist():
        try:
            decode_rgb(read_file(paths[k]))
            return
        except UnreadableImage as e:
            first = first or f"{paths[k]}: {e.reason}"
    some = "its" if len(picks) == len(paths) else f"{len(picks)} of its"
    raise BadInput(f"--folders {root}: none of {some} {len(paths)} images can be decoded ({first}); pass a folder of "
                   "image files (JPEG, PNG, PGM, ...)")
