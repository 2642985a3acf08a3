"""Session fixtures shared by both test tiers.

- ``ray_address``: one local Ray head per session (``ray start``), so CLI subprocesses and
  in-process tests connect with ``--address`` instead of paying ~5 s for their own cluster.
- ``tiny_teacher``: a small random-weight teacher SavedModel (112x112 -> 32-d), built once.
- ``orl_listing`` / ``embedded_run``: the real ORL faces listed and embedded by the real CLI.
- ``s3_session`` / ``aws``: one real S3 API server on loopback (moto_server) for the tests
  that talk to a store; ``aws`` points this process at it, with a cache of the test's own, and
  hands over the module's ``s3`` fixture (the server with that module's bucket made).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import S3_CREDENTIALS, S3Server
from support import CHILD_ENV, GLINT12, MOBILEFACENET, ORL, ROOT, SHARED, RayHead, build_tiny_teacher  # noqa: F401  (tests import them from here)

# Every process of the session gets what the benchmarks' children get: quiet TF, no usage
# stats, and token auth off (Ray turns it on once ~/.ray/auth_token exists; the test
# clusters are loopback-only and short-lived).
for _name, _value in CHILD_ENV.items():
    os.environ.setdefault(_name, _value)
# Credentials for the loopback S3 server (tests/s3_server.py; it takes any), set before the
# session's Ray head starts so its workers hold them as a cluster's nodes would; the endpoint
# reaches them from the driver (``distill.storage.store_env``).
for _name, _value in S3_CREDENTIALS.items():
    os.environ.setdefault(_name, _value)


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m distill ARGS`` as a real process; output captured for asserts."""
    proc = subprocess.run(
        [sys.executable, "-m", "distill", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distill {' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def ray_head():
    with RayHead(num_cpus=4) as head:
        yield head


@pytest.fixture(scope="session")
def ray_address(ray_head):
    return ray_head.address


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A deterministic random-weight conv net (112x112 -> 32-d) exported like a real face teacher."""
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny", dim=32)


@pytest.fixture(scope="session")
def orl_listing(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orl") / "listing.parquet"
    run_cli("listing", ORL, "--out", out)
    return out


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory, ray_address, tiny_teacher, orl_listing) -> Path:
    """Shard dir of a real `distill embed` of the 400 ORL faces with the tiny teacher."""
    out = tmp_path_factory.mktemp("orl-run") / "shards"
    run_cli("embed", orl_listing, "--teacher", tiny_teacher, "--out", out, "--shard-size", "64",
            "--batch-size", "32", "--address", ray_address, "--no-progress")
    return out


@pytest.fixture(scope="session")
def s3_session():
    with S3Server() as server:
        yield server


@pytest.fixture
def aws(s3, monkeypatch, tmp_path):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return s3



# Without ../shared beside the checkout, a test that reads it (a module-level path under it, or a
# session fixture made from it) is skipped with the reason, not failed.
SHARED_FIXTURES = {"orl_listing", "embedded_run"}


def _reads_shared(item) -> bool:
    if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    module = getattr(item, "module", None)
    return any(isinstance(v, Path) and (v == SHARED or SHARED in v.parents) for v in vars(module).values()) \
        if module is not None else False


# The longest files first (measured: docs/BENCHMARKS.md, "The test suite"): the two workers take
# whole files in this order, so no long one starts last and runs alone at the end.
LONGEST_FIRST = ("test_object_store", "test_embed", "test_readme", "test_scale", "test_train", "test_export",
                 "test_glint_views", "test_demo_cli", "test_onnx_teacher", "test_cluster", "test_align", "test_bad_storage",
                 "test_faults", "test_evaluate_cli")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).stem, len(rank)))  # (stable: the rest keep their order)
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED} is not beside the checkout: it holds the real faces and teacher "
                                   "this test reads (see the README)")
    for item in items:
        if _reads_shared(item):
            item.add_marker(skip)

# ---------------------------------------------------------------------------------------
# The unit tier's guard. A test under tests/unit starts no process (no subprocess, no Ray, no
# server) and imports neither TensorFlow nor Ray, in its module, its fixtures or its body; one
# that needs them belongs in tests/integration, and fails here with that fix. (A module some
# integration test imported already is not imported again, so run alone, `pytest tests/unit`,
# the import check sees all; the process check holds either way.)

UNIT = ROOT / "tests" / "unit"
HEAVY = ("tensorflow", "keras", "ray")
MOVE = "it belongs in tests/integration (the unit tier runs without TensorFlow, Ray, subprocesses or servers)"


class _RefuseHeavy:
    """On sys.meta_path while a unit test is collected, set up or run: TensorFlow or Ray not yet
    imported cannot be imported then."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise AssertionError(f"a unit test imported {name}: {MOVE}")
        return None


def _refuse_process(self, args, *rest, **kwargs):
    raise AssertionError(f"a unit test started a process ({args!r}): {MOVE}")


@contextlib.contextmanager
def _unit_guard(path):
    if UNIT not in Path(path).parents:
        yield
        return
    start = subprocess.Popen._execute_child
    subprocess.Popen._execute_child = _refuse_process
    sys.meta_path.insert(0, _RefuseHeavy)
    try:
        yield
    finally:
        subprocess.Popen._execute_child = start
        sys.meta_path.remove(_RefuseHeavy)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    with _unit_guard(collector.path if isinstance(collector, pytest.Module) else ROOT):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _unit_guard(item.path):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _unit_guard(item.path):
        return (yield)
