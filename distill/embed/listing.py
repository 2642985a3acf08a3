"""The listing stage: one Parquet row per image, saying its label and where to read it.

It owns turning a source into ``listing.parquet`` and hands that file to the plan and embed
stages: columns ``index`` (int64, 0..N-1, the row number), ``label`` (int64, 0..C-1), ``path``
(absolute path; null for .rec rows) and ``offset`` (byte offset of the record's magic in the
.rec; null for file rows), plus a ``distill.listing`` JSON footer (kind, source, rec, rows,
num_classes, label_names). Nothing is opened or decoded here: a bad image is listed like any
other file and the embed stage records it.

Sources:

- **folders**: ``ROOT/NAME/...``. Label = position of NAME among the sorted, non-hidden
  sub-folder names (an empty sub-folder still takes its label). Files are collected
  recursively below each identity folder (some packs nest by session or camera), hidden
  files and folders skipped, symlinked sub-folders not followed, and ordered by their path
  relative to the identity folder, compared as plain strings (``1.pgm, 10.pgm, 2.pgm``).
  Files directly in ROOT belong to no identity and are ignored.
- **list**: a text file of ``path<TAB>label`` lines (label an int >= 0, C = max label + 1)
  or bare ``path`` lines (label = the parent folder name, numbered by sorted unique names).
  Relative paths resolve against the list file's folder; blank lines and ``#`` lines are
  skipped. Rows keep the file's order.
- **rec**: insightface's ``train.rec`` (+ ``train.idx`` beside it), read in place. Record 0's
  labels ``[first, end)`` name the identity records, each of which gives its ``[start, end)``
  image keys: only those ~85k small records are read, so emore lists in seconds. A pack whose
  record 0 has ``flag == 0`` has no identity records; then every record's header label is
  read (one small read per image: minutes at emore scale) and the distinct labels are
  numbered in sorted order. Rows follow key order.

Memory stays bounded: ``train.idx`` and list files are streamed, and rows go to the Parquet
writer in row groups of ``row_group_rows``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from distill.errors import BadInput, BadOption
from distill.folders import Tree
from distill.options import add_options, config_from_args, option
from distill.outputs import LISTING, LISTING_FOOTER_KEY, check_output
from distill.shards.format import PARQUET_READ, UNLABELLED
from distill.storage import is_uri, local_path, make_dir

log = logging.getLogger(__name__)

FOOTER_KEY = LISTING_FOOTER_KEY
KINDS = ("folders", "flat", "list", "rec", "sources")  # "sources": several of the others, one after another
DEFAULT_ROW_GROUP_ROWS = 131072
FINGERPRINT_VERSION = "distill.listing.fingerprint/1"
_LIST_CHUNK = 65536  # list-file lines parsed per batch handed to the writer


@dataclass(frozen=True)
class ListingConfig:
    """The options of ``distill listing`` (the CLI is derived from these fields)."""

    sources: tuple[str, ...] = option(
        help="identity folders (ROOT/NAME/images), a flat folder of images (no identities: unlabelled), a list "
             "file (`path<TAB>label` or bare `path` lines, paths or URIs), or an insightface train.rec / its folder; "
             "each local or on an object store (s3://bucket/faces: a folder listed by its keys, a pack read in "
             "place by byte ranges); several sources are listed one after another with their label spaces kept "
             "apart",
        positional=True, metavar="SOURCE", path=True)
    out: str = option(help="output file, e.g. RUN/listing.parquet, or an object-store URI (written atomically)",
                      required=True, path=True, metavar="FILE")
    row_group_rows: int = option(DEFAULT_ROW_GROUP_ROWS, "rows per Parquet row group")
    idx_block_bytes: int = 1 << 22  # train.idx text parsed per chunk

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) or not self.sources:
            raise BadOption(f"sources is a non-empty tuple of paths, got {self.sources!r}")
        if self.row_group_rows < 1:
            raise BadOption(f"--row-group-rows must be >= 1, got {self.row_group_rows}")
        if self.idx_block_bytes < 1024:
            raise BadOption(f"idx_block_bytes must be >= 1024, got {self.idx_block_bytes}")


@dataclass(frozen=True)
class SourcePart:
    """One source of a listing: its rows ``[first_row, first_row + rows)`` and labels
    ``[label_offset, label_offset + num_classes)`` (none for an unlabelled source)."""

    kind: str
    source: str
    rows: int
    num_classes: int
    first_row: int = 0
    label_offset: int = 0
    unlabelled: int = 0  # rows with label UNLABELLED

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ListingInfo:
    kind: str
    source: str
    rec: str | None
    rows: int
    num_classes: int
    label_names: tuple[str, ...] | None
    unlabelled: int = 0  # rows with label UNLABELLED (-1)
    parts: tuple[SourcePart, ...] = ()  # several sources: each one's rows and labels

    @property
    def labelled(self) -> int:
        return self.rows - self.unlabelled

    def to_json(self) -> dict:
        d = {
            "kind": self.kind, "source": self.source, "rec": self.rec, "rows": self.rows,
            "num_classes": self.num_classes,
            "label_names": list(self.label_names) if self.label_names is not None else None,
        }
        if self.unlabelled:  # (absent in listings with every row labelled, as before)
            d["unlabelled"] = self.unlabelled
        if self.parts:
            d["parts"] = [p.to_json() for p in self.parts]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ListingInfo":
        names = d.get("label_names")
        return cls(d["kind"], d["source"], d.get("rec"), int(d["rows"]), int(d["num_classes"]),
                   tuple(names) if names is not None else None, int(d.get("unlabelled", 0)),
                   tuple(SourcePart(**p) for p in d.get("parts", ())))


@dataclass(frozen=True)
class ListingRows:
    """Rows ``[start, stop)`` of a listing; ``offset`` is -1 and ``path`` None where null."""

    index: np.ndarray
    label: np.ndarray
    path: list[str | None]
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class RecFiles:
    rec: str
    idx: str
    property: str | None


# ---------------------------------------------------------------------------- pure decisions

LIST_FORMATS = (
    "`path<TAB>label` (label an int; -1: no known identity)",
    "a bare `path` (label: its folder's name)",
    "insightface face2rec2 .lst: `aligned<TAB>path<TAB>label`, optionally followed by a bbox and 5 landmarks",
    "MXNet im2rec .lst: `index<TAB>label<TAB>path`",
)
DIALECTS = ("path", "path_label", "face2rec2", "im2rec")


def _is_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def list_dialect(line: str, lineno: int, where: str) -> str:
    """Which list format a data line is in (a file's first data line decides for the file). Pure."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) == 1:
        return "path"
    if len(fields) >= 3 and fields[0].strip() in ("0", "1") and _is_int(fields[2]) and not _is_number(fields[1]) \
            and len(fields) in (3, 7, 17) and all(_is_number(f) for f in fields[3:]):
        return "face2rec2"
    if len(fields) >= 3 and _is_int(fields[0]) and not _is_number(fields[-1]) and all(_is_number(f) for f in fields[1:-1]):
        if len(fields) > 3:
            raise BadInput(f"{where}:{lineno}: an im2rec line with {len(fields) - 2} labels; distill needs one identity "
                           "label per image (`index<TAB>label<TAB>path`)")
        return "im2rec"
    return "path_label"


def parse_list_line(line: str, lineno: int, where: str, dialect: str | None = None) -> tuple[str, int | None] | None:
    """``(path, label or None)`` of a data line in ``dialect`` (default: the line's own), None
    for a blank or ``#`` line. A line that does not fit is refused with its number and the
    formats the listing reads."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    dialect = dialect or list_dialect(text, lineno, where)
    fields = text.split("\t")
    if dialect == "path":
        if len(fields) != 1:
            raise BadInput(f"{where}:{lineno}: has a label but earlier lines do not; give every line a `<TAB>label`, "
                           "or none")
        return stripped, None
    if dialect == "path_label" and len(fields) == 1:
        raise BadInput(f"{where}:{lineno}: has no label but earlier lines do; give every line a `<TAB>label`, or none")
    if dialect == "face2rec2":
        if not (len(fields) in (3, 7, 17) and fields[0].strip() in ("0", "1")):
            raise _not_the_format(where, lineno, "a face2rec2 `aligned<TAB>path<TAB>label[...]` line, as the file's first")
        path, label = fields[1].strip(), fields[2].strip()
    elif dialect == "im2rec":
        if len(fields) != 3 or not _is_int(fields[0]):
            raise _not_the_format(where, lineno, "an im2rec `index<TAB>label<TAB>path` line, as the file's first")
        path, label = fields[2].strip(), fields[1].strip()
        if _is_number(label) and float(label).is_integer():
            label = str(int(float(label)))  # im2rec writes labels as floats: 3.000000
    else:
        path, _, label = text.rpartition("\t")  # (a path may hold tabs: the label is the last field)
        path, label = path.strip(), label.strip()
    if not path:
        raise BadInput(f"{where}:{lineno}: empty path; the listing reads " + "; ".join(LIST_FORMATS))
    try:
        value = int(label)
    except ValueError:
        raise BadInput(f"{where}:{lineno}: label {label!r} is not an integer; the listing reads "
                       + "; ".join(LIST_FORMATS)) from None
    if value < UNLABELLED:
        raise BadInput(f"{where}:{lineno}: label {value} is negative; labels are class numbers 0..C-1, "
                       f"or {UNLABELLED} for a face of no known identity")
    return path, value


def _not_the_format(where: str, lineno: int, expected: str) -> BadInput:
    return BadInput(f"{where}:{lineno}: not {expected}; one file holds one format. The listing reads "
                    + "; ".join(LIST_FORMATS))


def resolve_list_path(base: str, path: str) -> str:
    """A list entry as an absolute path or a URI: relative ones resolve against the list's
    folder (on a store, too); URIs are kept as written.

    Plain string work on the common cases; os.path only where ``.``/``..`` need collapsing
    (millions of lines pass through here).
    """
    if "://" in path:  # a URI: as written (file:// is a local path)
        return path[len("file://"):] if path.startswith("file://") else path
    if "://" in base and not path.startswith("/"):  # relative to a list on an object store
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(f'{rest}/{path}')}"
    if path.startswith("/"):
        return path if "/." not in path and "//" not in path else os.path.normpath(path)
    if path.startswith(".") or "/." in path or "//" in path:
        return os.path.normpath(f"{base}/{path}")
    return f"{base}/{path}"


def parent_name(path: str) -> str:
    """The name of the folder holding ``path`` (an absolute path): the label of a bare list line."""
    return path[: path.rfind("/")].rpartition("/")[2]


def looks_binary(head: bytes) -> bool:
    """True for the start of a file that is not a text list (an image, an archive, ...)."""
    if b"\0" in head:
        return True
    # Text lists hold tabs and newlines only; raw pixel data is full of other control bytes.
    control = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 13))
    return control > len(head) // 100


def covering_row_groups(starts: np.ndarray, start: int, stop: int) -> range:
    """Row groups holding rows ``[start, stop)``; ``starts`` = cumulative group starts + total."""
    if stop <= start:
        return range(0)
    first = int(np.searchsorted(starts, start, side="right")) - 1
    last = int(np.searchsorted(starts, stop, side="left")) - 1
    return range(first, last + 1)


# ---------------------------------------------------------------------------- source kinds

SOURCES_HELP = ("a folder of identity sub-folders, a flat folder of images (no identities), a list file of "
                "`path<TAB>label` lines, or an insightface train.rec (or its folder); local or on an object store")


def resolve_source(source: str) -> tuple[str, str, RecFiles | Tree | None]:
    """(kind, absolute source, what to list: rec files, a store folder's tree, or None).
    Touches the filesystem (or the store), decides nothing else."""
    from distill.folders import top_level
    from distill.storage import is_uri

    if is_uri(source):
        return _resolve_on_store(source.rstrip("/"))
    src = os.path.abspath(source)
    if not os.path.exists(src):
        raise FileNotFoundError(f"listing source {src} does not exist; give {SOURCES_HELP}")
    if os.path.isdir(src):
        rec = os.path.join(src, "train.rec")
        if os.path.isfile(rec):
            return "rec", src, _rec_files(rec)
        dirs, images, _ = top_level(src)
        if dirs:
            return "folders", src, None
        if images:
            return "flat", src, None
        raise BadInput(f"{src} has no sub-folders and no image files; give {SOURCES_HELP}")
    if src.endswith(".rec"):
        return "rec", src, _rec_files(src)
    if src.endswith(".idx") and os.path.isfile(src[: -len(".idx")] + ".rec"):
        raise BadInput(f"{src} is a RecordIO index; give the .rec beside it ({src[:-4]}.rec) or its folder")
    with open(src, "rb") as f:
        _refuse_binary(src, f.read(8192))
    return "list", src, None


def _refuse_binary(where: str, head: bytes) -> None:
    if looks_binary(head):
        raise BadInput(f"{where} is a binary file, not a list: give a folder of identity sub-folders, a text file "
                       "of `path<TAB>label` lines, or an insightface train.rec")


def _resolve_on_store(source: str) -> tuple[str, str, RecFiles | Tree | None]:
    """A source on an object store: a pack is read in place by byte ranges; a folder is listed
    by its keys (once, recursively); a list file is fetched to this machine's cache."""
    from distill.storage import redact, retrying, store_file_exists, store_kind

    where = redact(source)
    kind = retrying(lambda: store_kind(source), f"looking up {where}")
    if source.endswith(".rec") or (kind == "dir" and store_file_exists(f"{source}/train.rec")):
        return "rec", source, _rec_files_on_store(source)
    if kind is None:
        raise FileNotFoundError(f"listing source {where}: nothing there on the store; give {SOURCES_HELP}")
    if source.endswith(".idx") and store_file_exists(source[: -len(".idx")] + ".rec"):
        raise BadInput(f"{where} is a RecordIO index; give the .rec beside it or its folder")
    if kind == "file":
        _refuse_binary(where, retrying(lambda: _store_head(source), f"reading {where}"))
        return "list", source, None
    tree = _scan_store(source)
    if tree.names:
        return "folders", source, tree
    if tree.loose:
        return "flat", source, tree
    raise BadInput(f"{where} has no sub-folders and no image files; give {SOURCES_HELP}")


def _scan_store(root: str) -> Tree:
    """The layout of the folder ``root`` on an object store, by the local folder rules
    (``distill.folders.tree_of``), its paths made URIs again."""
    from distill.folders import tree_of
    from distill.storage import store_tree

    tree = tree_of(store_tree(root))
    return Tree(tree.names, tuple(tuple(f"{root}/{r}" for r in f) for f in tree.files),
                tuple(f"{root}/{r}" for r in tree.loose), tree.skipped)


def _store_head(uri: str, n: int = 8192) -> bytes:
    from distill.storage import open_store_file

    with open_store_file(uri) as f:
        return f.read_at(min(n, f.size()), 0)


def _rec_files_on_store(source: str) -> RecFiles:
    from distill.storage import redact, store_file_exists

    rec = source if source.endswith(".rec") else f"{source}/train.rec"
    if not store_file_exists(rec):
        raise FileNotFoundError(f"listing source {redact(source)}: no {redact(rec)}; on an object store a listing "
                                "reads an insightface pack (train.rec with train.idx beside it, or their folder)")
    idx = rec[: -len(".rec")] + ".idx"
    if not store_file_exists(idx):
        raise FileNotFoundError(f"{redact(rec)} needs its index beside it: expected {redact(idx)}")
    prop = rec.rpartition("/")[0] + "/property"
    return RecFiles(rec, idx, prop if store_file_exists(prop) else None)


def _rec_files(rec: str) -> RecFiles:
    idx = rec[: -len(".rec")] + ".idx"
    if not os.path.isfile(idx):
        raise FileNotFoundError(
            f"{rec} needs its index beside it: expected {idx} (insightface ships train.idx with "
            "train.rec; copy it into the same folder)"
        )
    prop = os.path.join(os.path.dirname(rec), "property")
    return RecFiles(rec, idx, prop if os.path.isfile(prop) else None)


def _bar(**kw):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and tests.
    return tqdm(mininterval=0.5, disable=None, **kw)


# ---------------------------------------------------------------------------- writing

class _ListingWriter:
    """Rows in, row groups of exactly ``row_group_rows`` out (the last may be short).

    A row has a path (a file) or an offset (a record of the listing's .rec): the other is null.
    Writes to a hidden temp sibling of ``out``; ``commit`` adds the footer, fsyncs and renames.
    """

    def __init__(self, out: str, row_group_rows: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from distill.storage import temp_name

        self.out = out
        self.rows = 0
        self._rgr = row_group_rows
        self._labels: list[np.ndarray] = []
        self._paths: list[str | None] = []
        self._offsets: list[np.ndarray] = []
        self._buffered = 0
        self._schema = pa.schema([
            pa.field("index", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("path", pa.string()),
            pa.field("offset", pa.int64()),
        ])
        self._tmp = os.path.join(os.path.dirname(out), temp_name(os.path.basename(out)))
        try:
            self._file = open(self._tmp, "wb")
        except OSError as e:  # (the temp file is ours; the user named --out)
            from distill.errors import storage_fix

            fix = storage_fix(e)
            raise BadOption(f"--out {out}: cannot write a file in {os.path.dirname(out)} ({e.strerror or e})"
                            + (f"; {fix}" if fix else "")) from None
        # Paths and offsets are (nearly) unique: a dictionary only costs time there. zstd makes
        # an emore listing ~16 MB instead of ~50.
        self._writer = pq.ParquetWriter(self._file, self._schema, use_dictionary=["label"], compression="zstd")

    @property
    def total(self) -> int:
        """Rows added so far, written or still buffered."""
        return self.rows + self._buffered

    def add(self, labels: np.ndarray, paths: list[str] | None = None, offsets: np.ndarray | None = None) -> None:
        """Rows of files (``paths``) or of records (``offsets``)."""
        n = len(labels)
        if not n:
            return
        self._labels.append(np.asarray(labels, dtype=np.int64))
        if offsets is not None:
            self._offsets.append(np.asarray(offsets, dtype=np.int64))
            self._paths.extend([None] * n)
        else:
            self._offsets.append(np.full(n, -1, np.int64))
            self._paths.extend(paths)
        self._buffered += n
        if self._buffered >= self._rgr:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        offsets = np.concatenate(self._offsets) if self._offsets else np.zeros(0, np.int64)
        paths = self._paths
        done = 0
        while len(labels) - done >= self._rgr or (final and done < len(labels)):
            n = min(self._rgr, len(labels) - done)
            sl = slice(done, done + n)
            table = pa.table({
                "index": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
                "label": pa.array(labels[sl]),
                "path": pa.array(paths[sl], pa.string()),
                "offset": pa.array(offsets[sl], mask=offsets[sl] < 0),
            }, schema=self._schema)
            self._writer.write_table(table, row_group_size=n)
            self.rows += n
            done += n
        self._labels = [labels[done:]]
        self._offsets = [offsets[done:]]
        self._paths = paths[done:]
        self._buffered = len(labels) - done

    def commit(self, info: ListingInfo) -> None:
        from distill.storage import fsync_dir

        self._flush(final=True)
        self._writer.add_key_value_metadata({FOOTER_KEY: json.dumps(info.to_json(), separators=(",", ":"))})
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out)
        fsync_dir(os.path.dirname(self.out))

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # already failed mid-write: the temp file is dropped either way
            pass
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


@dataclass(frozen=True)
class _Listed:
    """What listing one source gave: its classes, their names, its unlabelled rows."""

    num_classes: int
    names: tuple[str, ...] | None = None
    unlabelled: int = 0


def _list_folders(root: str, sink: _ListingWriter, offset: int) -> _Listed:
    from distill.folders import identity_images, top_level

    names, loose, skipped = top_level(root)
    if loose:
        log.info("ignoring %d image(s) directly in %s: they belong to no identity folder", len(loose), root)
    empty = 0
    with _bar(total=len(names), unit="id", desc="listing folders") as bar:
        for label, name in enumerate(names):
            files, s = identity_images(os.path.join(root, name))
            skipped += s
            empty += not files
            sink.add(np.full(len(files), offset + label, dtype=np.int64), files)
            bar.update(1)
    _say_empty(empty, len(names), root)
    _say_skipped(skipped, root)
    return _Listed(len(names), tuple(names))


def _list_tree(root: str, tree: Tree, sink: _ListingWriter, offset: int) -> _Listed:
    """A folder on an object store, already listed (``_scan_store``)."""
    from distill.storage import redact

    where = redact(root)
    if not tree.names:  # flat: every row unlabelled
        sink.add(np.full(len(tree.loose), UNLABELLED, dtype=np.int64), list(tree.loose))
        _say_skipped(tree.skipped, where)
        return _Listed(0, (), len(tree.loose))
    if tree.loose:
        log.info("ignoring %d image(s) directly in %s: they belong to no identity folder", len(tree.loose), where)
    for label, files in enumerate(tree.files):
        sink.add(np.full(len(files), offset + label, dtype=np.int64), list(files))
    _say_empty(sum(not f for f in tree.files), len(tree.names), where)
    _say_skipped(tree.skipped, where)
    return _Listed(len(tree.names), tree.names)


def _list_flat(root: str, sink: _ListingWriter) -> _Listed:
    """A folder of images with no identity sub-folders: every row unlabelled."""
    from distill.folders import flat_images

    files, skipped = flat_images(root)
    sink.add(np.full(len(files), UNLABELLED, dtype=np.int64), files)
    _say_skipped(skipped, root)
    return _Listed(0, (), len(files))


def _say_empty(empty: int, names: int, root: str) -> None:
    if empty:
        log.warning("%d of %d identity folders in %s hold no images; their labels stay reserved", empty, names, root)


def _say_skipped(skipped: int, root: str) -> None:
    if skipped:
        from distill.folders import IMAGE_EXTENSIONS

        log.info("skipped %d file(s) in %s that are not images (by extension: %s)", skipped, root,
                 " ".join(IMAGE_EXTENSIONS))


def _list_lines(path: str, base: str | None = None) -> Iterator[tuple[int, str, int | None]]:
    """(line number, absolute path, label or None) of every data line, in the format the
    file's first data line is in (``list_dialect``). Relative paths resolve against ``base``
    (default: the list's folder; for a list fetched from a store, its folder there)."""
    base = os.path.dirname(path) if base is None else base
    dialect = None
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if dialect is None and line.strip() and not line.strip().startswith("#"):
                dialect = list_dialect(line, lineno, path)
            parsed = parse_list_line(line, lineno, path, dialect)
            if parsed is None:
                continue
            p, label = parsed
            yield lineno, resolve_list_path(base, p), label


def _list_file(source: str, sink: _ListingWriter, offset: int) -> _Listed:
    from distill.mirror import local_file
    from distill.storage import is_uri

    # A list on a store: read from this machine's copy, its relative paths resolved on the store.
    path, base = (local_file(source, "SOURCE"), source.rpartition("/")[0]) if is_uri(source) else (source, None)
    lines = _list_lines(path, base)
    first = next(lines, None)
    lines.close()
    if first is None:
        return _Listed(0)
    names: tuple[str, ...] | None = None
    ids: dict[str, int] = {}
    if first[2] is None:
        # Label = parent folder name: the numbering needs every name first, so read twice.
        distinct = {parent_name(p) for _, p, _ in _list_lines(path, base)}
        names = tuple(sorted(distinct))
        ids = {n: i for i, n in enumerate(names)}
    top, unlabelled = -1, 0
    paths: list[str] = []
    labels: list[int] = []

    def flush() -> None:
        lab = np.asarray(labels, dtype=np.int64)
        sink.add(np.where(lab >= 0, lab + offset, UNLABELLED), paths)
        bar.update(len(paths))

    with _bar(unit="line", desc="listing file") as bar:
        for _, p, label in _list_lines(path, base):
            if label is None:
                label = ids[parent_name(p)]
            top = max(top, label)
            unlabelled += label == UNLABELLED
            paths.append(p)
            labels.append(label)
            if len(paths) >= _LIST_CHUNK:
                flush()
                paths, labels = [], []
        flush()
    return _Listed(len(names) if names is not None else top + 1, names, unlabelled)


def _read_property(path: str | None) -> int | None:
    if path is None:
        return None
    from distill.storage import is_uri, open_store_file

    try:
        if is_uri(path):
            with open_store_file(path) as f:
                return int(f.read().decode("ascii").strip().split(",")[0])
        with open(path, encoding="ascii") as f:
            return int(f.read().strip().split(",")[0])
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is not `num_classes,height,width`; ignoring it", path)
        return None


def _list_rec(files: RecFiles, sink: _ListingWriter, block_bytes: int, offset: int) -> _Listed:
    from distill.embed.recordio import InsightfacePack

    with InsightfacePack(files.rec, files.idx, block_bytes) as pack:
        with _bar(total=pack.images, unit="img", desc="listing records") as bar:
            for labels, offsets in pack.chunks():
                sink.add(np.asarray(labels, np.int64) + offset, offsets=offsets)
                bar.update(len(labels))
    declared = _read_property(files.property)
    if declared is not None and declared != pack.num_classes:
        log.warning("%s says %d classes but %s holds %d; the listing uses %d",
                    files.property, declared, files.rec, pack.num_classes, pack.num_classes)
    return _Listed(pack.num_classes)


# ---------------------------------------------------------------------------- entry points

def combined_names(parts: list[tuple[SourcePart, tuple[str, ...] | None]]) -> tuple[str, ...] | None:
    """The label names of a listing of several sources: each labelled source's names in label
    order, prefixed ``SOURCE/`` when more than one source has labels (names may repeat across
    sources); None when a labelled source has no names (integer labels). Pure."""
    labelled = [(part, names) for part, names in parts if part.num_classes]
    if any(names is None for _, names in labelled):
        return None
    if len(labelled) == 1:
        return labelled[0][1]
    out: list[str] = []
    for part, names in labelled:
        prefix = os.path.basename(part.source.rstrip("/")) or part.source
        out.extend(f"{prefix}/{n}" for n in names)
    return tuple(out)


def _list_one(kind: str, source: str, found: RecFiles | Tree | None, sink: _ListingWriter, cfg: ListingConfig,
              offset: int) -> _Listed:
    if isinstance(found, Tree):
        return _list_tree(source, found, sink, offset)
    if kind == "folders":
        return _list_folders(source, sink, offset)
    if kind == "flat":
        return _list_flat(source, sink)
    if kind == "list":
        return _list_file(source, sink, offset)
    return _list_rec(found, sink, cfg.idx_block_bytes, offset)


def build_listing(cfg: ListingConfig) -> ListingInfo:
    """Write the listing of ``cfg.sources`` to ``cfg.out`` atomically; return its footer info.

    Several sources are listed one after another: their rows in the order given, their label
    spaces apart (each source's labels follow the previous sources' classes), the rows of an
    unlabelled source (a flat folder) marked ``UNLABELLED``.
    """
    resolved = [resolve_source(src) for src in cfg.sources]
    recs = [r.rec for _, _, r in resolved if isinstance(r, RecFiles)]
    if len(recs) > 1:
        raise BadOption(f"a listing reads at most one .rec pack, got {len(recs)} ({', '.join(recs)}); list each "
                        "pack on its own, or unpack all but one into folders")
    if len({src for _, src, _ in resolved}) < len(resolved):
        raise BadOption(f"a source is given twice: {' '.join(cfg.sources)}; each image must be listed once")
    check_output(cfg.out, LISTING, [("SOURCE", src) for _, src, _ in resolved])
    out = _local_out(cfg.out)
    sink = _ListingWriter(out, cfg.row_group_rows)
    try:
        parts: list[tuple[SourcePart, tuple[str, ...] | None]] = []
        classes = 0
        for kind, source, found in resolved:
            first = sink.total
            listed = _list_one(kind, source, found, sink, cfg, classes)
            rows = sink.total - first
            if rows == 0:
                raise BadInput(f"listing of {source} is empty: no image files or records found there; check the "
                               "path (folders need ROOT/NAME/images or ROOT/images, lists need non-comment lines)")
            parts.append((SourcePart(kind, source, rows, listed.num_classes, first, classes, listed.unlabelled),
                          listed.names))
            classes += listed.num_classes
        info = _info(parts, recs[0] if recs else None, sink.total)
        sink.commit(info)
    except BaseException:
        sink.abort()
        raise
    if is_uri(cfg.out):  # --out on a store: the finished file, as one object
        from distill.storage import redact, retrying, upload_file

        retrying(lambda: upload_file(out, cfg.out), f"writing {redact(cfg.out)}")
    return info


def _local_out(out: str) -> str:
    """Where the listing is written: ``--out`` itself, or for a store URI this machine's copy of
    it (uploaded whole when finished)."""
    from distill.mirror import cache_dir
    from distill.storage import is_uri

    if is_uri(out):
        local = os.path.join(cache_dir(out.rpartition("/")[0], "write"), out.rpartition("/")[2])
    else:
        local = local_path(out, "--out")
        if os.path.isdir(local):
            raise BadOption(f"--out {local} is a directory; give a file path such as "
                            f"{os.path.join(local, 'listing.parquet')}")
    make_dir(os.path.dirname(local))
    return local


def _info(parts: list[tuple[SourcePart, tuple[str, ...] | None]], rec: str | None, rows: int) -> ListingInfo:
    unlabelled = sum(p.unlabelled for p, _ in parts)
    classes = sum(p.num_classes for p, _ in parts)
    if len(parts) == 1:
        (part, names), = parts
        return ListingInfo(part.kind, part.source, rec, rows, classes, names or None, unlabelled)
    return ListingInfo("sources", " ".join(p.source for p, _ in parts), rec, rows, classes,
                       combined_names(parts), unlabelled, tuple(p for p, _ in parts))


def read_listing_info(path: str) -> ListingInfo:
    """The footer of a listing (reads the Parquet footer only)."""
    import pyarrow.parquet as pq

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"listing {path} does not exist; make it with `distill listing SOURCE --out {path}`")
    try:
        meta = pq.read_metadata(path).metadata or {}
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a non-Parquet file
        raise BadInput(f"{path} is not a Parquet file ({e}); make a listing with `distill listing`") from None
    raw = meta.get(FOOTER_KEY.encode())
    if raw is None:
        raise BadInput(f"{path} has no `{FOOTER_KEY}` footer: it is not a distill listing; "
                         "make one with `distill listing SOURCE --out PATH`")
    info = ListingInfo.from_json(json.loads(raw))
    if info.kind not in KINDS:
        raise BadInput(f"{path} is a listing of unknown kind {info.kind!r} (this version knows {', '.join(KINDS)}); "
                         "rebuild it with this version's `distill listing`")
    return info


def _update_strings(h_valid, h_len, h_data, column) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h_valid.update(arr.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
    filled = pc.fill_null(arr, "").cast(pa.large_string())
    _, offsets_buf, data_buf = filled.buffers()
    offsets = np.frombuffer(offsets_buf, dtype="<i8")[filled.offset: filled.offset + len(filled) + 1]
    h_len.update(np.diff(offsets).astype("<i8").tobytes())
    if data_buf is not None and len(offsets) and offsets[-1] > offsets[0]:
        h_data.update(memoryview(data_buf)[int(offsets[0]): int(offsets[-1])])


def listing_fingerprint(path: str) -> str:
    """sha256 over the listing's values (not its bytes): stable across pyarrow versions.

    Each column is hashed in its own stream, so the result does not depend on row groups.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    info = read_listing_info(path)
    pf = pq.ParquetFile(path)
    h = {k: hashlib.sha256() for k in ("index", "label", "offset", "path_valid", "path_len", "path_data")}
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=["index", "label", "path", "offset"], **PARQUET_READ)
        h["index"].update(t.column("index").to_numpy().astype("<i8").tobytes())
        h["label"].update(t.column("label").to_numpy().astype("<i8").tobytes())
        h["offset"].update(pc.fill_null(t.column("offset"), -1).to_numpy().astype("<i8").tobytes())
        _update_strings(h["path_valid"], h["path_len"], h["path_data"], t.column("path"))
    final = hashlib.sha256(f"{FINGERPRINT_VERSION}\0{info.kind}\0".encode())
    for k in ("index", "label", "offset", "path_valid", "path_len", "path_data"):
        final.update(h[k].digest())
    return final.hexdigest()


class ListingReader:
    """Random access to listing rows; reads only the row groups a range covers.

    The embed driver asks for one shard at a time, usually several shards per row group, so
    the last few decoded row groups are kept.
    """

    _CACHE = 4

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = os.path.abspath(path)
        self.info = read_listing_info(self.path)
        self._pf = pq.ParquetFile(self.path)
        md = self._pf.metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.num_rows = int(self._starts[-1])
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_rows

    def _group(self, g: int):
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        t = self._pf.read_row_group(g, columns=["index", "label", "path", "offset"], **PARQUET_READ)
        self._cache[g] = t
        if len(self._cache) > self._CACHE:
            self._cache.popitem(last=False)
        return t

    def rows(self, start: int, stop: int) -> ListingRows:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"rows [{start}, {stop}) are outside {self.path} (rows 0..{self.num_rows})")
        groups = covering_row_groups(self._starts, start, stop)
        with self._lock:
            tables = [self._group(g) for g in groups]
        if not tables:
            return ListingRows(np.zeros(0, np.int64), np.zeros(0, np.int64), [], np.zeros(0, np.int64))
        t = pa.concat_tables(tables).slice(start - int(self._starts[groups[0]]), stop - start)
        return ListingRows(
            index=t.column("index").to_numpy(),
            label=t.column("label").to_numpy(),
            path=t.column("path").to_pylist(),
            offset=pc.fill_null(t.column("offset"), -1).to_numpy(),
        )

    def __reduce__(self):
        # Ship the path, not the open file: a Ray task or actor reopens it where it runs.
        return (ListingReader, (self.path,))

    def close(self) -> None:
        self._cache.clear()
        self._pf.close()

    def __enter__(self) -> "ListingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "listing",
        help="list every image of one or more sources: index, label, where to read it",
        description=(
            "Write a listing Parquet (index, label, path, offset) of SOURCE...: folders with one sub-folder per "
            "identity, flat folders of images (unlabelled: label -1), text files of `path<TAB>label` or bare "
            "`path` lines, or an insightface train.rec (the .rec path or its folder; train.idx must be beside it)."
        ),
    )
    add_options(p, ListingConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from distill.storage import is_uri, redact

    cfg = config_from_args(ListingConfig, args)
    t0 = time.perf_counter()
    info = build_listing(cfg)
    labels = f"{info.num_classes} classes" + (f", {info.unlabelled} rows unlabelled" if info.unlabelled else "")
    where = redact(cfg.out) if is_uri(cfg.out) else os.path.abspath(cfg.out)
    print(f"listing: {info.kind}, {info.rows} rows, {labels}, {time.perf_counter() - t0:.1f} s -> {where}")
    for part in info.parts:
        what = f"labels {part.label_offset}..{part.label_offset + part.num_classes - 1}" if part.num_classes else "unlabelled"
        print(f"  {part.kind:<8} {part.rows:>9} rows  {what:<24} {part.source}")
    return 0
