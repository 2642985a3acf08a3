"""A full disk and a read-only one, for real: small tmpfs mounts (root only; skipped where the
machine cannot mount). Every refusal is one line with the fix, nothing half-written is left or
taken as done, and once there is room the same command finishes with the same bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from toy_shards import write_toy_shards

pytestmark = pytest.mark.integration


class Tmpfs:
    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                            str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def mount(tmp_path):
    mounts = []

    def make(name: str, size: str, read_only: bool = False) -> Tmpfs:
        mounts.append(Tmpfs(tmp_path / name, size, read_only))
        return mounts[-1]

    yield make
    for m in reversed(mounts):
        m.close()


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp" in p.name]


def test_embed_on_a_full_disk_stops_in_one_line_and_finishes_once_there_is_room(mount, embedded_run, orl_listing,
                                                                              tiny_teacher, ray_address):
    reference = embedded_run  # (the same command, into another --out)
    args = ["embed", orl_listing, "--teacher", tiny_teacher, "--shard-size", "64", "--batch-size", "32",
            "--address", ray_address, "--no-progress"]
    shard = max(f.stat().st_size for f in reference.glob("part-*.parquet"))  # ~0.9 MB: 64 PNG faces
    disk = mount("full", f"{shard * 3 // 2 // 1024}k")  # the first shard fits, the second does not
    out = disk.path / "shards"
    r = run_cli(*args, "--out", out, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("distill embed: error: cannot write shard") and "No space left on device" in err, err
    assert "free space there (or pass another --out)" in err and "Kept: the 1 shard(s) already done" in err
    assert "Traceback" not in r.stderr and _leftovers(disk.path) == []
    disk.grow("64m")
    r = run_cli(*args, "--out", out)
    assert "embed complete" in r.stdout
    for f in sorted(reference.glob("part-*.parquet")) + [reference / "manifest.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_read_only_output_is_refused_in_one_line(mount, orl_listing, tiny_teacher):
    disk = mount("ro", "1m", read_only=True)
    r = run_cli("embed", orl_listing, "--teacher", tiny_teacher, "--out", disk.path / "shards", "--no-progress",
                check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Read-only file system" in r.stderr and "pass an --out on a writable one" in r.stderr


def test_train_on_a_full_disk_stops_in_one_line_and_takes_no_half_checkpoint(mount, tmp_path):
    from distill.train.checkpoints import latest_checkpoint

    shards = write_toy_shards(tmp_path / "shards", rows=64, shard_size=32, size=32, dim=8)
    disk = mount("full", "64k")  # metrics fit; a checkpoint (~1.7 MB of weights) does not
    out = disk.path / "student"
    r = run_cli("train", shards, "--out", out, "--epochs", 1, "--batch-size", 16, "--student", "mobilenetv2", "--width", 0.35, "--no-progress",
                check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert latest_checkpoint(str(out)) is None  # the save that failed is not a checkpoint a rerun would resume
