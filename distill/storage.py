"""Where shards live: a local/NFS directory, or any URI that ``pyarrow.fs`` understands; and
the project's two local write primitives.

The one write primitive is ``write_atomic``: a reader either sees the whole object under
its final name or nothing. Locally that is temp file in the same directory + fsync +
rename + fsync of the directory (``write_file_atomic``, which every other file the project
writes whole goes through too: listings, manifests, ledger records, JSON results, caches);
a directory is swapped in whole by ``publish_dir`` (checkpoints, ``best/``, exports). On object stores (``s3://``, ``gs://``) an object only
becomes visible when its upload completes, so a write-once key is already atomic; the
manifest, written last, is what says which keys are done.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from distill.errors import BadOption, storage_fix

TEMP_PREFIX = "."
TEMP_MARK = ".tmp-"


class Storage(Protocol):
    @property
    def root(self) -> str: ...
    @property
    def is_local(self) -> bool: ...
    def write_atomic(self, name: str, data: bytes) -> None: ...
    def read_bytes(self, name: str) -> bytes: ...
    def exists(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def list(self) -> list[str]: ...
    def remove(self, name: str) -> None: ...
    def open_input(self, name: str) -> BinaryIO: ...
    def uri(self, name: str) -> str: ...


def temp_name(name: str) -> str:
    """A hidden, unique sibling of ``name``; never mistaken for a shard."""
    return f"{TEMP_PREFIX}{name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and TEMP_MARK in name


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def open_storage(location: str, create: bool = True) -> Storage:
    """A Storage for a local path, ``file://`` URI, or a pyarrow.fs URI (s3://, gs://, ...)."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_uri(location):
        return ArrowStorage.from_uri(location, create=create)
    return LocalStorage(os.path.abspath(location), create=create)


@dataclass(frozen=True)
class LocalStorage:
    path: str
    create: bool = True

    def __post_init__(self) -> None:
        if self.create:
            make_dir(self.path)
        elif not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path} is not a directory")

    @property
    def root(self) -> str:
        return self.path

    @property
    def is_local(self) -> bool:
        return True

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_atomic(self, name: str, data: bytes) -> None:
        write_file_atomic(self._p(name), data)

    def read_bytes(self, name: str) -> bytes:
        with open(self._p(name), "rb") as f:
            return f.read()

    def exists(self, name: str) -> bool:
        return os.path.exists(self._p(name))

    def size(self, name: str) -> int:
        return os.path.getsize(self._p(name))

    def list(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._p(name))
        except FileNotFoundError:
            pass

    def open_input(self, name: str) -> BinaryIO:
        return open(self._p(name), "rb")

    def uri(self, name: str) -> str:
        return self._p(name)

    def mtime(self, name: str) -> float:
        return os.path.getmtime(self._p(name))


@dataclass(frozen=True)
class ArrowStorage:
    """A directory on any pyarrow filesystem (S3, GCS, HDFS, ...)."""

    fs: object  # pyarrow.fs.FileSystem
    path: str
    scheme: str

    @classmethod
    def from_uri(cls, uri: str, create: bool = True) -> "ArrowStorage":
        fs, path = store_fs(uri)
        if create:
            fs.create_dir(path, recursive=True)
        return cls(fs, path.rstrip("/"), uri.split("://", 1)[0])

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.path}"

    @property
    def is_local(self) -> bool:
        return False

    def _p(self, name: str) -> str:
        return f"{self.path}/{name}"

    # Every call is retried through a short outage (``retrying``): a put of one whole object and
    # a read are safe to repeat; after the last try the error says to rerun.
    def write_atomic(self, name: str, data: bytes) -> None:
        # Object stores publish a key only when its upload completes: write-once is atomic.
        def put() -> None:
            with self.fs.open_output_stream(self._p(name)) as f:
                f.write(data)

        retrying(put, f"writing {self.uri(name)}")

    def read_bytes(self, name: str) -> bytes:
        def get() -> bytes:
            with self.fs.open_input_stream(self._p(name)) as f:
                return f.read()

        return retrying(get, f"reading {self.uri(name)}")

    def _info(self, name: str):
        return retrying(lambda: self.fs.get_file_info(self._p(name)), f"looking up {self.uri(name)}")

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(name).type != pafs.FileType.NotFound

    def size(self, name: str) -> int:
        return self._info(name).size

    def list(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = retrying(lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)),
                         f"listing {self.root}")
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def remove(self, name: str) -> None:
        try:
            retrying(lambda: self.fs.delete_file(self._p(name)), f"deleting {self.uri(name)}")
        except FileNotFoundError:
            pass

    def open_input(self, name: str) -> BinaryIO:
        return self.fs.open_input_file(self._p(name))

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def mtime(self, name: str) -> float:
        mt = self._info(name).mtime
        return mt.timestamp() if mt else 0.0


# Where an S3-compatible store is, which region, and where local copies of store directories go
# (``distill.mirror``): forwarded from the driver to the Ray workers it starts (runtime_env), which
# may run on other nodes. Credentials are not: they belong to the nodes (an instance profile, or
# the cluster's environment), never to a job's visible config.
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "DISTILL_CACHE")


def store_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORE_ENV if os.environ.get(k)}


RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # a store call that fails is tried again after each of these


def retrying(call, what: str, delays: tuple[float, ...] = RETRY_DELAYS_S):
    """``call()``, tried again after each delay while it fails with a store error (a timeout, a
    connection reset, a 5xx); a missing key is an answer, not an error. After the last try,
    the error says what was being done and that a rerun goes on from the store's state."""
    import time

    for delay in (*delays, None):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as e:
            if delay is None:
                from distill.errors import Unreachable

                raise Unreachable(f"{what}: the store did not answer after {len(delays) + 1} tries ({e}); "
                                       "check the endpoint and credentials, then rerun: the run goes on from what "
                                       "the store holds") from e
            time.sleep(delay)


def store_endpoint(uri: str, env: dict | None = None) -> tuple[str, int] | None:
    """(host, port) that a store URI's requests go to: ``endpoint_override`` in the URI, else
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for s3://, else the provider's own; None for
    schemes this does not know. Pure (``env``: the environment)."""
    from urllib.parse import parse_qs, urlsplit

    env = os.environ if env is None else env
    scheme, _, rest = uri.partition("://")
    query = parse_qs(rest.partition("?")[2])
    if scheme == "s3":
        endpoint = (query.get("endpoint_override") or [""])[0] or env.get("AWS_ENDPOINT_URL_S3") or env.get(
            "AWS_ENDPOINT_URL")
        if not endpoint:
            region = (query.get("region") or [""])[0] or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            return f"s3.{region or 'us-east-1'}.amazonaws.com", 443
    elif scheme in ("gs", "gcs"):
        return "storage.googleapis.com", 443
    else:
        return None
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


@functools.lru_cache(maxsize=16)
def probe_store(uri: str, option: str, seconds: float = 3.0) -> None:
    """Refuse, in a few seconds, a store that does not answer (a wrong endpoint, no network):
    its calls would otherwise be retried for most of a minute before saying so. Only whether
    the endpoint takes a connection is checked; credentials and buckets are the calls' own."""
    import socket
    import time

    where = store_endpoint(uri)
    if where is None:
        return
    host, port = where
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
            return
        except OSError as e:
            if time.monotonic() + 0.5 >= deadline or isinstance(e, socket.gaierror):
                from distill.errors import Unreachable

                raise Unreachable(f"{option} {redact(uri)}: the store at {host}:{port} does not answer ({e}); check "
                                  "AWS_ENDPOINT_URL (or the URI's endpoint_override) and the network, then rerun") from None
            time.sleep(0.5)


@functools.lru_cache(maxsize=64)
def _filesystem(root: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


def store_fs(uri: str) -> tuple[object, str]:
    """(pyarrow filesystem, path in it) of a store URI. Buckets (s3://, gs://) keep one
    filesystem per process: making an S3 client costs milliseconds, and the teacher pass reads
    every image of a listing of image URIs through one."""
    scheme, rest = uri.split("://", 1)
    try:
        if scheme in ("s3", "gs", "gcs"):
            head, _, query = rest.partition("?")
            bucket, _, key = head.partition("/")
            fs = _filesystem(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
            return fs, f"{bucket.rsplit('@', 1)[-1]}/{key}".rstrip("/")
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for a URI it cannot use
        raise BadOption(f"cannot open {redact(uri)}: {e}. Use a URI pyarrow.fs supports (s3://bucket/key, "
                        "gs://bucket/key) with credentials in the environment") from e


def store_kind(uri: str) -> str | None:
    """"file", "dir" or None (nothing there): what a store URI names."""
    import pyarrow.fs as pafs

    fs, path = store_fs(uri)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind)


def open_store_file(uri: str):
    """A random-access file on an object store (``read_at(n, offset)``: one ranged GET; safe
    from several threads at once, as Arrow's files are), or FileNotFoundError."""
    if store_kind(uri) != "file":
        raise FileNotFoundError(f"{redact(uri)} does not exist")
    fs, path = store_fs(uri)
    return fs.open_input_file(path)


def read_store_bytes(uri: str) -> bytes:
    """One object, whole, retried through an outage (FileNotFoundError when there is none)."""
    fs, path = store_fs(uri)

    def get() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(get, f"reading {redact(uri)}")


def store_tree(uri: str) -> list[str]:
    """The path relative to ``uri`` of every object below it, recursively, in key order (one
    listing call per 1,000 keys on S3, however deep the tree), retried through an outage."""
    import pyarrow.fs as pafs

    fs, path = store_fs(uri)
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)),
                     f"listing {redact(uri)}")
    cut = len(path.rstrip("/")) + 1
    return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File)


def store_file_exists(uri: str) -> bool:
    return store_kind(uri) == "file"


def upload_file(local: str, uri: str, block: int = 8 << 20) -> None:
    """A local file to one object, streamed (multipart above one part): the key appears only
    when the upload completes, so a reader never sees half of it."""
    fs, path = store_fs(uri)
    with open(local, "rb") as src, fs.open_output_stream(path) as out:
        for chunk in iter(lambda: src.read(block), b""):
            out.write(chunk)


def download_file(uri: str, local: str, block: int = 8 << 20) -> None:
    """One object to a local file, whole or not at all (a hidden sibling renamed into place)."""
    fs, path = store_fs(uri)
    tmp = os.path.join(os.path.dirname(local), temp_name(os.path.basename(local)))
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(block), b""):
                out.write(chunk)
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def local_path(path: str, option: str) -> str:
    """``path`` made absolute, for an option whose stage reads and writes the local file system
    only: an object-store URI is refused in one line (``os.path`` would quietly make
    ``./s3:/bucket/...`` of it and nothing would reach the bucket)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_uri(path):
        raise BadOption(f"{option} {redact(path)}: this option takes a local path only (on a cluster, a file system "
                        "every node mounts); see docs/cluster.md for the paths that may be on an object store")
    return os.path.abspath(path)


def make_dir(path: str, option: str = "--out") -> str:
    """Create the directory ``path`` (and its parents) for the ``option`` that named it; one
    that cannot be made (a file in the way, no permission, a read-only disk) is refused in one
    line naming the option and the reason. Returns the path."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fix = storage_fix(e)
        raise BadOption(f"{option} {path}: cannot create that directory ({e.strerror or e}"
                        + (f": {e.filename}" if e.filename and e.filename != path else "") + ")"
                        + (f"; {fix}" if fix else "")) from None
    return path


def write_file_atomic(path: str, data: bytes | str, durable: bool = True) -> None:
    """``path`` whole or not at all: a hidden unique sibling (``temp_name``) written, fsynced
    when ``durable``, renamed over ``path``, and the directory fsynced; on any failure (a full
    disk) the sibling is removed, so nothing half-written is left behind."""
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, temp_name(name))
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(d)


def publish_dir(stage: str, final: str, replaceable=None) -> None:
    """Swap the finished directory ``stage`` in as ``final`` (same parent): an existing ``final``
    is moved aside first and removed after, so a kill at any point leaves the old or the new one
    whole under ``final`` (and at most a hidden leftover, which the writers clear).
    ``replaceable(final) -> bool``: whether an existing ``final`` may go (the caller's own
    earlier output); when it says no, nothing is touched and ``BadOption`` says why."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(final))
    trash = None
    if os.path.exists(final) and replaceable is not None and not replaceable(final):
        raise BadOption(f"{final} holds files this output never wrote; nothing was replaced. Move them away, or "
                        "write to another folder")
    if os.path.exists(final):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
        os.rename(final, os.path.join(trash, "old"))
    os.rename(stage, final)
    fsync_dir(parent)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def redact(url: str) -> str:
    """A URL with any password replaced, safe for logs, errors and manifests."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    creds, host = netloc.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else creds
    shown = f"{user}:***@" if ":" in creds else "***@"
    return f"{scheme}://{shown}{host}{slash}{tail}"
