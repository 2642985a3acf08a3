"""The graceful stop's signal handling: nested installs, and signals held while a library
(Ray) installs handlers of its own during start-up."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from distill.stopping import StopRequest


def test_nested_installs_restore_the_original_handler_once_the_outermost_ends():
    original = signal.getsignal(signal.SIGTERM)
    outer = StopRequest("a command")
    with outer:
        with outer:  # the loop's, inside the command's
            assert signal.getsignal(signal.SIGTERM) == outer._handle
        assert signal.getsignal(signal.SIGTERM) == outer._handle  # still the command's
    assert signal.getsignal(signal.SIGTERM) == original


def test_a_library_exit_on_the_signal_during_start_up_is_a_request():
    def start():  # stands for a start-up that installs a handler exiting with the signal's number
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        return "started"

    with StopRequest("a pass") as stop:
        assert stop.hold_during(start) is None  # (start-up was cut short)
        assert stop.requested and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        with pytest.raises(KeyboardInterrupt):  # a second signal: stop at once
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_start_up_that_ends_normally_returns_its_value_and_hands_signals_back():
    def start():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return "started"

    with StopRequest("a pass") as stop:
        assert stop.hold_during(start) == "started" and not stop.requested
        assert signal.getsignal(signal.SIGTERM) == stop._handle


def test_other_exits_during_start_up_are_not_swallowed():
    with StopRequest("a pass") as stop:
        with pytest.raises(SystemExit):
            stop.hold_during(lambda: sys.exit(3))
        assert not stop.requested


def test_the_request_to_ray_train_workers_is_a_file_in_a_local_out(tmp_path):
    """OUT on a local (or shared) disk: the driver's request is the file OUT/STOP, read by every
    worker and cleared for the rerun. (OUT on a store: test_object_store's Ray Train test.)"""
    from distill.stopping import REQUEST, clear_request, read_request, write_request

    out = str(tmp_path / "student")
    assert read_request(out) is None
    clear_request(out)  # (no OUT yet: nothing to clear, nothing made)
    write_request(out, signal.SIGINT)
    assert read_request(out) == signal.SIGINT and (tmp_path / "student" / REQUEST).read_text() == str(int(signal.SIGINT))
    (tmp_path / "student" / REQUEST).write_text("")  # (an empty request file is a SIGTERM)
    assert read_request(out) == signal.SIGTERM
    clear_request(out)
    assert read_request(out) is None and os.listdir(tmp_path / "student") == []
