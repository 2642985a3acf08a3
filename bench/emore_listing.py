"""emore scale without the images: list and plan a 5,822,653-row / 85,742-class source.

Two synthetic sources of exactly emore's shape:

- an insightface pack (``train.rec`` + ``train.idx`` + ``property``) laid out like
  ``write_insightface_rec`` writes it (header record, one record per image, one per
  identity), whose image payloads are 8 bytes instead of ~6 KB JPEGs: listing reads only
  ``train.idx`` and the header and identity records, so the payload size does not change
  what is measured, and the pack is 233 MB instead of ~37 GB;
- a list file of ``path<TAB>label`` lines (the paths need not exist: listing opens nothing).

For each: ``distill listing`` as a child process (wall time, peak RSS), then, in another
child, what ``distill embed`` does with the listing before any teacher work: read its
footer, fingerprint it, plan the shards, and read one shard's rows.

    python bench/emore_listing.py                       # emore's shape
    python bench/emore_listing.py --rows 100000 --classes 1500
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/NAME.py` from anywhere

from bench.common import add_idle_args, distill_cmd, loadavg, print_header, run_child, settle, table, this_script_cmd  # noqa: E402
from bench.projection import EMORE_CLASSES, EMORE_ROWS  # noqa: E402
from distill.embed.recordio import HEADER, MAGIC, RECORD_HEAD, IRHeader, pack, split_payload  # noqa: E402

TINY_IMAGE = b"\xff\xd8\xff\xe0JF\xff\xd9"  # 8 bytes: a JPEG's start and end markers
CHUNK = 1 << 20  # image records built per numpy call


# ---------------------------------------------------------------------------- pure

def class_sizes(rows: int, classes: int) -> np.ndarray:
    """Images per identity: as even as possible (the listing does not care about the skew)."""
    if classes < 1 or rows < classes:
        raise ValueError(f"need rows >= classes >= 1, got {rows} rows, {classes} classes")
    sizes = np.full(classes, rows // classes, dtype=np.int64)
    sizes[: rows % classes] += 1
    return sizes


def _record(payload: bytes) -> bytes:
    """One whole (unsplit) record: magic, length, payload padded to 4 bytes."""
    if len(split_payload(payload)) != 1:
        raise ValueError("payload contains an aligned magic word; the fast writer only writes whole records")
    return RECORD_HEAD.pack(MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def image_records(first_key: int, labels: np.ndarray, image: bytes) -> bytes:
    """Records for image keys ``first_key ..`` (flag 0, label, id = key, id2 = 0, ``image``),
    byte-identical to ``RecordIOWriter.write(key, pack(IRHeader(0, label, key, 0), image))``,
    built with one numpy call per chunk instead of one Python call per record."""
    n = len(labels)
    length = HEADER.size + len(image)
    pad = -length % 4
    dt = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                   ("id2", "<u8"), ("image", f"V{len(image) + pad}")])
    rec = np.zeros(n, dtype=dt)
    rec["magic"] = MAGIC
    rec["lrec"] = length
    rec["label"] = labels
    rec["id"] = np.arange(first_key, first_key + n, dtype=np.uint64)
    rec["image"] = np.void(image + b"\0" * pad)
    # A key or label word equal to the magic would make dmlc split the record; not in emore's range.
    words = rec.view("<u4").reshape(n, -1)[:, 2:]
    if np.any(words == MAGIC):
        raise ValueError("a record would contain the magic word; the fast writer cannot split records")
    return rec.tobytes()


def idx_text(keys: np.ndarray, offsets: np.ndarray) -> str:
    return "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist()))


# ---------------------------------------------------------------------------- writers

def write_pack(folder: Path, sizes: np.ndarray, image: bytes = TINY_IMAGE) -> Path:
    """``train.rec``/``train.idx``/``property`` in insightface's layout (see ``write_insightface_rec``)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, classes = int(sizes.sum()), len(sizes)
    first, end = n + 1, n + 1 + classes
    labels = np.repeat(np.arange(classes, dtype=np.float32), sizes)
    rec_size = RECORD_HEAD.size + HEADER.size + len(image) + (-(HEADER.size + len(image)) % 4)
    with open(folder / "train.rec", "wb") as rec, open(folder / "train.idx", "w", encoding="ascii") as idx:
        head = _record(pack(IRHeader(2, (float(first), float(end)), 0, 0), b""))
        rec.write(head)
        idx.write("0\t0\n")
        offset = len(head)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            rec.write(image_records(lo + 1, labels[lo:hi], image))
            keys = np.arange(lo + 1, hi + 1, dtype=np.int64)
            idx.write(idx_text(keys, offset + (keys - lo - 1) * rec_size))
            offset += (hi - lo) * rec_size
        starts = np.concatenate([[1], 1 + np.cumsum(sizes)[:-1]])
        lines = []
        for i, (s, e) in enumerate(zip(starts.tolist(), (starts + sizes).tolist())):
            r = _record(pack(IRHeader(2, (float(s), float(e)), first + i, 0), b""))
            rec.write(r)
            lines.append(f"{first + i}\t{offset}\n")
            offset += len(r)
        idx.write("".join(lines))
    (folder / "property").write_text(f"{classes},112,112\n")
    return folder / "train.rec"


def write_list(path: Path, sizes: np.ndarray) -> Path:
    """``/data/emore/LABEL/KEY.jpg<TAB>LABEL`` lines, one per image, identity by identity."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    with open(path, "w") as f:
        for lo in range(0, len(labels), CHUNK):
            f.write("".join(f"/data/emore/{lab:05d}/{lo + i:08d}.jpg\t{lab}\n"
                            for i, lab in enumerate(labels[lo:lo + CHUNK].tolist())))
    return path


# ---------------------------------------------------------------------------- children

def child_plan(a) -> dict:
    """What the embed driver does with a listing before any teacher work, timed."""
    from distill.embed.listing import ListingReader, listing_fingerprint, read_listing_info
    from distill.shards.plan import num_shards, plan_shards

    t = {}
    t0 = time.perf_counter()
    info = read_listing_info(a.listing)
    t["footer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    listing_fingerprint(a.listing)
    t["fingerprint_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_shards(info.rows, a.shard_size)
    t["plan_s"] = time.perf_counter() - t0
    t["shards"] = num_shards(info.rows, a.shard_size)
    reader = ListingReader(a.listing)
    mid = plan[len(plan) // 2]
    t0 = time.perf_counter()
    reader.rows(mid.start, mid.stop)
    t["first_shard_rows_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = min(64, len(plan) - len(plan) // 2 - 1)
    for s in plan[len(plan) // 2 + 1: len(plan) // 2 + 1 + n]:
        reader.rows(s.start, s.stop)
    t["next_shard_rows_s"] = (time.perf_counter() - t0) / max(1, n)
    t["rows"] = info.rows
    t["classes"] = info.num_classes
    # VmHWM, not ru_maxrss: the latter also counts the parent's pages shared before exec.
    with open("/proc/self/status") as f:
        t["peak_rss_mib"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return t


# ---------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=EMORE_ROWS)
    p.add_argument("--classes", type=int, default=EMORE_CLASSES)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed; needs ~0.6 GB)")
    p.add_argument("--child", choices=["plan"], help=argparse.SUPPRESS)
    p.add_argument("--listing", help=argparse.SUPPRESS)
    add_idle_args(p)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child_plan(a)))
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-emore-"))
    work.mkdir(parents=True, exist_ok=True)
    print_header("emore-scale listing and plan")
    sizes = class_sizes(a.rows, a.classes)
    t0 = time.perf_counter()
    rec = write_pack(work / "pack", sizes)
    make_rec_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lst = write_list(work / "train.lst", sizes)
    make_list_s = time.perf_counter() - t0
    print(f"synthetic sources: {a.rows:,} rows, {a.classes:,} classes; train.rec {rec.stat().st_size / 1e6:.0f} MB "
          f"+ train.idx {(work / 'pack' / 'train.idx').stat().st_size / 1e6:.0f} MB (made in {make_rec_s:.0f} s), "
          f"list file {lst.stat().st_size / 1e6:.0f} MB (made in {make_list_s:.0f} s); shard size {a.shard_size}\n")

    rows = []
    for kind, src in (("rec", rec), ("list", lst)):
        listing = work / f"listing-{kind}.parquet"
        load = settle(a, f"the {kind} listing").label()
        res = run_child(distill_cmd("listing", src, "--out", listing))
        plan = run_child(this_script_cmd("emore_listing.py", "--child", "plan", "--listing", listing,
                                         "--shard-size", a.shard_size)).json()
        if plan["rows"] != a.rows or plan["classes"] != a.classes:
            raise RuntimeError(f"listing of {src} has {plan['rows']} rows / {plan['classes']} classes")
        rows.append([
            f"`distill listing` {kind}", f"{res.seconds:.1f}", f"{res.peak_rss_mib:.0f}",
            f"{listing.stat().st_size / 1e6:.1f} MB", f"{plan['fingerprint_s']:.1f}", f"{plan['plan_s'] * 1000:.0f}",
            plan["shards"], f"{plan['first_shard_rows_s'] * 1000:.0f} / {plan['next_shard_rows_s'] * 1000:.1f}",
            f"{plan['peak_rss_mib']:.0f}", load,
        ])
    print(table(["source", "listing wall s", "listing peak RSS MiB", "listing file", "fingerprint s", "plan ms",
                 "shards", "one shard's rows: first / next ms", "plan child peak RSS MiB", "load avg at start"], rows))
    print(f"\nload average at the end: {loadavg()}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
