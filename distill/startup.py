"""Where a command's start-up goes: named phases timed from the process's own start; and
importing TensorFlow without its C++ start-up notices.

``distill -v embed`` logs one line once the first rows are embedded, e.g.
``start-up 11.9 s: python and imports 1.4 s, listing 0.1 s, teacher fingerprint 0.1 s, ...``,
so a slow start names its phase. Pure bookkeeping; the clock is injectable for tests.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Callable

VERSIONED = (("distill", ("distill",)), ("tensorflow", ("tensorflow", "tensorflow-cpu")), ("keras", ("keras",)),
             ("pillow", ("pillow",)), ("pyarrow", ("pyarrow",)), ("ray", ("ray",)), ("numpy", ("numpy",)),
             ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")))


def versions() -> dict[str, str]:
    """The versions the bit-exact claims depend on (decoders, kernels, formats), read from the
    installed packages' metadata: nothing is imported for it."""
    from importlib import metadata

    out = {}
    for name, dists in VERSIONED:
        for d in dists:
            try:
                out[name] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[name] = "not installed"
    return out


def show_progress(progress: bool | None) -> bool:
    """Progress bars: as asked (``--progress`` / ``--no-progress``), else only when stderr is a
    terminal, so the logs of ``ray job submit``, nohup or CI hold no carriage-return frames."""
    import sys

    return progress if progress is not None else sys.stderr.isatty()


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Consecutive named phases: ``mark(name)`` ends the phase that ran since the last mark."""

    def __init__(self, first: str = "python and imports", clock: Callable[[], float] = time.monotonic,
                 age: float | None = None):
        self._clock = clock
        self._last = clock()
        age = process_age() if age is None else age
        self.items: list[tuple[str, float]] = [(first, age)] if age is not None else []
        self.reported = False

    def mark(self, name: str) -> None:
        now = self._clock()
        self.items.append((name, now - self._last))
        self._last = now

    def total(self) -> float:
        return sum(s for _, s in self.items)

    def line(self) -> str:
        return f"start-up {self.total():.1f} s: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.items)


# What TensorFlow prints from C++ while it is imported, which TF_CPP_MIN_LOG_LEVEL no longer
# reaches (tensorflow/tensorflow#100442): absl's preamble and the oneDNN notice.
_TF_IMPORT_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ \S+\.cc:\d+\] .*)$"
)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up notices filtered out of stderr, so they do not
    drown the progress bars; every other line it writes (errors included) is passed on.
    With TF_CPP_MIN_LOG_LEVEL=0 nothing is filtered. The stages that run TensorFlow in the CLI
    process (train, export, evaluate, demo) call it once their options and paths are checked,
    so a bad option is refused in well under a second."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _TF_IMPORT_CHATTER.match(line.rstrip("\n")):
                    sys.stderr.write(line)
            sys.stderr.flush()
