"""``distill evaluate --plot FILE.png``: ROC curves, TAR against FAR on a log axis (how face
verification is read), one line per model and verification set, drawn with Pillow (no
plotting library needed)."""

from __future__ import annotations

import math

import numpy as np

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 520, 70, 20, 40, 60
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))


def axis_decades(smallest_far: float) -> list[int]:
    """The powers of ten the FAR axis spans: from the smallest FAR's decade to 10^0. Pure."""
    return list(range(math.floor(math.log10(smallest_far)), 1))


def plot_roc(curves: list[tuple[str, np.ndarray, np.ndarray]], path: str, title: str) -> None:
    """``curves``: (label, FAR, TAR) each; the PNG goes to ``path`` (written whole)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    from distill.storage import write_file_atomic

    decades = axis_decades(min(float(far[0]) for _, far, _ in curves))
    lo, hi = decades[0], decades[-1]
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP

    def xy(far: float, tar: float) -> tuple[float, float]:
        fx = (math.log10(max(far, 10.0 ** lo)) - lo) / max(hi - lo, 1)
        return x0 + fx * (x1 - x0), y0 - tar * (y0 - y1)

    for k in decades:  # grid and FAR labels
        x, _ = xy(10.0 ** k, 0)
        d.line([(x, y0), (x, y1)], fill=(225, 225, 225))
        d.text((x - 12, y0 + 6), f"1e{k}" if k else "1", fill="black")
    for t in range(0, 11, 2):
        _, y = xy(1, t / 10)
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        d.text((x0 - 30, y - 6), f"{t / 10:.1f}", fill="black")
    d.rectangle([x0, y1, x1, y0], outline="black")
    d.text(((x0 + x1) / 2 - 90, y0 + 26), "false accept rate (FAR, log)", fill="black")
    d.text((8, y1 - 16), "true accept rate (TAR)", fill="black")
    d.text(((x0 + x1) / 2 - 3 * len(title), 6), title, fill="black")
    for n, (label, far, tar) in enumerate(curves):
        colour = COLOURS[n % len(COLOURS)]
        d.line([xy(float(f), float(t)) for f, t in zip(far, tar)], fill=colour, width=2)
        d.line([(x0 + 12, y1 + 14 + 16 * n), (x0 + 36, y1 + 14 + 16 * n)], fill=colour, width=3)
        d.text((x0 + 42, y1 + 8 + 16 * n), label, fill="black")
    from PIL.PngImagePlugin import PngInfo

    from distill.outputs import PLOT_SOFTWARE

    info = PngInfo()
    info.add_text("Software", PLOT_SOFTWARE)  # how a rerun knows the file is ours to replace
    buf = BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    write_file_atomic(path, buf.getvalue())
