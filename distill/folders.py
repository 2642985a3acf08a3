"""The one folder scanner: which files of a folder are images, and whose.

Every stage that reads a folder of faces goes through here, so they agree on what counts:
``distill listing`` (identity trees and flat folders), ``distill evaluate --folders`` and
``distill train --val-folders``. A file is an image by its extension (``IMAGE_EXTENSIONS``,
case-insensitive); anything else (``README``, ``.DS_Store``, ``Thumbs.db``, ``labels.csv``)
is skipped and counted, and hidden files and folders are skipped silently. Symlinked
sub-folders are not followed below an identity (an identity folder itself may be a link).

Two layouts:

- **identity tree** ``ROOT/NAME/...``: one sub-folder per identity, names sorted as plain
  strings; images found recursively below each (some packs nest by session or camera),
  ordered by their path relative to the identity folder, compared part by part as plain
  strings (``1.pgm, 10.pgm, 2.pgm``). Files directly in ROOT belong to no identity.
- **flat** ``ROOT/*.jpg``: no sub-folders, images directly in ROOT, no identities (the
  label-free case: distillation needs no labels), sorted by name.

A folder on an object store (``s3://bucket/faces``) follows the same rules: the listing lists
its keys once, recursively, and ``tree_of`` sorts them into the same layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Identities:
    """An identity tree: sorted identity names, each one's image paths, and what was left out."""

    root: str
    names: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]  # per identity, absolute paths in listing order
    loose: int  # images directly in ROOT: no identity
    skipped: int  # files that are not images (by extension), anywhere in the tree

    @property
    def images(self) -> int:
        return sum(len(f) for f in self.files)


def top_level(root: str) -> tuple[list[str], list[str], int]:
    """(sub-folder names, image file names, other files) directly in ``root``, sorted, hidden left out."""
    dirs, images, other = [], [], 0
    with os.scandir(root) as it:
        for e in it:
            if is_hidden(e.name):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif is_image_name(e.name):
                images.append(e.name)
            else:
                other += 1
    return sorted(dirs), sorted(images), other


def identity_images(folder: str) -> tuple[list[str], int]:
    """(image paths below one identity folder in listing order, non-image files skipped)."""
    found: list[tuple[list[str], str]] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        rel = os.path.relpath(dirpath, folder)
        parts = [] if rel == "." else rel.split(os.sep)
        for f in filenames:
            if is_hidden(f):
                continue
            if is_image_name(f):
                found.append((parts + [f], os.path.join(dirpath, f)))
            else:
                skipped += 1
    found.sort(key=lambda t: t[0])
    return [p for _, p in found], skipped


def scan_identities(root: str) -> Identities:
    """The identity tree below ``root`` (which must have sub-folders; see ``top_level``)."""
    root = os.path.abspath(root)
    names, loose, other = top_level(root)
    files, skipped = [], other
    for name in names:
        paths, s = identity_images(os.path.join(root, name))
        files.append(tuple(paths))
        skipped += s
    return Identities(root, tuple(names), tuple(files), len(loose), skipped)


def flat_images(root: str) -> tuple[list[str], int]:
    """(absolute paths of the images directly in ``root``, sorted by name; non-image files skipped)."""
    root = os.path.abspath(root)
    _, images, other = top_level(root)
    return [os.path.join(root, n) for n in images], other


# ---------------------------------------------------------------------------- on an object store


@dataclass(frozen=True)
class Tree:
    """A folder given as the relative paths of its files, sorted into the layout above."""

    names: tuple[str, ...]  # identity folders, sorted
    files: tuple[tuple[str, ...], ...]  # per identity, relative paths in listing order
    loose: tuple[str, ...]  # images directly in the root, sorted by name
    skipped: int  # files that are not images (by extension)


def tree_of(rels: Iterable[str]) -> Tree:
    """The layout of a tree known only by its files' relative paths (``a/b/c.jpg``), by the
    rules of a local folder: hidden parts left out, images by extension, identities by their
    top folder, each one's images ordered by path parts. A folder holding no image at all is
    still an identity (as a local one is) when it holds other files; one holding nothing has
    no keys on a store, so it is not there. Pure."""
    per: dict[str, list[tuple[list[str], str]]] = {}
    loose: list[str] = []
    skipped = 0
    for rel in rels:
        parts = rel.split("/")
        if any(is_hidden(p) for p in parts) or not parts[-1]:
            continue
        mine = per.setdefault(parts[0], []) if len(parts) > 1 else None
        if not is_image_name(parts[-1]):
            skipped += 1
        elif mine is None:
            loose.append(rel)
        else:
            mine.append((parts[1:], rel))
    names = sorted(per)
    files = tuple(tuple(rel for _, rel in sorted(per[n], key=lambda t: t[0])) for n in names)
    return Tree(tuple(names), files, tuple(sorted(loose)), skipped)

