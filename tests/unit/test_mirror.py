"""The local copy of an object-store directory (``distill/mirror.py``): the pure rules, and the
retries of a store call (pull / push against a real S3 server: tests/integration/test_mirror_store.py)."""

from __future__ import annotations

import os

import pytest

from distill.mirror import MARKER, RUN_UNITS, cache_dir, complete_units, marker_body, parse_marker, unit_of


def test_unit_of_names_the_directory_published_whole_or_none_for_a_loose_file():
    assert unit_of("checkpoints/ckpt-000000012/state.npz", RUN_UNITS) == "checkpoints/ckpt-000000012"
    assert unit_of("best/val.json", RUN_UNITS) == "best"
    assert unit_of("metrics.jsonl", RUN_UNITS) is None
    assert unit_of("tb/events.out.tfevents.1", RUN_UNITS) is None
    assert unit_of("checkpoints/stray.txt", RUN_UNITS) is None
    assert unit_of("saved_model/variables/variables.index", ("",)) == ""  # an export: the whole tree


def test_a_unit_is_whole_only_when_its_marker_names_exactly_the_files_there_at_their_sizes():
    files = {"state.npz": (100, "a"), "cursor.json": (10, "b")}
    listing = {"c/ckpt-1/state.npz": 100, "c/ckpt-1/cursor.json": 10, "c/ckpt-1/" + MARKER: 50}
    units = ("c/ckpt-*",)
    assert complete_units(listing, units, {"c/ckpt-1": files}) == {"c/ckpt-1"}
    assert complete_units({**listing, "c/ckpt-1/state.npz": 60}, units, {"c/ckpt-1": files}) == set()  # another size
    assert complete_units({k: v for k, v in listing.items() if "cursor" not in k}, units, {"c/ckpt-1": files}) == set()
    assert complete_units({**listing, "c/ckpt-1/extra": 1}, units, {"c/ckpt-1": files}) == set()
    assert complete_units(listing, units, {}) == set()  # no marker: being written, or being replaced
    assert parse_marker(marker_body(files)) == files


def test_the_cache_path_is_the_same_everywhere_and_holds_no_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    a = cache_dir("s3://key:secret@bucket/run/student")
    assert a == os.path.join(tmp_path, "remote", "s3", "bucket", "run", "student", ".copy")
    assert "secret" not in a
    # The copy of a directory never holds the copy of one inside it.
    assert not cache_dir("s3://bucket/run/student/export").startswith(a)
    assert cache_dir("s3://bucket/run/student", role="rank-1") != a


def test_a_store_call_is_retried_and_then_refused_in_one_line_that_says_what_to_do():
    from distill.errors import Unreachable
    from distill.storage import retrying

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION: Timeout was reached")
        return "ok"

    assert retrying(flaky, "uploading s3://b/x", delays=(0, 0, 0)) == "ok" and len(calls) == 3
    with pytest.raises(Unreachable, match=r"uploading s3://b/x: the store did not answer after 3 tries .* rerun"):
        retrying(lambda: (_ for _ in ()).throw(OSError("reset")), "uploading s3://b/x", delays=(0, 0))
    with pytest.raises(FileNotFoundError):  # a missing key is an answer
        retrying(lambda: (_ for _ in ()).throw(FileNotFoundError("no key")), "reading", delays=(0,))
