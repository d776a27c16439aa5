"""Finding and reading a CLIP checkpoint: a Hugging Face hub id or a local folder -> checked Flax parameters.

A CLIP is named by a Hugging Face hub id (default `openai/clip-vit-base-patch32`, fetched through huggingface_hub's
cache, honouring HF_HUB_OFFLINE) or by a local folder (a `huggingface-cli download` folder, or one written by
`yagg make-tiny-clip --out DIR`). The folder holds `config.json`, the tokenizer files, optionally
`preprocessor_config.json`, and the weights as `model.safetensors` (PyTorch key layout) or `flax_model.msgpack`.
Pickled weights (`pytorch_model.bin`) are never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.clip.modules import ACTIVATIONS

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")
_HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
# Every file a CLIP folder may need (the weights in one of WEIGHT_FILES): what an exported model copies.
CLIP_FILES = (*_HUB_FILES, *WEIGHT_FILES)


def resolve_clip_dir(name_or_dir: str | Path) -> Path:
    """The local folder of a CLIP named by a folder path or a Hugging Face hub id (downloaded into the hub cache)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"CLIP {str(name_or_dir)!r} is a file; pass the folder that holds config.json")
    if not _is_hub_id(str(name_or_dir)):
        raise FileNotFoundError(
            f"no CLIP folder at {path}; make a tiny one with `yagg make-tiny-clip --out {path}` or pass a "
            f"Hugging Face hub id such as {DEFAULT_CLIP!r}"
        )
    return _download(str(name_or_dir))


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str) -> Path:
    """Fetches the config, tokenizer and one weights file (safetensors preferred) into the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Only one weights file: hub repos often carry the same weights in three formats of ~600 MB each.
        folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, WEIGHT_FILES[0]]))
        if not (folder / WEIGHT_FILES[0]).exists():
            folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, WEIGHT_FILES[1]]))
    except LocalEntryNotFoundError as e:  # nothing cached, and offline (HF_HUB_OFFLINE=1) or the hub is unreachable
        raise FileNotFoundError(
            f"CLIP {repo_id!r} is neither a local folder nor in the Hugging Face cache, and it cannot be downloaded "
            "now (HF_HUB_OFFLINE is set, or the hub is unreachable). Pass a local CLIP folder instead: one made by "
            f"`yagg make-tiny-clip --out DIR`, or one downloaded elsewhere with `huggingface-cli download {repo_id} "
            "--local-dir DIR` and copied here."
        ) from e
    except HfHubHTTPError as e:  # no such repo, a gated one, a bad revision
        raise FileNotFoundError(f"could not fetch CLIP {repo_id!r} from the Hugging Face hub: {e}") from e
    return folder


def read_config(directory: Path) -> Any:
    """The folder's CLIPConfig (transformers fills in the defaults that config.json leaves out)."""
    from transformers import CLIPConfig

    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: it is not a Hugging Face CLIP folder")
    model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{path} describes a {model_type!r} model; yagg needs a full CLIP (model_type 'clip', text and vision "
            "towers), such as openai/clip-vit-base-patch32 or a folder made by `yagg make-tiny-clip`"
        )
    config = CLIPConfig.from_pretrained(str(directory))
    for tower in (config.text_config, config.vision_config):
        if tower.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {tower.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    return config


def read_weights(directory: Path, roots: tuple[str, ...]) -> dict[str, Any]:
    """The parameters under the given top-level names (e.g. text_model, text_projection), in the Flax layout."""
    if (directory / WEIGHT_FILES[0]).is_file():
        return _read_safetensors(directory / WEIGHT_FILES[0], roots)
    if (directory / WEIGHT_FILES[1]).is_file():
        from flax.serialization import msgpack_restore

        state = msgpack_restore((directory / WEIGHT_FILES[1]).read_bytes())
        return {root: state[root] for root in roots if root in state}
    pickled = [name for name in _PICKLED_WEIGHTS if (directory / name).exists()]
    if pickled:
        raise ValueError(
            f"{directory} has its weights only as {', '.join(pickled)}. yagg does not load pickled or TensorFlow "
            "weights (unpickling a file can run arbitrary code). Convert them to model.safetensors, e.g. with "
            "transformers and PyTorch: CLIPModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{directory} has no CLIP weights: expected one of {', '.join(WEIGHT_FILES)}")


def _read_safetensors(path: Path, roots: tuple[str, ...]) -> dict[str, Any]:
    """Reads PyTorch-layout tensors and converts them to Flax's: linear [out, in] -> kernel [in, out], conv OIHW ->
    HWIO, LayerNorm weight -> scale, nn.Embedding weight -> embedding."""
    from safetensors import safe_open

    tree: dict[str, Any] = {}
    # "flax" rather than "numpy": numpy has no bfloat16, which some checkpoints are stored in.
    with safe_open(str(path), framework="flax") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            parts = key.split(".")
            if parts[0] not in roots:
                continue
            value = np.asarray(f.get_tensor(key), np.float32)
            *module, leaf = parts
            if leaf == "weight":
                if value.ndim == 4:
                    leaf, value = "kernel", value.transpose(2, 3, 1, 0)
                elif value.ndim == 2 and module[-1].endswith("embedding"):
                    leaf = "embedding"
                elif value.ndim == 2:
                    leaf, value = "kernel", value.T
                else:
                    leaf = "scale"  # the only 1-D weights in CLIP are LayerNorm's
            node = tree
            for name in module:
                node = node.setdefault(name, {})
            node[leaf] = value
    return tree


def checked_params(module: nn.Module, example_inputs: tuple, loaded: dict, source: Path) -> dict:
    """The loaded parameters that `module` needs, as float32 jax arrays, after checking every name and shape.

    Extra entries (e.g. the `position_ids` buffers some checkpoints carry) are ignored.
    """
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))["params"]
    flat_loaded = {"/".join(k): v for k, v in _flatten(loaded)}
    problems, params = [], {}
    for keys, shape_struct in _flatten(expected):
        name = "/".join(keys)
        if name not in flat_loaded:
            problems.append(f"missing {name}")
        elif tuple(np.shape(flat_loaded[name])) != shape_struct.shape:
            problems.append(f"{name} has shape {np.shape(flat_loaded[name])}, the config says {shape_struct.shape}")
        else:
            _set(params, keys, jnp.asarray(flat_loaded[name], jnp.float32))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"the weights in {source} do not match its config.json: {shown}")
    return params


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        return [item for key in sorted(tree) for item in _flatten(tree[key], (*prefix, str(key)))]
    return [(prefix, tree)]


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
