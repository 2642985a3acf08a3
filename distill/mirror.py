"""A directory on an object store worked on through a local copy: ``train --out s3://...``,
``export`` of a student in a bucket, ``export --out s3://...``.

The stages write their outputs with local files (checkpoints renamed into place, a metrics
log appended to, TensorBoard event files); a ``Mirror`` keeps those in a local cache
(``$DISTILL_CACHE``, default ``~/.cache/distill``, in ``remote/<scheme>/<bucket>/<path>/.copy``)
and makes the store match it (``push``), or the cache match the store (``pull``).

What is atomic where. One object is: a store publishes a key only when its upload completes.
A directory is not, so a *unit* (a checkpoint, ``best/``, an export: directories a reader must
see whole) is published as its files and then a marker, ``_COMPLETE.json``, naming each file
with its size and SHA-256; it is replaced by deleting the marker first. A reader takes a unit
only when the marker is there and every file matches it, so a unit killed half way through
its upload (or half way through its replacement) is passed over, never taken for finished.
Every other file (``metrics.jsonl``, event files) is a loose object, uploaded whole.

The store is the truth: ``pull`` makes the cache a copy of the store's finished state (a
checkpoint only the cache holds was never published, and is dropped), so a rerun on any
machine, or on this one after a crash, goes on from what the store says.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from distill.storage import retrying

MARKER = "_COMPLETE.json"
CACHE_ENV = "DISTILL_CACHE"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "distill")


def cache_dir(uri: str, role: str = "") -> str:
    """The local copy of the store directory ``uri``: the same path on every machine (no
    credentials in it); ``role`` keeps apart processes of one machine that must not share it
    (the Ray Train workers of one node)."""
    scheme, rest = uri.split("://", 1)
    netloc, _, path = rest.partition("/")
    bucket = netloc.rsplit("@", 1)[-1].split("?", 1)[0]
    parts = [p for p in (bucket + "/" + path.split("?", 1)[0]).split("/") if p not in ("", ".", "..")]
    # (in a hidden folder of its own: the copy of s3://b/run never holds the copy of s3://b/run/export)
    return os.path.join(cache_root(), "remote", scheme, *parts, ".copy" + (f"-{role}" if role else ""))


# ---------------------------------------------------------------------------- pure decisions


def unit_of(rel: str, units: tuple[str, ...]) -> str | None:
    """The unit directory (a pattern of ``units``, matched on leading path parts) that the file
    ``rel`` belongs to, or None for a loose file. ``""`` as a pattern: the whole tree is one unit."""
    if "" in units:
        return ""
    parts = rel.split("/")
    for n in range(1, len(parts)):
        head = "/".join(parts[:n])
        if any(fnmatch.fnmatchcase(head, u) for u in units):
            return head
    return None


def marker_body(files: dict[str, tuple[int, str]]) -> bytes:
    """The marker of a unit: its files (relative to it) with size and SHA-256."""
    return json.dumps({"files": {k: {"size": s, "sha256": h} for k, (s, h) in sorted(files.items())}},
                      indent=1, sort_keys=True).encode()


def parse_marker(body: bytes) -> dict[str, tuple[int, str]]:
    return {k: (int(v["size"]), str(v["sha256"])) for k, v in json.loads(body)["files"].items()}


def complete_units(listing: dict[str, int], units: tuple[str, ...],
                   markers: dict[str, dict[str, tuple[int, str]]]) -> set[str]:
    """The units of a store listing (``rel -> size``) that are whole: their marker is there and
    names exactly the files present, at their sizes (the hashes are checked on download)."""
    whole = set()
    for unit, files in markers.items():
        prefix = f"{unit}/" if unit else ""
        present = {rel[len(prefix):]: size for rel, size in listing.items()
                   if rel.startswith(prefix) and unit_of(rel, units) == unit and not rel.endswith(MARKER)}
        if present == {name: size for name, (size, _) in files.items()}:
            whole.add(unit)
    return whole


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the mirror


@dataclass
class Mirror:
    """The store directory ``uri`` and its local copy ``local``. ``units``: the patterns of the
    directories that are published whole (``""``: the whole tree); ``skip``: patterns of paths
    that are neither pulled nor pushed (e.g. Ray Train's own storage)."""

    uri: str
    local: str
    units: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    _pushed: dict[str, tuple[int, int]] = field(default_factory=dict)  # rel -> (size, mtime_ns) as last pushed
    _store: object = None

    @classmethod
    def open(cls, uri: str, units: Iterable[str] = (), skip: Iterable[str] = (), role: str = "",
             local: str | None = None, create: bool = True) -> "Mirror":
        from distill.storage import ArrowStorage

        m = cls(uri.rstrip("/"), local or cache_dir(uri, role), tuple(units), tuple(skip))
        m._store = ArrowStorage.from_uri(m.uri, create=create)
        os.makedirs(m.local, exist_ok=True)
        # What the store holds now: a push replaces it (files the copy lacks are deleted), a pull renews it.
        m._pushed = {rel: (size, -1) for rel, size in m._listing().items()}
        return m

    # -- the store side
    def _path(self, rel: str) -> str:
        return f"{self._store.path}/{rel}" if rel else self._store.path

    def _skipped(self, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, s) or rel.startswith(s.rstrip("*").rstrip("/") + "/") for s in self.skip)

    def _listing(self) -> dict[str, int]:
        import pyarrow.fs as pafs

        fs, root = self._store.fs, self._store.path
        infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)),
                         f"listing {self.uri}")
        out = {}
        for i in infos:
            if i.type == pafs.FileType.File:
                rel = i.path[len(root):].lstrip("/")
                if not self._skipped(rel):
                    out[rel] = i.size
        return out

    def _read(self, rel: str) -> bytes:
        def read() -> bytes:
            with self._store.fs.open_input_stream(self._path(rel)) as f:
                return f.read()

        return retrying(read, f"reading {self.uri}/{rel}")

    def _write(self, rel: str, data: bytes) -> None:
        def write() -> None:
            with self._store.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)

        retrying(write, f"writing {self.uri}/{rel}")

    def _upload(self, rel: str) -> None:
        def upload() -> None:
            with open(os.path.join(self.local, rel), "rb") as src, \
                    self._store.fs.open_output_stream(self._path(rel)) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)

        retrying(upload, f"uploading {self.uri}/{rel}")

    def _delete(self, rel: str) -> None:
        try:
            retrying(lambda: self._store.fs.delete_file(self._path(rel)), f"deleting {self.uri}/{rel}")
        except FileNotFoundError:
            pass

    def exists(self) -> bool:
        """Whether the store holds anything of this directory (as of the last open, pull or push)."""
        return bool(self._pushed)

    # -- pull: the cache becomes the store's finished state
    def pull(self) -> None:
        listing = self._listing()
        markers = {}
        for rel in listing:
            if rel.endswith(MARKER) and (rel == MARKER or rel.endswith("/" + MARKER)):
                unit = rel[: -len(MARKER)].rstrip("/")
                if unit_of(f"{unit}/x" if unit else "x", self.units) == unit:
                    try:
                        markers[unit] = parse_marker(self._read(rel))
                    except (ValueError, KeyError, FileNotFoundError):
                        continue  # a marker being replaced: the unit is not whole
        whole = complete_units(listing, self.units, markers)
        wanted = {rel for rel in listing if unit_of(rel, self.units) is None}  # loose files
        for unit in sorted(whole):
            self._pull_unit(unit, markers[unit])
        for rel in sorted(wanted):
            self._pull_file(rel, listing[rel])
        self._drop_local_extras(whole, wanted)
        self._pushed = {rel: _stat(os.path.join(self.local, rel)) for rel in self._local_files()}

    def _pull_unit(self, unit: str, files: dict[str, tuple[int, str]]) -> None:
        from distill.storage import publish_dir, write_file_atomic

        final = os.path.join(self.local, unit) if unit else self.local
        marker = os.path.join(final, MARKER)
        body = marker_body(files)
        if os.path.isfile(marker) and open(marker, "rb").read() == body:
            return  # this copy is the store's already
        if not unit:  # the whole tree is the unit: its old marker out, files in place, the new marker last
            if os.path.exists(marker):
                os.unlink(marker)
            for name, (_, digest) in files.items():
                self._fetch(name, os.path.join(self.local, name), digest)
            write_file_atomic(marker, body)
            return
        os.makedirs(os.path.dirname(final), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
        try:
            for name, (_, digest) in files.items():
                self._fetch(f"{unit}/{name}", os.path.join(stage, name), digest)
            with open(os.path.join(stage, MARKER), "wb") as f:
                f.write(body)
            publish_dir(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def _fetch(self, rel: str, dest: str, digest: str) -> None:
        from distill.errors import CheckFailed

        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".part"

        def download() -> None:
            with self._store.fs.open_input_stream(self._path(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)

        retrying(download, f"downloading {self.uri}/{rel}")
        if sha256_file(tmp) != digest:
            os.unlink(tmp)
            raise CheckFailed(f"{self.uri}/{rel} does not match its unit's {MARKER} (SHA-256); it was replaced "
                              "while being read: rerun")
        os.replace(tmp, dest)

    def _pull_file(self, rel: str, size: int) -> None:
        from distill.storage import write_file_atomic

        dest = os.path.join(self.local, rel)
        if os.path.isfile(dest) and os.path.getsize(dest) == size:
            return  # (a loose file is only ever appended to or rewritten by the one writer)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        write_file_atomic(dest, self._read(rel), durable=False)

    def _drop_local_extras(self, whole: set[str], loose: set[str]) -> None:
        for rel in self._local_files():
            unit = unit_of(rel, self.units)
            if (unit is None and rel not in loose) or (unit is not None and unit not in whole):
                if unit:
                    shutil.rmtree(os.path.join(self.local, unit), ignore_errors=True)
                else:
                    os.unlink(os.path.join(self.local, rel))

    # -- push: the store becomes the cache
    def _local_files(self) -> list[str]:
        from distill.storage import is_temp_name

        out = []
        for d, dirs, files in os.walk(self.local):
            dirs[:] = [x for x in dirs if not x.startswith(".")]  # temp and staging directories, roles' caches
            for name in files:
                rel = os.path.relpath(os.path.join(d, name), self.local).replace(os.sep, "/")
                if not (name.startswith(".") or is_temp_name(name) or name.endswith(".part") or self._skipped(rel)):
                    out.append(rel)
        return sorted(out)

    def push(self) -> None:
        """Make the store match the cache: changed units republished (marker last), units the
        cache dropped unpublished (marker first), changed loose files uploaded whole."""
        now = {rel: _stat(os.path.join(self.local, rel)) for rel in self._local_files()}
        by_unit: dict[str | None, list[str]] = {}
        for rel in set(now) | set(self._pushed):
            by_unit.setdefault(unit_of(rel, self.units), []).append(rel)
        for unit, rels in sorted(by_unit.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
            changed = [r for r in rels if now.get(r) != self._pushed.get(r)]
            if not changed:
                continue
            if unit is None:
                for rel in sorted(changed):
                    self._upload(rel) if rel in now else self._delete(rel)
            else:
                self._push_unit(unit, sorted(r for r in rels if r in now), sorted(changed))
        self._pushed = now

    def _push_unit(self, unit: str, present: list[str], changed: list[str]) -> None:
        prefix = f"{unit}/" if unit else ""
        marker_rel = prefix + MARKER
        self._delete(marker_rel)  # first: from here until the new marker, readers pass the unit over
        for rel in changed:
            if rel == marker_rel:
                continue
            self._upload(rel) if rel in present else self._delete(rel)
        files = {rel[len(prefix):]: (os.path.getsize(os.path.join(self.local, rel)), sha256_file(os.path.join(self.local, rel)))
                 for rel in present if rel != marker_rel}
        if files:
            self._write(marker_rel, marker_body(files))


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------------------- the stages' layouts

RUN_UNITS = ("checkpoints/ckpt-*", "best")  # a training output: each checkpoint and best/ whole
RUN_SKIP = ("ray", "STOP")  # Ray Train's own storage (storage_path=OUT/ray); the driver's stop request


def run_mirror(uri: str, role: str = "") -> Mirror:
    """A training output directory on a store, pulled: its finished checkpoints, best/, logs."""
    m = Mirror.open(uri, units=RUN_UNITS, skip=RUN_SKIP, role=role)
    m.pull()
    return m


def local_copy(location: str, option: str, units: tuple[str, ...] = ("",), skip: tuple[str, ...] = ()) -> str:
    """A local path to read ``location`` from: the path itself, or for a store URI a pulled
    copy of its finished state (its own cache, apart from a writer's on this machine)."""
    from distill.storage import is_uri, redact

    if not is_uri(location):
        return os.path.abspath(location)
    m = Mirror.open(location, units=units, skip=skip, role="read", create=False)
    if not m.exists():
        raise FileNotFoundError(f"{option} {redact(location)}: nothing there on the store")
    m.pull()
    return m.local


def local_file(location: str, option: str) -> str:
    """A local path to read the file ``location`` from: the path itself, or for a store URI this
    machine's copy of the object, fetched again only when the object's size or time changed."""
    from distill.storage import download_file, is_uri, redact, store_fs

    if not is_uri(location):
        return os.path.abspath(location)
    where = redact(location)

    def stat() -> tuple[int, float]:
        import pyarrow.fs as pafs

        fs, path = store_fs(location)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{option} {where}: no such object on the store")
        return info.size, info.mtime.timestamp() if info.mtime else 0.0

    size, mtime = retrying(stat, f"looking up {where}")
    parent, _, name = location.rstrip("/").rpartition("/")
    local = os.path.join(cache_dir(parent, "file"), name)  # (apart from the directory copies)
    stamp = f"{local}.stamp.json"
    want = {"size": size, "mtime": mtime}
    try:
        with open(stamp) as f:
            if json.load(f) == want and os.path.getsize(local) == size:
                return local
    except (OSError, ValueError):
        pass
    from distill.storage import make_dir, write_file_atomic

    make_dir(os.path.dirname(local), option)
    retrying(lambda: download_file(location, local), f"reading {where}")
    write_file_atomic(stamp, json.dumps(want), durable=False)
    return local


def write_output(location: str, data: bytes, option: str) -> None:
    """One file written whole to a local path (temp + rename) or to a store (one object)."""
    from distill.storage import is_uri, local_path, make_dir, open_storage, write_file_atomic

    if is_uri(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        open_storage(parent).write_atomic(name, data)
        return
    path = local_path(location, option)
    make_dir(os.path.dirname(path), option)
    write_file_atomic(path, data)
