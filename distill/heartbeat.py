"""The heartbeat: one INFO line every ``--heartbeat`` seconds from a long verb whose progress
bars are off (stderr not a terminal, as under nohup, ``ray job submit`` or CI; or
``--no-progress``), so such a log is never silent for thousands of steps.

``Heartbeat`` decides when a line is due and the recent pace; ``train_line`` and
``shards_line`` word it. No clock here: the callers (``distill.train.loop``, the embed and
align driver in ``distill.embed.sharded``) pass the time in, so unit tests sweep it in milliseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from distill.errors import BadOption

DEFAULT_EVERY = 30.0  # seconds


def check_every(seconds: float) -> float:
    """``--heartbeat``'s value, refused when negative. Pure."""
    if not seconds >= 0:  # (NaN too)
        raise BadOption(f"--heartbeat is seconds between progress log lines, >= 0 (0: none), got {seconds}")
    return float(seconds)


def interval(seconds: float, bars: bool, rank: int = 0) -> float:
    """Seconds between heartbeat lines: ``seconds``, or 0 (none) where progress bars are shown
    (they say it already) or on a rank other than 0 (one line per run, not per worker). Pure."""
    return 0.0 if bars or rank != 0 else check_every(seconds)


@dataclass
class Heartbeat:
    """When the next line is due, and the pace (units of work a second) over the last ``window``
    lines' intervals: recent enough to follow a cluster that grows or shrinks, long enough that
    a line between two finished shards does not read 0 img/s. ``every`` 0: never due. Time is
    whatever clock the caller reads (monotonic seconds)."""

    every: float
    last_time: float
    last_done: float = 0.0
    window: int = 5

    def __post_init__(self) -> None:
        check_every(self.every)
        self._marks: deque[tuple[float, float]] = deque([(self.last_time, self.last_done)], maxlen=self.window + 1)

    def due(self, now: float) -> bool:
        return self.every > 0 and now - self.last_time >= self.every

    def beat(self, now: float, done: float) -> float:
        """A line is given at ``now`` with ``done`` units done so far: the pace over the window
        (never negative: a failed attempt's rows are taken back); the next line is due
        ``every`` seconds from now."""
        self._marks.append((now, done))
        then, done_then = self._marks[0]
        self.last_time, self.last_done = now, done
        return max(done - done_then, 0.0) / max(now - then, 1e-9)


def eta(remaining: float, rate: float) -> str:
    """How long ``remaining`` units take at ``rate`` a second, as a log says it. Pure."""
    if remaining <= 0:
        return "0s"
    if rate <= 0:
        return "unknown"
    return duration(remaining / rate)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``. Pure."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def train_line(*, step: int, total_steps: int, epoch: int, epochs: int, samples: int, batch_size: int,
               images_per_sec: float, parts: dict[str, float], lr: float) -> str:
    """One training heartbeat: where the run is (global ``step`` of the run's ``total_steps``,
    ``epoch`` counted from 1, ``samples`` into it), the recent pace (``Heartbeat``), the last
    step's named loss parts and batch teacher-student cosine, the learning rate, and the time
    the steps left take at that pace (validation and checkpoints not counted). Pure."""
    where = (f"train: step {step:,}/{total_steps:,} ({100 * step / max(total_steps, 1):.1f}%), epoch {epoch}/{epochs} "
             f"at sample {samples:,}")
    named = [f"{k} {v:.4f}" for k, v in parts.items() if k != "cos"] + (
        [f"cos {parts['cos']:.4f}"] if "cos" in parts else [])
    return ", ".join([where, f"{images_per_sec:,.0f} img/s", *named, f"lr {lr:.3g}",
                      f"ETA {eta((total_steps - step) * batch_size, images_per_sec)}"])


def shards_line(*, verb: str, shards_done: int, shards_total: int, rows_done: int, rows_total: int,
                images_per_sec: float, failed: int = 0, unit: str = "rows") -> str:
    """One heartbeat of a sharded pass (``distill embed``, ``distill align``): shards and rows
    (``unit``: what a row is) done of the whole run (any driver's), the recent pace, the time
    left at it, and the shards given up, if any. Pure."""
    line = (f"{verb}: {shards_done:,}/{shards_total:,} shards done, {rows_done:,}/{rows_total:,} {unit} "
            f"({100 * rows_done / max(rows_total, 1):.1f}%), {images_per_sec:,.0f} img/s, "
            f"ETA {eta(rows_total - rows_done, images_per_sec)}")
    if failed:
        line += f"; {failed} shard(s) given up after --max-attempts (rerun to retry them)"
    return line
