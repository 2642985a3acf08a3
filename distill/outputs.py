"""What a verb may write to: the one rule that keeps every output from destroying what
distill did not write.

An output (``--out`` of listing, align, embed, train, export, export-npy, evaluate, demo; and
``evaluate --plot``) is taken only when it is

- new (nothing there),
- an empty directory, or
- that same verb's own earlier output, recognised by its marker (a shard run's
  ``manifest.json``, a training run's ``checkpoints/``, an export's ``export.json``, a
  listing's Parquet footer, ...). A verb that replaces its output as a whole (export) also
  finds nothing in it but what it writes itself;

and when it neither is, contains, nor sits inside one of the command's inputs (its sources,
listing, teacher, shards, student, model). Anything else is refused in one line, naming the
option and what is in the way, before any work is done; locally and on object stores alike.

The decisions (``classify``, ``overlap``) are pure functions of names and paths; ``check_output``
looks at the file system or the store once and applies them.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from distill.errors import BadOption

# Files an operating system drops into any folder it shows: never the user's data.
OS_LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class OutputKind:
    """What one verb writes at ``--out``.

    ``name``: what RUN/NAME it usually is. ``markers``: name patterns (top-level entries) of which any one marks the verb's own
    output. ``own``: when given, every top-level name the verb writes; such a verb replaces
    its output whole, so an output holding anything else is not its own. ``is_file``: the
    output is one file, recognised by ``recognise(path) -> bool`` (its content), not a folder."""

    verb: str
    noun: str
    name: str  # the usual name of the output (RUN/<name>), for the hint of a refusal
    markers: tuple[str, ...] = ()
    own: tuple[str, ...] = ()
    is_file: bool = False
    recognise: Callable[[str], bool] | None = None


# ---------------------------------------------------------------- recognising our files

LISTING_FOOTER_KEY = "distill.listing"  # the Parquet footer key of a listing (distill.embed.listing writes it)
PLOT_SOFTWARE = "distill evaluate"  # the PNG text chunk `Software` of an ROC plot (distill.evaluate.plot)


def _open_binary(location: str):
    from distill.storage import is_uri, store_fs

    if is_uri(location):
        fs, path = store_fs(location)
        return fs.open_input_file(path)
    return open(location, "rb")


def is_listing(location: str) -> bool:
    """A Parquet file with the listing footer."""
    import pyarrow.parquet as pq

    try:
        with _open_binary(location) as f:
            meta = pq.read_metadata(f).metadata or {}
    except Exception:  # (not Parquet at all: any of pyarrow's errors)
        return False
    return LISTING_FOOTER_KEY.encode() in meta


def is_evaluation(location: str) -> bool:
    """A JSON object as ``distill evaluate --out`` writes it (one set, or several)."""
    import json

    try:
        with _open_binary(location) as f:
            doc = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and ("targets" in doc or {"dataset", "models"} <= set(doc))


def is_plot(location: str) -> bool:
    """A PNG whose ``Software`` text chunk says ``distill evaluate``."""
    from PIL import Image

    try:
        with _open_binary(location) as f, Image.open(f) as im:
            return im.format == "PNG" and im.info.get("Software") == PLOT_SOFTWARE
    except Exception:  # (not an image: PIL's errors)
        return False


LISTING = OutputKind("listing", "listing file", "listing.parquet", is_file=True, recognise=is_listing)
EVALUATION = OutputKind("evaluate", "results file", "eval.json", is_file=True, recognise=is_evaluation)
PLOT = OutputKind("evaluate --plot", "ROC plot", "roc.png", is_file=True, recognise=is_plot)
SHARDS = OutputKind("embed", "shard directory", "shards", markers=("manifest.json", "_ledger"))
ALIGNED = OutputKind("align", "aligned-faces folder", "faces", markers=(".align",))
STUDENT = OutputKind("train", "student directory", "student", markers=("checkpoints", "shards-verified.json", "metrics.jsonl"))
EXPORT = OutputKind("export", "export directory", "export", markers=("export.json",),
                    own=("export.json", "saved_model", "checkpoint", "student_*.tflite", "student.onnx",
                         "_COMPLETE.json"))
NPY = OutputKind("export-npy", "embeddings folder", "npy", markers=("*_emb.npy", "*_img.foo"))
DEMO = OutputKind("demo", "demo folder", "demo-run", markers=("demo.json",))


# ---------------------------------------------------------------- pure decisions


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def classify(entries: list[str] | None, kind: OutputKind) -> tuple[str, list[str]]:
    """("new" | "empty" | "ours" | "foreign", the entries in the way) for a folder output whose
    top-level names are ``entries`` (None: nothing there). Pure."""
    if entries is None:
        return "new", []
    names = [e for e in entries if e not in OS_LITTER]
    if not names:
        return "empty", []
    if not any(_matches(n, kind.markers) for n in names):
        return "foreign", names
    if kind.own:
        stray = [n for n in names if not _matches(n, kind.own) and not _is_ours_hidden(n)]
        if stray:
            return "foreign", stray
    return "ours", []


def _is_ours_hidden(name: str) -> bool:
    """A hidden temp or staging name our writers make (``.NAME.tmp-...``, ``.NAME.old-...``)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def _norm(location: str) -> tuple[str, str]:
    """(scheme, path) of a local path or a store URI, comparable by prefix."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" in location:
        scheme, rest = location.split("://", 1)
        return scheme, rest.split("?", 1)[0].rstrip("/")
    return "", os.path.realpath(location)


Inputs = Mapping[str, "str | None"] | Iterable[tuple[str, "str | None"]]


def overlap(out: str, inputs: Inputs) -> tuple[str, str, str] | None:
    """The first input (option -> path, or (option, path) pairs) that ``out`` equals, contains,
    or sits inside, as (relation, option, path); None when they are apart. Local paths are
    compared after resolving symlinks."""
    o_scheme, o = _norm(out)
    for option_name, path in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if not path:
            continue
        i_scheme, i = _norm(path)
        if i_scheme != o_scheme:
            continue
        if o == i:
            return "is", option_name, path
        if i.startswith(o.rstrip("/") + "/"):
            return "contains", option_name, path
        if o.startswith(i.rstrip("/") + "/"):
            return "is inside", option_name, path
    return None


# ---------------------------------------------------------------- looking, once


def _entries(location: str) -> tuple[str | None, list[str] | None]:
    """(what is there: None, "file" or "dir"; a folder's top-level names)."""
    from distill.storage import is_uri

    if is_uri(location):
        return _store_entries(location)
    if os.path.isdir(location):
        return "dir", sorted(os.listdir(location))
    if os.path.lexists(location):
        return "file", None
    return None, None


def _store_entries(uri: str) -> tuple[str | None, list[str] | None]:
    import pyarrow.fs as pafs

    from distill.storage import redact, retrying, store_fs

    fs, path = store_fs(uri)
    info = retrying(lambda: fs.get_file_info(path), f"looking up {redact(uri)}")
    if info.type == pafs.FileType.File:
        return "file", None
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), f"listing {redact(uri)}")
    names = sorted(i.base_name for i in infos)
    if info.type == pafs.FileType.NotFound and not names:
        return None, None
    return "dir", names


def check_output(out: str, kind: OutputKind, inputs: Inputs = (),
                 option: str = "--out") -> str:
    """Refuse ``out`` for ``kind`` unless it is new, empty, or the verb's own earlier output,
    and apart from every input (option -> path). Returns "new", "empty" or "ours"."""
    from distill.storage import is_uri, probe_store, redact

    shown = redact(out)
    pairs = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    for option_name, location in [(option, out), *pairs]:  # (a store that does not answer: refused in seconds)
        if location and is_uri(location):
            probe_store(location, option_name)
    hit = overlap(out, pairs)
    if hit is not None:
        relation, option_name, path = hit
        beside = f"{path.rstrip('/').rpartition('/')[0]}/{kind.name}" if "://" in path else os.path.join(
            os.path.dirname(os.path.abspath(path.rstrip("/"))), kind.name)
        raise BadOption(f"{option} {shown} {relation} the input {option_name} {redact(path)}; nothing was changed. "
                        f"Pass an {option} of its own, apart from the inputs (e.g. {option} {redact(beside)})")
    what, entries = _entries(out)
    if kind.is_file:
        if what == "dir":
            raise BadOption(f"{option} {shown} is a directory; {kind.verb} writes one file there: give a file "
                            "path inside it or elsewhere")
        if what is None:
            return "new"
        if kind.recognise is not None and kind.recognise(out):
            return "ours"
        raise BadOption(f"{option} {shown} exists and is not a {kind.noun} distill wrote; nothing was changed. "
                        "Give a new file name, or move that file away first")
    if what == "file":
        raise BadOption(f"{option} {shown} is a file; {kind.verb} writes a {kind.noun} there: give a folder path")
    state, stray = classify(entries, kind)
    if state == "foreign":
        listed = ", ".join(stray[:4]) + (f" and {len(stray) - 4} more" if len(stray) > 4 else "")
        why = (f"holds {listed}, which `distill {kind.verb}` does not write" if kind.own and any(
            _matches(n, kind.markers) for n in entries or ()) else f"is not empty and is no earlier output of "
            f"`distill {kind.verb}` (it holds {listed})")
        raise BadOption(f"{option} {shown} {why}; nothing was changed. Pass a new or empty folder"
                        + (" (the old export is replaced only when it holds nothing else)" if kind.own else ""))
    return state
