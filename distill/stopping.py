"""A graceful stop: SIGTERM (a preemptible GPU's notice) or SIGINT asks the running stage to
finish what it is doing, save, and exit with the resume command.

``StopRequest`` (a context manager, or ``install`` / ``restore``), in the main thread, catches
the first SIGTERM or SIGINT as a request (``requested``, ``signum``) and restores the
previous handlers after; a second signal while stopping stops at once
(``KeyboardInterrupt``). Elsewhere (a Ray Train worker's thread) it installs nothing and is
never requested. In an embed driver it stands in for Ray's own SIGTERM handler, which prints
``*** SIGTERM received ***`` and aborts.

Ray Train workers get no signal of their own: the driver's ``on_request`` writes a stop
request into OUT (``write_request``; Ray Train keeps OUT where every worker reads it: a shared
file system or an object store), and the
workers agree on the step to stop at through the training step's all-reduce
(``distill.train.loop``).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEST = "STOP"  # in OUT: the signal number that asked Ray Train's workers to stop


def write_request(out: str, signum: int) -> None:
    from distill.storage import open_storage

    open_storage(out).write_atomic(REQUEST, str(signum).encode())  # (OUT may be s3://...: one object)


def read_request(out: str) -> int | None:
    from distill.storage import open_storage

    try:
        return int(open_storage(out, create=False).read_bytes(REQUEST).decode().strip() or signal.SIGTERM)
    except FileNotFoundError:
        return None


def clear_request(out: str) -> None:
    from distill.storage import open_storage

    try:
        open_storage(out, create=False).remove(REQUEST)
    except FileNotFoundError:  # (no OUT yet)
        pass


class StopRequest:
    def __init__(self, what: str, on_request: Callable[[int], None] | None = None):
        self.what = what  # "training", "the teacher pass": for the log line
        self.signum: int | None = None
        self.on_request = on_request  # called (in the handler) with the first signal's number
        self._previous: dict[int, object] = {}
        self._depth = 0  # nested installs (a command's, then its loop's): the outermost restores

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
        """Handle SIGTERM / SIGINT from now on (again over a library's handlers). Installs nest:
        the matching ``restore`` of the outermost puts back the handlers from before it."""
        self._depth += 1
        self._handle_signals()
        return self

    def _handle_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                previous = signal.signal(s, self._handle)
                self._previous.setdefault(s, previous)

    def hold_during(self, start: Callable[[], object]):
        """Run ``start`` (a library's start-up), then handle SIGTERM / SIGINT here again. A
        library handler that turns the signal into ``SystemExit(signum)`` meanwhile is caught
        and recorded as the request (the caller checks ``requested`` before starting any
        work); ``start_ray`` keeps Ray from putting its handlers in at all."""
        if threading.current_thread() is not threading.main_thread():
            return start()
        try:
            return start()
        except SystemExit as e:
            if e.code not in {int(s) for s in SIGNALS}:
                raise
            self._handle(int(e.code), None)
            return None
        finally:
            self._handle_signals()

    def restore(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            self._handle_signals()  # (an inner user is done; the outer one still wants them)
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def start_ray(stop: StopRequest, **init_kwargs) -> None:
    """``ray.init(**init_kwargs)`` with ``stop``'s handlers kept throughout: a SIGTERM / SIGINT
    during start-up is a stop request, and start-up completes (the caller then stops before
    any work, and Ray shuts down whole at exit).

    From the main thread, ``ray.init`` (and the local node it starts) put in SIGTERM handlers
    that exit from wherever start-up was, leaving Ray's agent processes behind. They go through
    one function, which is made a no-op while Ray starts. Neither blocking the signals (threads
    already running, pyarrow's, take them; the processes Ray starts inherit the mask) nor
    starting Ray from a helper thread (its local processes die with the thread that started
    them) would do.
    """
    import ray

    try:
        from ray._private import utils as ray_utils

        ray_default = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):  # (another Ray: hold_during still catches its exit)
        ray_utils = ray_default = None
    if ray_default is not None and threading.current_thread() is threading.main_thread():
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        stop.hold_during(lambda: ray.init(**init_kwargs))
    finally:
        if ray_default is not None:
            ray_utils.set_sigterm_handler = ray_default
