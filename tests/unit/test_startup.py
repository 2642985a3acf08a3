"""The start-up breakdown's bookkeeping: consecutive phases, timed from the process start."""

from __future__ import annotations

import time

from distill.startup import Phases, process_age


def test_phases_are_consecutive_and_add_up():
    t = [10.0]
    phases = Phases(clock=lambda: t[0], age=1.5)
    for name, took in (("listing", 0.25), ("ray.init", 4.0), ("first rows", 0.75)):
        t[0] += took
        phases.mark(name)
    assert phases.items == [("python and imports", 1.5), ("listing", 0.25), ("ray.init", 4.0), ("first rows", 0.75)]
    assert phases.total() == 6.5
    assert phases.line() == "start-up 6.5 s: python and imports 1.5 s, listing 0.2 s, ray.init 4.0 s, first rows 0.8 s"


def test_process_age_is_this_process_lifetime():
    age = process_age()
    assert age is not None  # Linux: /proc
    # pytest has been running for a while, and the age grows with the clock.
    time.sleep(0.05)
    later = process_age()
    assert 0 < age <= later < age + 5
