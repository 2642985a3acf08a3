"""distill: teacher pass on Ray into Parquet shards, then a streaming MobileNet student.

Stages, one module each: listing -> (shards.plan) -> embed -> train -> export -> evaluate.
`distill demo` runs them all on a synthetic dataset with no downloads.
"""

__version__ = "0.1.0"
