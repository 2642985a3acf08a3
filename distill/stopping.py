"""A graceful stop: SIGTERM (a preemptible GPU's notice) or SIGINT asks the running stage to
finish what it is doing, save, and exit with the resume command.

``StopRequest`` (a context manager, or ``install`` / ``restore``), in the main thread, catches
the first SIGTERM or SIGINT as a request (``requested``, ``signum``) and restores the
previous handlers after; a second signal while stopping stops at once
(``KeyboardInterrupt``). Elsewhere (a Ray Train worker's thread) it installs nothing and is
never requested. In an embed driver it stands in for Ray's own SIGTERM handler, which prints
``*** SIGTERM received ***`` and aborts.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, what: str):
        self.what = what  # "training", "the teacher pass": for the log line
        self.signum: int | None = None
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
