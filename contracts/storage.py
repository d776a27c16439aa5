"""The path layer: every file yagg reads or writes at a path a user gave goes through these functions.

A path is either local (a plain file-system path) or a URL `scheme://bucket/...`. Local paths go straight to the
operating system. URLs go through Apache Beam's `FileSystems`, the layer the preprocessing job writes its output
with, so that what one stage writes to `gs://` the next one reads with the same code (Beam's GCS filesystem comes
with `pip install 'yagg[gcp]'`). Beam is imported only when a URL is actually used.

Object stores have no folders, only name prefixes: `list_names` lists the first path component below a prefix, and
"a folder exists" means "something is stored below it".
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths (handled by Beam's FileSystems), False for local ones."""
    return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(str(base), *parts)


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def exists(path: str | os.PathLike) -> bool:
    """Whether a file (or, locally, a folder) is at `path`."""
    if is_url(path):
        return _filesystems().exists(str(path))
    return os.path.exists(path)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError naming the path if there is none."""
    if not is_url(path):
        return Path(path).read_bytes()
    from apache_beam.io.filesystem import CompressionTypes

    if not exists(path):
        raise FileNotFoundError(f"no file at {path}")
    with _filesystems().open(str(path), compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes the whole file so that a reader sees the old content or the new, never half of it: locally through a
    temporary file renamed into place (parent folders are created); on object stores an object appears whole."""
    if is_url(path):
        from apache_beam.io.filesystem import CompressionTypes

        with _filesystems().create(str(path), compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def list_names(folder: str | os.PathLike) -> set[str]:
    """Names directly inside `folder` (files, and the first component of longer names below it); empty if none."""
    if not is_url(folder):
        return set(os.listdir(folder)) if os.path.isdir(folder) else set()
    prefix = str(folder).rstrip("/") + "/"
    matches = _filesystems().match([prefix + "**"])[0].metadata_list
    return {m.path[len(prefix) :].split("/", 1)[0] for m in matches}


def local_copy(folder: str) -> str:
    """A local folder with the files directly inside `folder`: `folder` itself when it is local, else a cache copy
    under the temporary directory, made once per machine (a `.complete` marker is written last, and every file is
    renamed into place, so concurrent or interrupted copies never leave half a folder behind)."""
    if not is_url(folder):
        return folder
    folder = folder.rstrip("/")
    local = os.path.join(tempfile.gettempdir(), "yagg-copies", hashlib.sha256(folder.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(local, ".complete")):
        return local
    names = sorted(name for name in list_names(folder) if exists(join(folder, name)))
    if not names:
        raise FileNotFoundError(f"{folder}: no files found in that folder")
    os.makedirs(local, exist_ok=True)
    for name in names:
        _download(join(folder, name), os.path.join(local, name))
    open(os.path.join(local, ".complete"), "w").close()
    return local


def _download(url: str, target: str) -> None:
    """Streams one object to a local file (weights can be GBs), renamed into place when whole."""
    from apache_beam.io.filesystem import CompressionTypes

    with (
        _filesystems().open(url, compression_type=CompressionTypes.UNCOMPRESSED) as src,
        tempfile.NamedTemporaryFile(dir=os.path.dirname(target), delete=False) as dst,
    ):
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(dst.name, target)
