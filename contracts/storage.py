"""The path layer: every path a user gives yagg (workdir, data, manifests, GIFs, exported models, text encoders,
caches, eval outputs) goes through here, local paths and `gs://` alike.

It is `etils.epath`, the layer Orbax itself writes checkpoints with, so yagg's own files and Orbax's share one
implementation: local paths go to the operating system, `gs://bucket/...` to Cloud Storage through fsspec's gcsfs
(credentials: Google's application-default ones). epath is told not to use TensorFlow's file system for gs:// (it
would, since TensorBoard's writer brings TensorFlow in): TensorFlow's GCS client is a second implementation with its
own behaviour, and it ignores `STORAGE_EMULATOR_HOST`, which gcsfs (and google-cloud-storage) honour, so a local
storage emulator serves every part of yagg in tests. Orbax's array data goes through tensorstore, which reads
`TENSORSTORE_GCS_HTTP_URL` for the same purpose.

Any other scheme (`s3://`, `http://` as a folder) or a mistyped one (`gs:/bucket`, `gcs://`) is refused by `path` with
a clear message, so a URL never becomes a local folder named after it.

Object stores have no folders, only name prefixes, and no rename or append: `write_bytes` writes an object whole (and
a local file through a temporary name, so readers never see half of it); `append_text` rewrites a remote file;
`list_names` lists the first name component below a prefix. Programs that only read local files (ArrayRecord,
Grain, the CLIP loader) get local copies: `local_copy` (a folder) and `local_file` (one file, checked against its
expected size).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

# Before etils reads it (at each path it makes): gs:// through fsspec, never TensorFlow (module doc).
os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):
    # An emulator serves Cloud Storage's JSON API only: gcsfs's gRPC probe of a bucket's layout would time out.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec.config  # noqa: E402
from etils import epath  # noqa: E402  (after the environment above)

# gcsfs caches folder listings for the life of a process by default, so a process that waits for new files (eval
# --follow, the server's --follow, a poll for a checkpoint) would never see them: every look asks the store.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


class PathError(ValueError):
    """A path yagg cannot use: a scheme it does not support, or a URL with a typo."""


def check(path: str | os.PathLike, what: str = "path") -> str:
    """`path` as a string if yagg can use it; PathError naming `what` and the problem otherwise."""
    text = os.fspath(path)
    match = _SCHEME.match(text)
    if match is None:
        return text
    scheme = match.group(1)
    if scheme.lower() in SCHEMES and text.startswith(f"{scheme}://") and len(text) > len(scheme) + 3:
        return text
    if scheme.lower() in SCHEMES:
        raise PathError(f"{what} {text!r} is not a valid {scheme}:// URL (write gs://BUCKET/PATH)")
    raise PathError(
        f"{what} {text!r}: the {scheme}:// scheme is not supported; yagg reads and writes local paths and gs:// "
        "(Cloud Storage). Copy the data there, or mount it (gcsfuse, NFS) and pass the local path"
    )


def is_url(path: str | os.PathLike) -> bool:
    """True for gs:// paths, False for local ones."""
    return _SCHEME.match(os.fspath(path)) is not None


def path(p: str | os.PathLike, what: str = "path") -> epath.Path:
    """An epath.Path (pathlib's interface, for local paths and gs:// alike), after `check`."""
    return epath.Path(check(p, what))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for local paths and URLs alike."""
    if is_url(base):
        return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(os.fspath(base), *parts)


def exists(p: str | os.PathLike) -> bool:
    """Whether a file or folder (on object stores: anything below the prefix) is at `p`."""
    return path(p).exists()


def is_file(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def read_bytes(p: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError naming the path if there is none."""
    target = path(p)
    if not target.is_file():
        raise FileNotFoundError(f"no file at {p}")
    return target.read_bytes()


def read_text(p: str | os.PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def open_read(p: str | os.PathLike, *, decompress: bool = False) -> IO[bytes]:
    """A binary stream of the file; with `decompress`, .gz and .bz2 files are read decompressed."""
    stream = path(p).open("rb")
    name = os.fspath(p).lower()
    if decompress and name.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)
    if decompress and name.endswith(".bz2"):
        return bz2.BZ2File(stream)
    return stream


# The process's umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _publish(tmp: str, target: str) -> None:
    """Renames a finished temporary file into place with the permissions a plain open() would have given it
    (temporary files are created private, 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes the whole file so that a reader sees the old content or the new, never half of it: locally through a
    temporary file renamed into place (parent folders are created); on object stores an object appears whole."""
    if is_url(p):
        path(p).write_bytes(data)
        return
    target = os.fspath(p)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(target)), prefix=".tmp-", delete=False) as tmp:
        tmp.write(data)
    _publish(tmp.name, target)


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def upload(local: str, target: str | os.PathLike) -> None:
    """Copies a local file to `target` (local or gs://), streaming it; readers never see half of it."""
    if not is_url(target):
        folder = os.path.dirname(os.path.abspath(os.fspath(target)))
        os.makedirs(folder, exist_ok=True)
        with open(local, "rb") as src, tempfile.NamedTemporaryFile(dir=folder, delete=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        _publish(dst.name, os.fspath(target))
        return
    with open(local, "rb") as src, path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def append_text(p: str | os.PathLike, text: str) -> None:
    """Appends to a file (creating it): locally in place; on object stores, which cannot append, by rewriting it."""
    if is_url(p):
        old = read_bytes(p) if is_file(p) else b""
        write_bytes(p, old + text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(p))), exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)


def makedirs(p: str | os.PathLike) -> None:
    """Creates a local folder and its parents; nothing to do on object stores (folders are name prefixes)."""
    if not is_url(p):
        os.makedirs(p, exist_ok=True)


def list_names(folder: str | os.PathLike) -> set[str]:
    """Names directly inside `folder` (files, and the first component of longer names below it); empty if none."""
    target = path(folder)
    if not target.is_dir():
        return set()
    return {child.name for child in target.iterdir()}


def glob(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted, local paths made absolute: `*` and `?` within one name, `**` across
    folders (`dir/**/*.tsv` also matches `dir/a.tsv`), `[...]` a set of characters."""
    if not is_url(pattern):
        pattern = os.path.abspath(pattern)
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if first is None:
        return [pattern] if is_file(pattern) else []
    base = "/".join(parts[:first]) or "/"
    regex = re.compile(_glob_regex("/".join(parts[first:])))
    if "**" not in pattern:  # one level at a time: cheap on object stores
        return sorted(os.fspath(p) for p in path(base).glob("/".join(parts[first:])) if p.is_file())
    prefix = base.rstrip("/") + "/"
    return [f for f in iter_files(base) if regex.fullmatch(f[len(prefix) :])]


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out, i = out + re.escape("["), i + 1
            else:
                out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def remove(p: str | os.PathLike) -> None:
    """Deletes a file, or a folder with everything below it; nothing if there is none."""
    target = path(p)
    if target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def move(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Moves a file or a folder (on object stores, which cannot rename: copies every object, then deletes them)."""
    source, destination = os.fspath(source), os.fspath(destination)
    if not is_url(source) and not is_url(destination):
        os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
        os.replace(source, destination)
        return
    if is_file(source):
        write_bytes(destination, read_bytes(source))
    else:
        prefix = source.rstrip("/") + "/"
        for file in list(iter_files(source)):
            write_bytes(join(destination, file[len(prefix) :]), read_bytes(file))
    remove(source)


def iter_files(folder: str | os.PathLike) -> Iterator[str]:
    """Every file below `folder`, recursively, sorted."""
    root = path(folder)
    scheme = _SCHEME.match(os.fspath(folder))
    found = []
    for directory, _, files in root.walk():  # on object stores one listing of the prefix, not a request per folder
        for name in files:
            file = os.fspath(directory / name)
            # fsspec lists object names without their scheme: give them back the one `folder` has.
            found.append(file if not scheme or _SCHEME.match(file) else f"{scheme.group(1)}://{file}")
    yield from sorted(found)


class LocalMirror:
    """A local folder standing in for `target`, for writers that write only local files (TensorFlow's TensorBoard
    writer): they write into `local`, a fresh temporary folder, and `sync` copies every file that grew since the last
    sync to `target`. For a local target, `local` is the target itself and `sync` does nothing."""

    def __init__(self, target: str) -> None:
        self.target = check(target)
        self.local = tempfile.mkdtemp(prefix="yagg-mirror-") if is_url(target) else self.target
        os.makedirs(self.local, exist_ok=True)
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        if not is_url(self.target):
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                local = os.path.join(root, name)
                size = os.path.getsize(local)
                if self._sizes.get(local) != size:
                    with open(local, "rb") as f:
                        write_bytes(join(self.target, os.path.relpath(local, self.local)), f.read())
                    self._sizes[local] = size


def _cache_root() -> str:
    return os.environ.get("YAGG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "yagg"
    )


def local_copy(folder: str) -> str:
    """A local folder with the files directly inside `folder`: `folder` itself when it is local (or a name that is no
    path at all, such as a Hugging Face hub id), else a copy under the cache folder, made once per machine (a
    `.complete` marker is written last and every file is renamed into place, so concurrent or interrupted copies
    never leave half a folder behind)."""
    if not is_url(folder):
        return folder
    local = os.path.join(_cache_root(), "copies", hashlib.sha256(folder.rstrip("/").encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(local, ".complete")):
        return local
    files = [child for child in path(folder).iterdir() if child.is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no files found in that folder")
    os.makedirs(local, exist_ok=True)
    for child in files:
        _download(child, os.path.join(local, child.name))
    open(os.path.join(local, ".complete"), "w").close()
    return local


def local_file(p: str, expected_bytes: int | None = None) -> str:
    """A local path holding the file `p`: `p` itself when local, else a copy in the cache folder, downloaded once and
    checked against `expected_bytes` (a copy of another size, from an interrupted run or a changed file, is fetched
    again; a download of another size raises OSError)."""
    if not is_url(p):
        return p
    digest = hashlib.sha256(p.encode()).hexdigest()[:16]
    local = os.path.join(_cache_root(), "files", digest, os.path.basename(p))
    if os.path.isfile(local) and (expected_bytes is None or os.path.getsize(local) == expected_bytes):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    _download(path(p), local)
    size = os.path.getsize(local)
    if expected_bytes is not None and size != expected_bytes:
        os.remove(local)
        raise OSError(f"{p} has {size} bytes but {expected_bytes} were expected: the file changed or is incomplete")
    return local


def _download(source: epath.Path, target: str) -> None:
    """Streams one object to a local file (weights and shards can be GBs), renamed into place when whole."""
    with (
        source.open("rb") as src,
        tempfile.NamedTemporaryFile(dir=os.path.dirname(target), prefix=".tmp-", delete=False) as dst,
    ):
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    _publish(dst.name, target)
