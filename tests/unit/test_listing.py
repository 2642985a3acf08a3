"""The listing stage: folders, list files and insightface .rec packs -> listing.parquet."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ORL as ORL_DIR

from distill.embed.listing import (
    FOOTER_KEY,
    UNLABELLED,
    ListingConfig,
    ListingInfo,
    ListingReader,
    add_cli,
    build_listing,
    covering_row_groups,
    list_dialect,
    listing_fingerprint,
    looks_binary,
    parent_name,
    parse_list_line,
    read_listing_info,
    resolve_list_path,
)
from distill.embed.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
    write_insightface_rec,
)

ORL = str(ORL_DIR)  # ../shared beside the checkout


def _table(path):
    return pq.read_table(path).to_pydict()


def _no_temp_files(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")] == []


def _tree(root, spec: dict[str, list[str]]):
    """Make ROOT/<identity>/<relative file> for every entry of spec; returns root."""
    for ident, files in spec.items():
        os.makedirs(root / ident, exist_ok=True)
        for rel in files:
            p = root / ident / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not really an image")
    return root


# ---------------------------------------------------------------- folders

@pytest.mark.skipif(not os.path.isdir(ORL), reason="ORL faces not present in ../shared")
def test_orl_folders(tmp_path):
    out = tmp_path / "run" / "listing.parquet"
    info = build_listing(ListingConfig((ORL,), str(out)))
    assert (info.kind, info.rows, info.num_classes, info.rec) == ("folders", 400, 40, None)
    assert info.label_names[:4] == ("s1", "s10", "s11", "s12") and info.label_names[-1] == "s9"
    assert read_listing_info(str(out)) == info
    t = _table(out)
    assert t["index"] == list(range(400))
    assert t["offset"] == [None] * 400
    assert t["label"] == [i // 10 for i in range(400)]
    assert t["path"][:3] == [f"{ORL}/s1/1.pgm", f"{ORL}/s1/10.pgm", f"{ORL}/s1/2.pgm"]
    assert t["path"][10] == f"{ORL}/s10/1.pgm" and t["label"][110] == info.label_names.index("s2") == 11
    assert all(os.path.isfile(p) for p in t["path"])
    assert _no_temp_files(out.parent)


def test_folder_rules(tmp_path):
    root = _tree(tmp_path / "src", {
        "bob": ["b.jpg", "a.jpg", ".hidden.jpg", "notes.txt", "sess2/c.jpg", ".cache/x.jpg"],
        "alice": ["10.png", "9.png"],
        "empty": [],
        ".trash": ["z.jpg"],
    })
    (root / "README").write_text("loose files belong to no identity")
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(root),), str(out)))
    assert info.label_names == ("alice", "bob", "empty")
    assert info.num_classes == 3 and info.rows == 5 and info.unlabelled == 0
    t = _table(out)
    rel = [os.path.relpath(p, root) for p in t["path"]]
    # notes.txt is not an image (by extension): skipped, as evaluate --folders skips it.
    assert rel == ["alice/10.png", "alice/9.png", "bob/a.jpg", "bob/b.jpg", "bob/sess2/c.jpg"]
    assert t["label"] == [0, 0, 1, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_listing(ListingConfig((str(tmp_path / "nope"),), str(tmp_path / "l.parquet")))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README").write_text("no images here")
    with pytest.raises(ValueError, match="has no sub-folders and no image files"):
        build_listing(ListingConfig((str(bare),), str(tmp_path / "l.parquet")))
    hollow = _tree(tmp_path / "hollow", {"a": [], "b": []})
    out = tmp_path / "out" / "l.parquet"
    with pytest.raises(ValueError, match="is empty"):
        build_listing(ListingConfig((str(hollow),), str(out)))
    assert os.listdir(out.parent) == []  # nothing published, no temp left behind
    with pytest.raises(ValueError, match="is a directory"):
        build_listing(ListingConfig((str(hollow),), str(out.parent)))
    with pytest.raises(ValueError, match="contains the input SOURCE"):  # (a folder holding the source: never written)
        build_listing(ListingConfig((str(hollow),), str(tmp_path)))


def test_flat_folder_is_unlabelled(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.jpg", "a.PNG", "c.jpeg", ".hidden.jpg", "Thumbs.db", "README"):
        (flat / name).write_bytes(b"x")
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(flat),), str(out)))
    assert (info.kind, info.rows, info.num_classes, info.unlabelled, info.labelled) == ("flat", 3, 0, 3, 0)
    assert read_listing_info(str(out)) == info
    t = _table(out)
    assert [os.path.basename(p) for p in t["path"]] == ["a.PNG", "b.jpg", "c.jpeg"]
    assert t["label"] == [UNLABELLED] * 3


def test_several_sources_keep_label_spaces_apart(tmp_path):
    a = _tree(tmp_path / "a", {"x": ["1.jpg", "2.jpg"], "y": ["1.jpg"]})
    b = _tree(tmp_path / "b", {"x": ["1.jpg"], "z": ["1.jpg", "2.jpg"]})
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("p.jpg", "q.jpg"):
        (flat / name).write_bytes(b"x")
    lst = tmp_path / "extra.txt"
    lst.write_text(f"{a}/x/1.jpg\t1\n{flat}/p.jpg\t-1\n")
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(a), str(flat), str(b), str(lst)), str(out)))
    assert (info.kind, info.rows, info.num_classes, info.unlabelled) == ("sources", 10, 6, 3)
    # Each labelled source's names in label order, prefixed by its folder: "x" of a and "x" of b differ.
    assert info.label_names is None  # the list file's labels are integers: no names for them
    assert [(p.kind, p.rows, p.num_classes, p.first_row, p.label_offset, p.unlabelled) for p in info.parts] == [
        ("folders", 3, 2, 0, 0, 0), ("flat", 2, 0, 3, 2, 2), ("folders", 3, 2, 5, 2, 0), ("list", 2, 2, 8, 4, 1)]
    t = _table(out)
    assert t["label"] == [0, 0, 1, UNLABELLED, UNLABELLED, 2, 3, 3, 5, UNLABELLED]
    assert t["index"] == list(range(10))
    assert read_listing_info(str(out)) == info
    named = build_listing(ListingConfig((str(a), str(flat), str(b)), str(tmp_path / "n.parquet")))
    assert named.label_names == ("a/x", "a/y", "b/x", "b/z")
    one = build_listing(ListingConfig((str(a), str(flat)), str(tmp_path / "o.parquet")))
    assert one.label_names == ("x", "y") and one.unlabelled == 2
    with pytest.raises(ValueError, match="given twice"):
        build_listing(ListingConfig((str(a), str(a)), str(tmp_path / "t.parquet")))


def test_a_flat_folder_of_22k_files(tmp_path):
    # (How fast: bench/listing_sources.py, in docs/BENCHMARKS.md; here, that all of them are there in order.)
    flat = tmp_path / "many"
    flat.mkdir()
    for k in range(22000):
        (flat / f"{k:06d}.jpg").touch()
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(flat),), str(out)))
    assert info.rows == 22000 and info.unlabelled == 22000
    assert [os.path.basename(p) for p in _table(out)["path"][::5000]] == [f"{k:06d}.jpg" for k in range(0, 22000, 5000)]


# ---------------------------------------------------------------- list files

def test_parse_list_line():
    assert parse_list_line("a/b.jpg\t3\n", 1, "f") == ("a/b.jpg", 3)
    assert parse_list_line("a b/c.jpg\r\n", 1, "f") == ("a b/c.jpg", None)
    assert parse_list_line("  # comment\n", 1, "f") is None
    assert parse_list_line("   \n", 1, "f") is None
    with pytest.raises(ValueError, match=r"f:7: label 'x' is not an integer"):
        parse_list_line("a.jpg\tx\n", 7, "f")
    assert parse_list_line("a.jpg\t-1", 2, "f") == ("a.jpg", UNLABELLED)  # a face of no known identity
    with pytest.raises(ValueError, match=r"f:2: label -2 is negative"):
        parse_list_line("a.jpg\t-2", 2, "f")
    with pytest.raises(ValueError, match=r"f:3: empty path"):
        parse_list_line("\t4", 3, "f")


def test_insightface_and_mxnet_lst_lines_are_read_as_they_are_meant():
    # face2rec2: aligned<TAB>path<TAB>label, optionally a bbox and 5 landmarks after it.
    assert parse_list_line("1\ta/b.jpg\t7\n", 1, "f") == ("a/b.jpg", 7)
    bbox = "\t".join(["10", "20", "90", "110"])
    points = "\t".join(str(38.5 + i) for i in range(10))
    assert parse_list_line(f"0\tx/y.png\t3\t{bbox}\t{points}\n", 2, "f") == ("x/y.png", 3)
    assert list_dialect(f"1\tx.jpg\t3\t{bbox}", 1, "f") == "face2rec2"
    # MXNet im2rec: index<TAB>label<TAB>path, labels written as floats.
    assert parse_list_line("42\t5.000000\timages/p.jpg\n", 3, "f") == ("images/p.jpg", 5)
    assert list_dialect("0\t1.0\tp.jpg", 1, "f") == "im2rec"
    assert list_dialect("p.jpg\t3", 1, "f") == "path_label" and list_dialect("p.jpg", 1, "f") == "path"
    with pytest.raises(ValueError, match=r"f:4: an im2rec line with 2 labels"):
        list_dialect("0\t1.0\t2.0\tp.jpg", 4, "f")
    with pytest.raises(ValueError, match=r"f:5: label '2.5' is not an integer.*face2rec2 .lst.*im2rec .lst"):
        parse_list_line("9\t2.5\tp.jpg", 5, "f")
    # One file, one format: a line of another is refused with its number and the formats read.
    with pytest.raises(ValueError, match=r"f:6: not an im2rec .* line, as the file's first; one file holds one format"):
        parse_list_line("p.jpg\t3", 6, "f", dialect="im2rec")


def test_lst_files_list_with_their_paths_and_labels(tmp_path):
    (tmp_path / "img").mkdir()
    face2rec = tmp_path / "train.lst"
    face2rec.write_text("1\timg/a.jpg\t0\n1\timg/b.jpg\t0\n1\timg/c.jpg\t2\n")
    info = build_listing(ListingConfig((str(face2rec),), str(tmp_path / "f.parquet")))
    t = _table(tmp_path / "f.parquet")
    assert t["path"] == [str(tmp_path / "img" / n) for n in ("a.jpg", "b.jpg", "c.jpg")] and t["label"] == [0, 0, 2]
    assert info.num_classes == 3
    im2rec = tmp_path / "im2rec.lst"
    im2rec.write_text("0\t1.000000\timg/a.jpg\n1\t0.000000\timg/b.jpg\n")
    build_listing(ListingConfig((str(im2rec),), str(tmp_path / "i.parquet")))
    t = _table(tmp_path / "i.parquet")
    assert t["path"] == [str(tmp_path / "img" / n) for n in ("a.jpg", "b.jpg")] and t["label"] == [1, 0]
    im2rec.write_text("0\t1.000000\timg/a.jpg\nimg/b.jpg\t0\n")
    with pytest.raises(ValueError, match="im2rec.lst:2: not an im2rec"):
        build_listing(ListingConfig((str(im2rec),), str(tmp_path / "j.parquet")))


def test_resolve_list_path_and_parent_name():
    cases = ["a/b.jpg", "./a/b.jpg", "../a/b.jpg", "a/./b.jpg", "a//b.jpg", ".hidden/b.jpg", "a/../b.jpg",
             "/abs/b.jpg", "/abs/./b.jpg", "/abs//b.jpg", "/b.jpg", "b.jpg"]
    for c in cases:
        want = os.path.normpath(os.path.join("/lists/dir", c))
        assert resolve_list_path("/lists/dir", c) == want, c
        assert parent_name(want) == os.path.basename(os.path.dirname(want)), c


def test_list_with_labels_relative_paths_and_comments(tmp_path):
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text("# path<TAB>label\n\nimgs/a.jpg\t2\n/abs/b.jpg\t0\n  \n../c.jpg\t4\n")
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(lst),), str(out)))
    assert (info.kind, info.rows, info.num_classes, info.label_names) == ("list", 3, 5, None)
    t = _table(out)
    assert t["path"] == [str(tmp_path / "lists" / "imgs" / "a.jpg"), "/abs/b.jpg", str(tmp_path / "c.jpg")]
    assert t["label"] == [2, 0, 4] and t["index"] == [0, 1, 2] and t["offset"] == [None] * 3


def test_list_without_labels_uses_parent_names(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("zed/1.jpg\nann/2.jpg\nzed/3.jpg\n/data/bob/4.jpg\n")
    info = build_listing(ListingConfig((str(lst),), str(tmp_path / "l.parquet")))
    assert info.label_names == ("ann", "bob", "zed") and info.num_classes == 3
    t = _table(tmp_path / "l.parquet")
    assert t["label"] == [2, 0, 2, 1]  # file order kept, labels by sorted names
    assert t["path"][3] == "/data/bob/4.jpg"


@pytest.mark.parametrize("text, match", [
    ("a.jpg\t1\nb.jpg\tone\n", r"l.txt:2: label 'one'"),
    ("a.jpg\t1\n# c\nb.jpg\n", r"l.txt:3: has no label but earlier lines do"),
    ("a.jpg\nb.jpg\t0\n", r"l.txt:2: has a label but earlier lines do not"),
    ("# only comments\n\n", r"is empty"),
])
def test_list_errors(tmp_path, text, match):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        build_listing(ListingConfig((str(tmp_path / "l.txt"),), str(tmp_path / "o" / "l.parquet")))
    assert _no_temp_files(tmp_path / "o")


def test_binary_source_is_refused(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\0\0binary")
    with pytest.raises(ValueError, match="binary file, not a list"):
        build_listing(ListingConfig((str(tmp_path / "x.jpg"),), str(tmp_path / "l.parquet")))
    assert looks_binary(b"P5\n92 112\n255\n" + bytes(range(1, 256)) * 4)  # a PGM: no NUL, raw pixels
    assert not looks_binary("a/\u00e9t\u00e9.jpg\t3\r\nb.jpg\t4\n".encode())


# ---------------------------------------------------------------- .rec

IMAGES = [
    [b"\xff\xd8id0-a", b"\xff\xd8id0-b"],
    [b"\xff\xd8\xff\xe0" + MAGIC_BYTES + b"split-me"],  # payload byte 28 is the magic: split record
    [],                                                   # an identity with no images keeps its label
    [b"\xff\xd8id3-a", b"\xff\xd8id3-b", b"\xff\xd8id3-c"],
]


def test_insightface_rec(tmp_path):
    pack_dir = tmp_path / "faces_emore"
    write_insightface_rec(str(pack_dir), IMAGES)
    out = tmp_path / "l.parquet"
    info = build_listing(ListingConfig((str(pack_dir),), str(out)))
    rec = str(pack_dir / "train.rec")
    assert info == ListingInfo("rec", str(pack_dir), rec, 6, 4, None)
    t = _table(out)
    assert t["label"] == [0, 0, 1, 3, 3, 3] and t["path"] == [None] * 6
    with RecordIOReader(rec) as r:
        got = [unpack(r.read_at(o))[1] for o in t["offset"]]
    assert got == [img for imgs in IMAGES for img in imgs]
    # The .rec path itself is the same source: same rows, same fingerprint.
    out2 = tmp_path / "l2.parquet"
    info2 = build_listing(ListingConfig((rec,), str(out2), row_group_rows=2))
    assert info2.source == rec and info2.rows == 6
    assert listing_fingerprint(str(out)) == listing_fingerprint(str(out2))
    with ListingReader(str(out2)) as reader:
        rows = pickle.loads(pickle.dumps(reader)).rows(1, 5)
    assert rows.path == [None] * 4 and rows.label.tolist() == [0, 1, 3, 3]
    assert rows.offset.tolist() == t["offset"][1:5]


def test_rec_without_identity_records_reads_labels(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    labels = [5.0, 5.0, 9.0, 7.0, (9.0, 1.0)]  # flag>0 record: its first label counts, as in insightface
    with RecordIOWriter(str(rec), str(idx)) as w:
        for k, lab in enumerate(labels):
            h = IRHeader(2, lab, k, 0) if isinstance(lab, tuple) else IRHeader(0, lab, k, 0)
            w.write(k, pack(h, b"img" + MAGIC_BYTES * (k % 2)))
    info = build_listing(ListingConfig((str(rec),), str(tmp_path / "l.parquet")))
    assert (info.rows, info.num_classes) == (5, 3)
    assert _table(tmp_path / "l.parquet")["label"] == [0, 0, 2, 1, 2]


def test_rec_errors(tmp_path):
    write_insightface_rec(str(tmp_path / "p"), IMAGES)
    os.remove(tmp_path / "p" / "train.idx")
    with pytest.raises(FileNotFoundError, match=r"expected .*/p/train\.idx"):
        build_listing(ListingConfig((str(tmp_path / "p"),), str(tmp_path / "l.parquet")))
    # An index whose identity record is missing.
    write_insightface_rec(str(tmp_path / "q"), IMAGES)
    idx = tmp_path / "q" / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="key 10 is missing"):
        build_listing(ListingConfig((str(tmp_path / "q"),), str(tmp_path / "l.parquet")))
    # An index with keys out of order.
    write_insightface_rec(str(tmp_path / "r"), IMAGES)
    idx = tmp_path / "r" / "train.idx"
    lines = idx.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="not strictly increasing"):
        build_listing(ListingConfig((str(tmp_path / "r"),), str(tmp_path / "l.parquet")))
    assert not (tmp_path / "l.parquet").exists() and _no_temp_files(tmp_path)


def _synthetic_emore(folder, n_images, n_ids, seed=0):
    """A pack whose index lists n_images image keys; only the header and identity records exist.

    The listing never reads image records in the insightface layout, so their offsets (made
    up here) are never followed: this is the shape of emore at any size, in milliseconds.
    """
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_images - n_ids, np.ones(n_ids) / n_ids) + 1
    ends = 1 + np.cumsum(counts)
    starts = ends - counts
    first, end = n_images + 1, n_images + 1 + n_ids
    os.makedirs(folder, exist_ok=True)
    with RecordIOWriter(f"{folder}/train.rec", f"{folder}/ids.idx") as w:
        w.write(0, pack(IRHeader(2, (float(first), float(end)), 0, 0), b""))
        for i in range(n_ids):
            w.write(first + i, pack(IRHeader(2, (float(starts[i]), float(ends[i])), first + i, 0), b""))
    ids = open(f"{folder}/ids.idx").read().splitlines()
    with open(f"{folder}/train.idx", "w") as f:
        f.write(ids[0] + "\n")
        f.write("".join(f"{k}\t{k * 4096}\n" for k in range(1, first)))
        f.write("\n".join(ids[1:]) + "\n")
    return np.repeat(np.arange(n_ids), counts), np.arange(1, first) * 4096


def test_large_rec_listing_is_streamed(tmp_path):
    n, c, rgr = 200_000, 1500, 16_384
    want_labels, want_offsets = _synthetic_emore(str(tmp_path / "emore"), n, c)
    out = tmp_path / "l.parquet"
    cfg = ListingConfig((str(tmp_path / "emore"),), str(out), row_group_rows=rgr, idx_block_bytes=64 << 10)
    # A small run first, so that the measured one counts no first-time imports.
    write_insightface_rec(str(tmp_path / "small"), IMAGES)
    build_listing(ListingConfig((str(tmp_path / "small"),), str(tmp_path / "warm.parquet")))
    tracemalloc.start()
    info = build_listing(cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (info.rows, info.num_classes) == (n, c)
    # Holding the rows at once would take ~4.8 MB of numpy arrays (and far more as Python
    # objects); streaming holds one idx block and one row group at a time.
    assert peak < 3 << 20, f"listing held {peak} bytes of Python/numpy memory"
    md = pq.read_metadata(out)
    assert md.num_row_groups == -(-n // rgr)
    assert all(md.row_group(g).num_rows == rgr for g in range(md.num_row_groups - 1))
    t = pq.read_table(out)
    assert np.array_equal(t.column("label").to_numpy(), want_labels)
    assert np.array_equal(t.column("offset").to_numpy(), want_offsets)
    assert np.array_equal(t.column("index").to_numpy(), np.arange(n))


# ---------------------------------------------------------------- reading back

def _labelled_list(tmp_path, name, labels):
    p = tmp_path / f"{name}.txt"
    p.write_text("".join(f"/d/{i:04d}.jpg\t{lab}\n" for i, lab in enumerate(labels)))
    return str(p)


def test_fingerprint_is_content_not_bytes(tmp_path):
    labels = [i % 7 for i in range(500)]
    a = build_listing(ListingConfig((_labelled_list(tmp_path, "a", labels),), str(tmp_path / "a.parquet"), row_group_rows=64))
    b = build_listing(ListingConfig((_labelled_list(tmp_path, "b", labels),), str(tmp_path / "b.parquet"), row_group_rows=500))
    assert a.source != b.source
    fa, fb = listing_fingerprint(str(tmp_path / "a.parquet")), listing_fingerprint(str(tmp_path / "b.parquet"))
    assert fa == fb and len(fa) == 64
    changed = list(labels)
    changed[321] = (changed[321] + 1) % 7
    build_listing(ListingConfig((_labelled_list(tmp_path, "c", changed),), str(tmp_path / "c.parquet"), row_group_rows=64))
    assert listing_fingerprint(str(tmp_path / "c.parquet")) != fa
    renamed = tmp_path / "d.txt"
    renamed.write_text((tmp_path / "a.txt").read_text().replace("/d/0007.jpg", "/d/0007.png"))
    build_listing(ListingConfig((str(renamed),), str(tmp_path / "d.parquet")))
    assert listing_fingerprint(str(tmp_path / "d.parquet")) != fa


def test_covering_row_groups_sweep():
    sizes = [5, 5, 5, 3]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(len(sizes)), sizes)
    for start in range(19):
        for stop in range(start, 19):
            want = sorted(set(owner[start:stop].tolist()))
            assert list(covering_row_groups(starts, start, stop)) == want, (start, stop)


def test_reader_rows_across_row_groups(tmp_path):
    labels = [i // 9 for i in range(100)]
    out = str(tmp_path / "l.parquet")
    build_listing(ListingConfig((_labelled_list(tmp_path, "l", labels),), out, row_group_rows=16))
    full = _table(out)
    with ListingReader(out) as r:
        assert len(r) == 100 and r.info.num_classes == 12
        for start, stop in [(0, 100), (0, 16), (15, 17), (16, 32), (31, 65), (99, 100), (50, 50), (3, 97)]:
            rows = r.rows(start, stop)
            assert rows.index.tolist() == list(range(start, stop))
            assert rows.label.tolist() == full["label"][start:stop]
            assert rows.path == full["path"][start:stop]
            assert rows.offset.tolist() == [-1] * (stop - start)
        with pytest.raises(ValueError, match="outside"):
            r.rows(90, 101)


def test_read_listing_info_refuses_other_parquet(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"index": [0]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a distill listing"):
        read_listing_info(str(tmp_path / "x.parquet"))
    with pytest.raises(FileNotFoundError, match="distill listing"):
        read_listing_info(str(tmp_path / "missing.parquet"))


def test_footer_is_plain_json(tmp_path):
    lst = _labelled_list(tmp_path, "l", [0, 1])
    build_listing(ListingConfig((lst,), str(tmp_path / "l.parquet")))
    footer = json.loads(pq.read_metadata(tmp_path / "l.parquet").metadata[FOOTER_KEY.encode()])
    assert footer == {"kind": "list", "source": lst, "rec": None, "rows": 2, "num_classes": 2, "label_names": None}


# ---------------------------------------------------------------- CLI

def _cli(argv):
    parser = argparse.ArgumentParser(prog="distill")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_summary(tmp_path, capsys):
    lst = _labelled_list(tmp_path, "l", [0, 0, 1])
    out = tmp_path / "run" / "listing.parquet"
    assert _cli(["listing", lst, "--out", str(out), "--row-group-rows", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("listing: list, 3 rows, 2 classes, ") and line.endswith(f"-> {out}")
    assert pq.read_metadata(out).num_row_groups == 2
