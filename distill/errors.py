"""The errors a user can fix: one small hierarchy, each message naming the fix.

The CLI prints a ``DistillError`` as one line (``distill STAGE: error: ...``) and exits 2;
anything else (a bug, an ``ArrowInvalid`` from a damaged file nobody anticipated) keeps its
traceback. Code decides on the type, never on an exception's message. The value errors
among them stay ``ValueError`` too, so callers that validate input with ``except
ValueError`` keep working. A leaf module: every layer (``shards``, ``workers``, ``distill``)
may import it.
"""

from __future__ import annotations

import errno


class DistillError(Exception):
    """Base: something the user can fix; the message says what and how."""


class BadOption(DistillError, ValueError):
    """An option, or a combination of options, that cannot work."""


class BadInput(DistillError, ValueError):
    """Input that cannot be used as it is: a listing source, images, shards, a teacher, a .bin."""


class NoManifest(BadInput, FileNotFoundError):
    """A shard directory without ``manifest.json``: ``distill embed`` has not finished there."""


class IncompatibleRun(DistillError, ValueError):
    """The output holds another run, or continuing it would change what was already done."""


class Unreachable(DistillError, ConnectionError):
    """A service the run needs (the Redis ledger, a Ray cluster, an object store) did not answer or refused us."""


class CheckFailed(DistillError, RuntimeError):
    """A self-check of the result failed (export parity, a demo's run); nothing was published."""


class ShardsFailed(DistillError, RuntimeError):
    """Some shards failed every attempt; the rest are done and kept."""


class Diverged(DistillError, ArithmeticError):
    """The training loss stopped being a finite number; the steps since the last checkpoint were
    not saved (their weights are not numbers)."""


class Stopped(DistillError):
    """The run stopped cleanly on SIGTERM or SIGINT after saving its progress; rerunning the
    same command resumes. The CLI exits 128 + the signal's number (143, 130), as a signal would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StorageFull(DistillError, OSError):
    """The output's storage refused a write (full, over quota, read-only); nothing half-written
    was kept, and rerunning once there is room resumes."""


# errno -> what to do: storage that refuses every write until someone acts.
_STORAGE_FIXES = {
    errno.ENOSPC: "free space there (or pass another --out) and rerun the same command",
    errno.EDQUOT: "raise the quota or free space there (or pass another --out) and rerun the same command",
    errno.EROFS: "that file system is mounted read-only: pass an --out on a writable one",
}


def storage_fix(e: BaseException) -> str | None:
    """The fix for an ``OSError`` from storage that will refuse every write, or None. Looks
    through Ray's wrapper (``RayTaskError(OSError)``: the actor's exception is its ``cause``)."""
    cause = getattr(e, "cause", None) or e
    return _STORAGE_FIXES.get(getattr(cause, "errno", None)) if isinstance(cause, OSError) else None
