"""distill: teacher pass on Ray into Parquet shards, then a streaming MobileNet student.

The embed half (``distill.embed``: listing -> shards) and the train half (``distill.train``:
shards -> student) meet at ``distill.shards``; ``distill.evaluate`` exports and scores the
student. `distill demo` runs them all on a synthetic dataset with no downloads.
"""

import os as _os

__version__ = "0.1.0"

# Run from a checkout without `pip install`: the repository's shards/ and workers/ folders
# are the subpackages distill.shards and distill.workers (an installed distill has them
# inside; pyproject.toml maps them so).
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "shards")) and all(
        _os.path.isfile(_os.path.join(_checkout, d, "__init__.py")) for d in ("shards", "workers")):
    __path__.append(_checkout)  # noqa: F821 (a package's own __path__)
