"""A graceful stop: SIGTERM (a preemptible GPU's notice) or SIGINT asks the running stage to
finish what it is doing, save, and exit with the resume command.

``StopRequest`` (a context manager, or ``install`` / ``restore``), in the main thread, catches
the first SIGTERM or SIGINT as a request (``requested``, ``signum``) and restores the
previous handlers after; a second signal while stopping stops at once
(``KeyboardInterrupt``). Elsewhere (a Ray Train worker's thread) it installs nothing and is
never requested. In an embed driver it stands in for Ray's own SIGTERM handler, which prints
``*** SIGTERM received ***`` and aborts.

Ray Train workers get no signal of their own: the driver's ``on_request`` writes a stop
request into OUT (``write_request``; Ray Train keeps OUT where every worker reads it), and the
workers agree on the step to stop at through the training step's all-reduce
(``distill.train.loop``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEST = "STOP"  # in OUT: the signal number that asked Ray Train's workers to stop


def write_request(out: str, signum: int) -> None:
    from distill.shards.storage import write_file_atomic

    write_file_atomic(os.path.join(out, REQUEST), str(signum))


def read_request(out: str) -> int | None:
    try:
        with open(os.path.join(out, REQUEST)) as f:
            return int(f.read().strip() or signal.SIGTERM)
    except FileNotFoundError:
        return None


def clear_request(out: str) -> None:
    try:
        os.unlink(os.path.join(out, REQUEST))
    except FileNotFoundError:
        pass


class StopRequest:
    def __init__(self, what: str, on_request: Callable[[int], None] | None = None):
        self.what = what  # "training", "the teacher pass": for the log line
        self.signum: int | None = None
        self.on_request = on_request  # called (in the handler) with the first signal's number
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum
        log.warning("%s received: stopping %s cleanly (send it again to stop at once)", signal.Signals(signum).name,
                    self.what)
        if self.on_request is not None:
            self.on_request(signum)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
