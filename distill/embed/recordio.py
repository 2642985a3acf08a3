"""MXNet RecordIO (``train.rec`` + ``train.idx``) in pure Python: no mxnet, no unpacking.

The listing stage gets (label, offset) per image from ``InsightfacePack``, which reads
``train.idx`` and only the header and identity records; the embed stage reads one image
record per row with ``RecordIOReader.read_at``. Writing is
here too (``RecordIOWriter``, ``write_insightface_rec``) so tests, benchmarks and the demo can
make real packs byte-compatible with dmlc-core's writer.

Format (dmlc-core ``recordio.h``, mxnet ``recordio.py``): each record is uint32 magic
``0xCED7230A`` (LE), uint32 ``lrec`` (``cflag = lrec >> 29``, ``length = lrec & (2**29-1)``),
then ``length`` payload bytes zero-padded to a multiple of 4. dmlc splits a payload wherever
an aligned 4-byte word equals the magic (so a reader resynchronising on magic words never
lands inside data): cflag 1/2/3 are the first/middle/last parts, and the reader puts the magic
word back between them. The payload starts with the ``<IfQQ`` header (flag, label, id, id2);
``flag > 0`` means ``flag`` float32 labels follow it, and the image bytes come after that.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from distill.errors import BadInput

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
MAX_LENGTH = LENGTH_MASK
HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes
RECORD_HEAD = struct.Struct("<II")  # magic, lrec
# First read of a record: its 8-byte head plus enough payload that a small record (a header
# or identity record, 24-40 bytes) needs no second system call.
_FIRST_READ = 8 + 248


class RecordIOError(BadInput):
    """A record that cannot be read; the message names the file, the offset and why."""


@dataclass(frozen=True)
class IRHeader:
    """mxnet's ``IRHeader``. ``label`` is a float when ``flag == 0``, else ``flag`` floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its header and the image bytes (like ``mx.recordio.unpack``)."""
    if len(payload) < HEADER.size:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than the {HEADER.size}-byte IRHeader")
    flag, label, id_, id2 = HEADER.unpack_from(payload)
    start = HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise RecordIOError(
                f"IRHeader says {flag} float labels follow it, but the payload has only {len(payload)} bytes"
            )
        labels = struct.unpack_from(f"<{flag}f", payload, start)
        return IRHeader(flag, tuple(float(x) for x in labels), id_, id2), payload[end:]
    return IRHeader(0, float(label), id_, id2), payload[start:]


def pack(header: IRHeader, image: bytes) -> bytes:
    """Inverse of ``unpack``. Like mxnet, a sequence label sets ``flag`` to its length."""
    if isinstance(header.label, (int, float)):
        if header.flag != 0:
            raise ValueError(f"IRHeader flag={header.flag} needs a sequence of {header.flag} labels, got one number")
        return HEADER.pack(0, float(header.label), header.id, header.id2) + bytes(image)
    labels = tuple(float(x) for x in header.label)
    if not labels:
        raise ValueError("an IRHeader label sequence must hold at least one label (use a number for flag 0)")
    return HEADER.pack(len(labels), 0.0, header.id, header.id2) + struct.pack(f"<{len(labels)}f", *labels) + bytes(image)


def split_payload(payload: bytes) -> list[tuple[int, bytes]]:
    """The (cflag, part) pieces dmlc writes for a payload: split at every aligned magic word.

    Pure. Only 4-byte-aligned words are checked, as dmlc does (it scans the payload as uint32s).
    """
    words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    if not cuts:
        return [(0, payload)]
    parts, start = [], 0
    for i, cut in enumerate(cuts):
        parts.append((1 if i == 0 else 2, payload[start:cut]))
        start = cut + 4
    parts.append((3, payload[start:]))
    return parts


def _padded(n: int) -> int:
    return (n + 3) & ~3


class RecordIOReader:
    """Random access to one ``.rec`` file by record offset.

    Reads use ``os.pread`` (no shared file position), so one reader can serve several decode
    threads at once, as the embed worker does.
    """

    def __init__(self, path: str):
        from distill.storage import is_uri, open_store_file

        self._fd, self._file = -1, None
        self._lock = threading.Lock()
        if is_uri(path):  # on an object store: each read is one ranged GET
            self.path = path
            try:
                self._file = open_store_file(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"RecordIO file {path} does not exist") from None
            self._size = self._file.size()
            return
        self.path = os.path.abspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"RecordIO file {self.path} does not exist") from None
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def _error(self, offset: int, why: str) -> RecordIOError:
        return RecordIOError(f"{self.path} @ offset {offset}: {why}")

    def _pread(self, n: int, at: int) -> bytes:
        if self._file is not None:
            return self._file.read_at(min(n, max(0, self._size - at)), at)
        if self._fd < 0:
            raise ValueError(f"RecordIOReader for {self.path} is closed")
        return os.pread(self._fd, n, at)

    def _part_head(self, pos: int, record: int, first: bytes | None = None) -> tuple[int, int, bytes]:
        """(cflag, length, bytes already read after the 8-byte head) of the part at ``pos``."""
        head = first if first is not None else self._pread(_FIRST_READ, pos)
        if len(head) < 8:
            raise self._error(record, f"truncated record: the file ({self._size} bytes) ends inside the "
                                      f"8-byte record head expected at byte {pos}")
        magic, lrec = RECORD_HEAD.unpack_from(head)
        if magic != MAGIC:
            raise self._error(record, f"bad magic 0x{magic:08X} at byte {pos} (expected 0x{MAGIC:08X}); "
                                      "the offset is not the start of a record, or the file is corrupt")
        return lrec >> 29, lrec & LENGTH_MASK, head[8:]

    def read_at(self, offset: int, limit: int | None = None) -> bytes:
        """The payload of the record whose magic is at ``offset``, split parts joined.

        With ``limit``, stop once that many payload bytes are read (headers without images).
        """
        offset = int(offset)
        if offset < 0:
            raise self._error(offset, "negative offset")
        if offset >= self._size:
            raise self._error(offset, f"offset is past the end of the file ({self._size} bytes)")
        out = bytearray()
        pos = offset
        part = 0
        while True:
            cflag, length, got = self._part_head(pos, offset)
            if part == 0 and cflag not in (0, 1):
                raise self._error(offset, f"record starts with cflag {cflag}: the offset points into the "
                                          "middle of a split record")
            if part > 0 and cflag not in (2, 3):
                raise self._error(offset, f"split record continues with cflag {cflag} at byte {pos} (expected 2 or 3)")
            want = length if limit is None else min(length, max(0, limit - len(out)))
            if pos + 8 + length > self._size:
                raise self._error(offset, f"truncated record: part at byte {pos} needs {length} payload bytes, "
                                          f"the file ends {self._size - pos - 8} bytes after its head")
            data = got[:want]
            if len(data) < want:
                data += self._pread(want - len(data), pos + 8 + len(data))
            if len(data) < want:
                raise self._error(offset, f"truncated record: short read at byte {pos + 8}")
            out += data
            if cflag in (0, 3):
                return bytes(out)
            out += MAGIC_BYTES  # the word the writer split at
            if limit is not None and len(out) >= limit:
                return bytes(out[:limit])
            pos += 8 + _padded(length)
            part += 1

    def read_header(self, offset: int) -> IRHeader:
        """Only the IRHeader (and its labels) of a record: tens of bytes, not the image."""
        # One read covers the header and up to 8 labels (insightface uses 2); more need a second.
        want = HEADER.size + 32
        prefix = self.read_at(offset, limit=want)
        if len(prefix) < HEADER.size:
            raise self._error(offset, f"payload of {len(prefix)} bytes is shorter than the {HEADER.size}-byte IRHeader")
        flag = HEADER.unpack_from(prefix)[0]
        if HEADER.size + 4 * flag > want and len(prefix) == want:
            prefix = self.read_at(offset, limit=HEADER.size + 4 * flag)
        try:
            header, _ = unpack(prefix)
        except RecordIOError as e:
            raise self._error(offset, str(e)) from None
        return header

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._file is not None:
                self._file.close()

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx`` exactly as dmlc-core/mxnet ``MXIndexedRecordIO`` do."""

    def __init__(self, rec_path: str, idx_path: str):
        self.rec_path = rec_path
        self.idx_path = idx_path
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w", encoding="ascii", newline="\n")

    def write(self, key: int, payload: bytes) -> int:
        """Append one record; returns the byte offset of its first magic word (the idx value)."""
        if len(payload) > MAX_LENGTH:
            raise ValueError(f"a RecordIO payload is at most {MAX_LENGTH} bytes, got {len(payload)}")
        offset = self._rec.tell()
        for cflag, part in split_payload(bytes(payload)):
            self._rec.write(RECORD_HEAD.pack(MAGIC, (cflag << 29) | len(part)))
            self._rec.write(part)
            self._rec.write(b"\0" * (_padded(len(part)) - len(part)))
        self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def close(self) -> None:
        for f in (self._rec, self._idx):
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_idx(path: str, block_bytes: int = 1 << 22) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``key<TAB>offset`` lines as (keys, offsets) int64 chunks, in file order.

    Bounded memory at any size (emore's index is 5.9M lines, 99 MB): ``block_bytes`` of text
    are cut at the last newline and parsed at a time. (pyarrow's ``open_csv`` stream reads
    ahead over the whole file, so it is not used here.)
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from distill.storage import is_uri, open_store_file

    if is_uri(path):
        try:
            opened = open_store_file(path)  # (read front to back in blocks)
        except FileNotFoundError:
            raise FileNotFoundError(f"RecordIO index {path} does not exist") from None
    else:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"RecordIO index {path} does not exist")
        opened = open(path, "rb")
    read_opts = pacsv.ReadOptions(column_names=["key", "offset"], use_threads=False, block_size=2 * block_bytes + 64)
    parse_opts = pacsv.ParseOptions(delimiter="\t")
    convert_opts = pacsv.ConvertOptions(column_types={"key": pa.int64(), "offset": pa.int64()})

    def parse(text: bytes, at: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not text.strip():
            return None
        try:
            t = pacsv.read_csv(pa.py_buffer(text), read_options=read_opts, parse_options=parse_opts,
                               convert_options=convert_opts)
        except pa.ArrowInvalid as e:
            raise RecordIOError(f"{path}: not a RecordIO index of `key<TAB>offset` lines "
                                f"(in the block starting at byte {at}): {e}") from None
        keys, offsets = t.column(0), t.column(1)
        if keys.null_count or offsets.null_count:
            raise RecordIOError(f"{path}: a line near byte {at} has an empty key or offset; "
                                "expected `key<TAB>offset` lines")
        return keys.to_numpy(), offsets.to_numpy()

    with opened as f:
        rest, at = b"", 0
        while True:
            block = f.read(block_bytes)
            if not block:
                break
            text = rest + block
            cut = text.rfind(b"\n") + 1
            rest = text[cut:]
            if cut:
                chunk = parse(text[:cut], at)
                at += cut
                if chunk is not None:
                    yield chunk
        if rest:
            chunk = parse(rest + b"\n", at)
            if chunk is not None:
                yield chunk


def write_insightface_rec(
    folder: str,
    images_by_identity: Sequence[Sequence[bytes | Callable[[], bytes]]],
    height: int = 112,
    width: int = 112,
) -> None:
    """Write ``train.rec``/``train.idx``/``property`` in insightface's layout.

    Key 0 is the header record (labels ``[first_identity_key, end_identity_key]``), keys
    1..N the images (label = identity, in identity order), then one record per identity
    whose labels are its ``[start, end)`` image keys. An image may be a callable that returns
    its bytes: it is read only when packed.
    """
    os.makedirs(folder, exist_ok=True)
    n = sum(len(imgs) for imgs in images_by_identity)
    first, end = n + 1, n + 1 + len(images_by_identity)
    with RecordIOWriter(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")) as w:
        w.write(0, pack(IRHeader(2, (float(first), float(end)), 0, 0), b""))
        key = 1
        ranges = []
        for label, imgs in enumerate(images_by_identity):
            start = key
            for img in imgs:
                w.write(key, pack(IRHeader(0, float(label), key, 0), img() if callable(img) else img))
                key += 1
            ranges.append((start, key))
        for i, (start, stop) in enumerate(ranges):
            w.write(first + i, pack(IRHeader(2, (float(start), float(stop)), first + i, 0), b""))
    with open(os.path.join(folder, "property"), "w", encoding="ascii") as f:
        f.write(f"{len(images_by_identity)},{height},{width}\n")


# ---------------------------------------------------------------------------- insightface packs

def identity_labels(keys: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Label (identity ordinal) of each image key, from the identities' ``[start, end)`` key ranges.

    Raises ValueError for ranges that overlap or a key no range covers.
    """
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    if np.any(e < s):
        bad = int(order[np.flatnonzero(e < s)[0]])
        raise BadInput(f"identity {bad} has a key range [{int(starts[bad])}, {int(ends[bad])}) that ends before it starts")
    if len(s) > 1 and np.any(s[1:] < e[:-1]):
        i = int(np.flatnonzero(s[1:] < e[:-1])[0])
        raise BadInput(f"identities {int(order[i])} and {int(order[i + 1])} claim overlapping image keys")
    pos = np.searchsorted(s, keys, side="right") - 1
    ok = pos >= 0
    ok[ok] = keys[ok] < e[pos[ok]]
    if not np.all(ok):
        key = int(keys[np.flatnonzero(~ok)[0]])
        raise BadInput(f"image key {key} is in no identity's [start, end) range")
    return order[pos].astype(np.int64)


def dense_labels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number distinct integral label values 0..C-1 in sorted order: (labels, distinct values)."""
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        bad = values[~(np.isfinite(values) & (values == np.round(values)))][0]
        raise BadInput(f"record label {bad!r} is not a whole number; class labels must be integers")
    distinct = np.unique(values)
    return np.searchsorted(distinct, values).astype(np.int64), distinct


def check_increasing(keys: np.ndarray, previous: int, where: str) -> None:
    """Keys must rise strictly through train.idx: that is key order, and no key twice."""
    if len(keys) and (keys[0] <= previous or np.any(np.diff(keys) <= 0)):
        raise BadInput(
            f"{where}: keys are not strictly increasing (a key repeats or goes back); "
            "rows follow key order, so rewrite the index sorted by key: sort -n -k1,1 -u"
        )


def find_key(idx: str, key: int, block_bytes: int = 1 << 22) -> int | None:
    """The offset of ``key`` in an index, stopping at the first block that holds it."""
    for keys, offsets in read_idx(idx, block_bytes):
        hit = np.flatnonzero(keys == key)
        if len(hit):
            return int(offsets[hit[0]])
    return None


def _bar(**kw):
    from tqdm import tqdm

    return tqdm(mininterval=0.5, disable=None, **kw)  # disable=None: only on a terminal


class InsightfacePack:
    """``train.rec`` + ``train.idx`` read as insightface's dataset does: a label per image.

    Construction reads what decides the labels: record 0 and, in the insightface layout, the
    identity records (~85k small reads for emore: seconds). A pack whose record 0 has flag 0
    (or no key 0) has no identity records: then every record's header label is read up front
    (one small read per image, and 4 bytes per image kept) and the distinct values are
    numbered 0..C-1 in sorted order. ``chunks()`` then streams (labels, offsets) in key order.
    """

    def __init__(self, rec: str, idx: str, block_bytes: int = 1 << 22):
        from distill.storage import is_uri

        self.rec, self.idx = (p if is_uri(p) else os.path.abspath(p) for p in (rec, idx))
        self.block_bytes = block_bytes
        self._reader = RecordIOReader(self.rec)
        try:
            off0 = find_key(self.idx, 0, block_bytes)
            header0 = self._reader.read_header(off0) if off0 is not None else None
            self.identity_records = header0 is not None and header0.flag > 0
            if self.identity_records:
                self._read_identities(header0)
            else:
                log.info("%s has no insightface header record (record 0 has flag 0, or no key 0): reading "
                         "every record's header label, one small read per image", self.rec)
                self._read_all_labels()
        except BaseException:
            self.close()
            raise

    def _read_identities(self, header0: IRHeader) -> None:
        if header0.flag < 2:
            raise BadInput(f"{self.rec}: record 0 has {header0.flag} label(s); an insightface header record "
                             "has 2: [first_identity_key, end_identity_key]")
        first, end = int(header0.label[0]), int(header0.label[1])
        if not 1 <= first <= end:
            raise BadInput(f"{self.rec}: header record 0 gives identity keys [{first}, {end}); "
                             "expected 1 <= first <= end")
        # The offsets of the identity records only: a few per cent of the index.
        found_keys, found_offsets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for keys, offsets in read_idx(self.idx, self.block_bytes):
            m = (keys >= first) & (keys < end)
            found_keys.append(keys[m])
            found_offsets.append(offsets[m])
        id_keys, id_offsets = np.concatenate(found_keys), np.concatenate(found_offsets)
        order = np.argsort(id_keys, kind="stable")
        id_keys, id_offsets = id_keys[order], id_offsets[order]
        expected = np.arange(first, end, dtype=np.int64)
        if len(id_keys) != len(expected) or np.any(id_keys != expected):
            missing = np.setdiff1d(expected, id_keys)
            what = f"key {int(missing[0])} is missing" if len(missing) else "an identity key repeats"
            raise BadInput(f"{self.idx}: header record 0 promises identity records {first}..{end - 1} but "
                             f"{what}; the index does not belong to this train.rec, or is truncated")
        self._starts = np.empty(len(expected), np.int64)
        self._ends = np.empty(len(expected), np.int64)
        with _bar(total=len(expected), unit="id", desc="identity records") as bar:
            for i, off in enumerate(id_offsets.tolist()):
                h = self._reader.read_header(off)
                if h.flag < 2:
                    raise BadInput(f"{self.rec} @ offset {off}: identity record {first + i} has {h.flag} "
                                     "label(s); expected 2: its [start, end) image keys")
                self._starts[i], self._ends[i] = int(h.label[0]), int(h.label[1])
                if i % 4096 == 4095:  # per-record bar updates would cost more than the reads
                    bar.update(4096)
            bar.update(len(expected) % 4096)
        self._first = first
        self.num_classes = end - first
        self.images: int | None = first - 1

    def _read_all_labels(self) -> None:
        values = [np.zeros(0, np.float32)]
        previous = -1
        with _bar(unit="img", desc="record labels") as bar:
            for keys, offsets in read_idx(self.idx, self.block_bytes):
                check_increasing(keys, previous, self.idx)
                if len(keys):
                    previous = int(keys[-1])
                chunk = np.empty(len(offsets), np.float32)
                for i, off in enumerate(offsets.tolist()):
                    h = self._reader.read_header(off)
                    chunk[i] = h.label[0] if h.flag > 0 else h.label  # insightface takes the first label
                values.append(chunk)
                bar.update(len(chunk))
        self._labels, distinct = dense_labels(np.concatenate(values).astype(np.float64))
        if len(distinct) and (distinct[0] != 0 or distinct[-1] != len(distinct) - 1):
            log.info("record labels %g..%g are not 0..C-1: numbered 0..%d in sorted order",
                     distinct[0], distinct[-1], len(distinct) - 1)
        self.num_classes = len(distinct)
        self.images = len(self._labels)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels int64, record offsets int64) of the images, in key order, a block at a time."""
        previous, done = 0, 0
        for keys, offsets in read_idx(self.idx, self.block_bytes):
            if not self.identity_records:
                yield self._labels[done: done + len(keys)], offsets
                done += len(keys)
                continue
            m = (keys >= 1) & (keys < self._first)  # images are keys 1..first-1
            keys, offsets = keys[m], offsets[m]
            check_increasing(keys, previous, self.idx)
            if len(keys):
                previous = int(keys[-1])
                try:
                    labels = identity_labels(keys, self._starts, self._ends)
                except ValueError as e:
                    raise BadInput(f"{self.rec}: {e}; its identity records do not cover its images") from None
                yield labels, offsets

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "InsightfacePack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
