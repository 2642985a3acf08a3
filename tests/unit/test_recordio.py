"""The pure-Python RecordIO reader/writer against dmlc-core's byte layout."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from distill.embed.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    dense_labels,
    identity_labels,
    pack,
    read_idx,
    split_payload,
    unpack,
    write_insightface_rec,
)


def _heads(rec_path: str) -> list[tuple[int, int, int]]:
    """(offset, cflag, length) of every physical record, walking the file like dmlc's reader."""
    data = open(rec_path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        out.append((pos, lrec >> 29, length))
        pos += 8 + ((length + 3) & ~3)
    return out


def _write(tmp_path, payloads):
    rec, idx = str(tmp_path / "t.rec"), str(tmp_path / "t.idx")
    with RecordIOWriter(rec, idx) as w:
        offsets = [w.write(k, p) for k, p in enumerate(payloads)]
    return rec, idx, offsets


def test_pack_unpack_single_and_multi_label():
    h, img = unpack(pack(IRHeader(0, 7.0, 42, 3), b"jpegbytes"))
    assert h == IRHeader(0, 7.0, 42, 3) and img == b"jpegbytes"
    h, img = unpack(pack(IRHeader(3, (1.0, 2.5, -4.0), 9, 0), b"\x01\x02"))
    assert h == IRHeader(3, (1.0, 2.5, -4.0), 9, 0) and img == b"\x01\x02"
    # mxnet's layout: flag is the label count and the header label slot is 0.
    raw = pack(IRHeader(2, (5.0, 6.0), 1, 0), b"")
    assert struct.unpack_from("<IfQQ2f", raw) == (2, 0.0, 1, 0, 5.0, 6.0)


def test_unpack_rejects_short_payloads():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="3 float labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)
    with pytest.raises(ValueError, match="flag=2"):
        pack(IRHeader(2, 1.0, 0, 0), b"")


def test_split_points_are_aligned_magic_words():
    assert split_payload(b"abcd" + MAGIC_BYTES + b"efg") == [(1, b"abcd"), (3, b"efg")]
    assert split_payload(b"ab") == [(0, b"ab")]
    # An unaligned magic is data, not a split point (dmlc scans aligned uint32 words).
    assert split_payload(b"a" + MAGIC_BYTES + b"bcd") == [(0, b"a" + MAGIC_BYTES + b"bcd")]


def test_writer_bytes_match_dmlc(tmp_path):
    payload = b"abcd" + MAGIC_BYTES + b"efg"
    rec, idx, offsets = _write(tmp_path, [b"xy", payload])
    data = open(rec, "rb").read()
    first = MAGIC_BYTES + struct.pack("<I", 2) + b"xy\0\0"
    second = (MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
              + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 3) + b"efg\0")
    assert data == first + second
    assert offsets == [0, len(first)]
    assert open(idx).read() == f"0\t0\n1\t{len(first)}\n"


@pytest.mark.parametrize("payload", [
    MAGIC_BYTES,                                   # nothing but the magic: two empty parts
    MAGIC_BYTES + b"tail",                         # magic first
    b"head" + MAGIC_BYTES,                         # magic last
    b"ab" * 2 + MAGIC_BYTES * 3 + b"xyz",           # runs of magic: first, middle parts, last
    b"wxyz" + MAGIC_BYTES + b"1234" + MAGIC_BYTES + b"56789",
    b"",
    b"odd",
])
def test_split_records_round_trip(tmp_path, payload):
    rec, idx, offsets = _write(tmp_path, [b"before", payload, b"after!!"])
    with RecordIOReader(rec) as r:
        assert [r.read_at(o) for o in offsets] == [b"before", payload, b"after!!"]
    n_magic = payload.count(MAGIC_BYTES)
    flags = [c for _, c, _ in _heads(rec)]
    if n_magic:
        assert flags[1:-1] == [1] + [2] * (n_magic - 1) + [3]
    else:
        assert flags == [0, 0, 0]


def test_split_jpeg_like_record_and_limit(tmp_path):
    # The magic sits at payload byte 28: aligned, so this image is split into cflag 1/3 parts.
    image = b"\xff\xd8\xff\xe0" + MAGIC_BYTES + bytes(range(256)) * 3
    payload = pack(IRHeader(0, 3.0, 1, 0), image)
    rec, _, (off,) = _write(tmp_path, [payload])
    assert [c for _, c, _ in _heads(rec)] == [1, 3]
    with RecordIOReader(rec) as r:
        assert r.read_at(off) == payload
        assert r.read_at(off, limit=30) == payload[:30]  # crosses the split point
        assert r.read_header(off) == IRHeader(0, 3.0, 1, 0)
        assert unpack(r.read_at(off))[1] == image


def test_read_header_many_labels(tmp_path):
    labels = tuple(float(i) for i in range(12))  # more than the first read covers
    rec, _, offsets = _write(tmp_path, [pack(IRHeader(12, labels, 5, 6), b"img"), pack(IRHeader(2, (1.0, 2.0), 7, 0), b"")])
    with RecordIOReader(rec) as r:
        assert r.read_header(offsets[0]) == IRHeader(12, labels, 5, 6)
        assert r.read_header(offsets[1]) == IRHeader(2, (1.0, 2.0), 7, 0)


def test_errors_name_path_offset_and_reason(tmp_path):
    payload = pack(IRHeader(0, 1.0, 0, 0), b"x" * 100)
    rec, _, offsets = _write(tmp_path, [payload, b"abcd" + MAGIC_BYTES + b"efgh"])
    size = os.path.getsize(rec)
    with RecordIOReader(rec) as r:
        with pytest.raises(RecordIOError, match=rf"{rec} @ offset {size + 8}: offset is past the end"):
            r.read_at(size + 8)
        with pytest.raises(RecordIOError, match=r"@ offset 4: bad magic"):
            r.read_at(4)
        with pytest.raises(RecordIOError, match="negative offset"):
            r.read_at(-1)
        second_part = _heads(rec)[2][0]
        with pytest.raises(RecordIOError, match="middle of a split record"):
            r.read_at(second_part)
    # Truncated: the file ends inside the first record's payload, then inside a record head.
    with open(rec, "r+b") as f:
        f.truncate(60)
    with RecordIOReader(rec) as r:
        with pytest.raises(RecordIOError, match=rf"{rec} @ offset 0: truncated record"):
            r.read_at(0)
    with open(rec, "r+b") as f:
        f.truncate(4)
    with RecordIOReader(rec) as r:
        with pytest.raises(RecordIOError, match="truncated record"):
            r.read_at(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RecordIOReader(str(tmp_path / "nope.rec"))


def test_split_record_missing_last_part(tmp_path):
    rec, _, (off,) = _write(tmp_path, [b"abcd" + MAGIC_BYTES + b"efgh"])
    first_len = 8 + 4
    with open(rec, "r+b") as f:
        f.truncate(first_len)
    with RecordIOReader(rec) as r:
        with pytest.raises(RecordIOError, match="truncated record"):
            r.read_at(off)


def test_reader_is_safe_across_threads(tmp_path):
    payloads = [pack(IRHeader(0, float(i), i, 0), bytes([i % 256]) * (i * 7 % 300) + MAGIC_BYTES * (i % 3))
                for i in range(200)]
    rec, _, offsets = _write(tmp_path, payloads)
    with RecordIOReader(rec) as r, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(r.read_at, offsets * 3))
    assert got == payloads * 3


def test_read_idx_chunks_match_whole(tmp_path):
    path = tmp_path / "x.idx"
    keys = np.arange(0, 3000, 3)
    offsets = keys * 1000 + 7
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets))
    path.write_text(text + "\n\n")  # trailing blank lines are ignored
    for block in (1024, 4096, 1 << 22):
        chunks = list(read_idx(str(path), block_bytes=block))
        assert np.array_equal(np.concatenate([k for k, _ in chunks]), keys)
        assert np.array_equal(np.concatenate([o for _, o in chunks]), offsets)
        if block == 1024:
            assert len(chunks) > 10
    path.write_text("0\t0\n1\t8")  # no final newline
    assert [k.tolist() for k, _ in read_idx(str(path))] == [[0], [1]]
    path.write_text("")
    assert list(read_idx(str(path))) == []


def test_read_idx_rejects_malformed(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_text("0\t0\n1\tnot-a-number\n")
    with pytest.raises(RecordIOError, match="not a RecordIO index"):
        list(read_idx(str(path)))
    path.write_text("0\t0\n1\t\n")
    with pytest.raises(RecordIOError, match="empty key or offset"):
        list(read_idx(str(path)))
    with pytest.raises(FileNotFoundError):
        list(read_idx(str(tmp_path / "missing.idx")))


def test_write_insightface_rec_layout(tmp_path):
    images = [[b"a0", b"a1"], [b"b0" + MAGIC_BYTES * 2], [b"c0", b"c1", b"c2"]]
    write_insightface_rec(str(tmp_path), images, height=112, width=96)
    assert (tmp_path / "property").read_text().strip() == "3,112,96"
    keys, offs = zip(*read_idx(str(tmp_path / "train.idx")))
    keys, offs = np.concatenate(keys), np.concatenate(offs)
    assert keys.tolist() == list(range(1 + 6 + 3))
    with RecordIOReader(str(tmp_path / "train.rec")) as r:
        by_key = dict(zip(keys.tolist(), offs.tolist()))
        h0, body = unpack(r.read_at(by_key[0]))
        assert (h0.flag, h0.label, body) == (2, (7.0, 10.0), b"")
        assert [unpack(r.read_at(by_key[7 + i]))[0].label for i in range(3)] == [(1.0, 3.0), (3.0, 4.0), (4.0, 7.0)]
        got = [unpack(r.read_at(by_key[k])) for k in range(1, 7)]
    assert [img for _, img in got] == [img for imgs in images for img in imgs]
    assert [h.label for h, _ in got] == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0]


def test_identity_labels():
    starts, ends = np.array([10, 1, 4]), np.array([12, 4, 10])  # identities need not be sorted
    keys = np.arange(1, 12)
    assert identity_labels(keys, starts, ends).tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="key 12 is in no identity"):
        identity_labels(np.array([12]), starts, ends)
    with pytest.raises(ValueError, match="overlapping"):
        identity_labels(keys, np.array([1, 3]), np.array([4, 6]))


def test_dense_labels():
    labels, distinct = dense_labels(np.array([3.0, 0.0, 3.0, 8.0]))
    assert labels.tolist() == [1, 0, 1, 2] and distinct.tolist() == [0.0, 3.0, 8.0]
    with pytest.raises(ValueError, match="not a whole number"):
        dense_labels(np.array([1.0, 2.5]))
