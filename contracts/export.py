"""An exported model: the self-contained folder `yagg export` writes and the inference core and server read. It
needs neither the training workdir nor the dataset.

    DIR/params.safetensors  the EMA parameters, each array named by its path in the tree ("down_0/conv/kernel")
    DIR/text_encoder/       the CLIP that embedded the training captions (Hugging Face layout, safetensors weights)
    DIR/README.md           the model card, for people
    DIR/yagg_model.json     what the folder holds, written LAST (a folder without it is an interrupted export):
        {"format": "yagg-model", "version": 1, "step": N, "config": {the training config},
         "data": {frames, size, fps, text_encoder: {name, max_length, pooled_dim, token_dim}},
         "params": {"file": "params.safetensors", "sha256": HEX}, "scores": {the last eval row, if any},
         "source": {"workdir": ..., "dataset": ...}}

The parameters' sha256 is checked on every read, so a truncated or altered file is refused, never half-loaded. No
file is ever unpickled: JSON and safetensors only. `data.text_encoder.name` records which CLIP embedded the captions
(provenance); the folder's own `text_encoder/` copy is what sampling loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from contracts import storage
from contracts.checkpoint import check_same_arrays
from contracts.dataset import DataFacts
from model.clip import WEIGHT_FILES

FORMAT = "yagg-model"
VERSION = 1
MANIFEST = "yagg_model.json"
PARAMS_FILE = "params.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
CARD = "README.md"


class ExportError(ValueError):
    """The folder is not a complete, intact yagg export (or cannot be written as one)."""


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A read export: everything but the parameters, which `params` loads (and checks) on demand."""

    folder: str
    step: int
    config: ml_collections.ConfigDict
    data: DataFacts
    scores: dict[str, Any]
    source: dict[str, Any]
    params_sha256: str

    @property
    def text_encoder(self) -> str:
        """The folder of the export's own copy of the text encoder."""
        return storage.join(self.folder, TEXT_ENCODER_DIR)

    def params(self, abstract: Any) -> Any:
        """The parameters, checked against the sha256 and the model's `abstract` tree, placed in its shardings."""
        from safetensors.flax import load

        path = storage.join(self.folder, PARAMS_FILE)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise ExportError(f"{path} is missing: the export is incomplete; export the model again") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.params_sha256:
            raise ExportError(
                f"{path} is corrupt: its sha256 is {digest}, {MANIFEST} says {self.params_sha256}; export the model "
                "again"
            )
        flat = load(data)
        stored = unflatten({name: jax.ShapeDtypeStruct(value.shape, value.dtype) for name, value in flat.items()})
        check_same_arrays(stored, abstract, where=self.folder)
        return jax.tree_util.tree_map_with_path(
            lambda path, spec: jax.device_put(flat[_name(path)].astype(spec.dtype), spec.sharding), abstract
        )


def is_export(folder: str) -> bool:
    return storage.exists(storage.join(folder, MANIFEST))


def read_export(folder: str) -> ExportedModel:
    """The export in `folder`; ExportError saying what is wrong with a folder that is not a complete one."""
    path = storage.join(folder, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ExportError(
            f"{folder} is not a complete yagg model export: it has no {MANIFEST} (written last, so an interrupted "
            "`yagg export` leaves none); export it again with `yagg export --workdir W --out DIR`"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): the export is damaged; export the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f'{path} does not describe a yagg model (no "format": "{FORMAT}")')
    if manifest.get("version") != VERSION:
        raise ExportError(
            f"{path} is export format version {manifest.get('version')}; this yagg reads version {VERSION}"
        )
    try:
        exported = ExportedModel(
            folder=folder,
            step=int(manifest["step"]),
            config=ml_collections.ConfigDict(manifest["config"]),
            data=DataFacts.from_dict(manifest["data"]),
            scores=dict(manifest.get("scores") or {}),
            source=dict(manifest.get("source") or {}),
            params_sha256=str(manifest["params"]["sha256"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path} lacks a field or has a wrong one ({type(e).__name__}: {e})") from e
    names = storage.list_names(exported.text_encoder)
    if "config.json" not in names or not names & set(WEIGHT_FILES):
        raise ExportError(
            f"{exported.text_encoder} lacks config.json or the weights ({' or '.join(WEIGHT_FILES)}): the export is "
            "incomplete; export the model again"
        )
    return exported


def write_export(
    out: str,
    *,
    step: int,
    config: ml_collections.ConfigDict,
    data: DataFacts,
    params: Any,
    text_encoder_files: Mapping[str, bytes],
    card: str,
    scores: Mapping[str, Any],
    source: Mapping[str, Any],
) -> None:
    """Writes an export to `out` (an empty or missing folder, local or URL), the manifest last."""
    from safetensors.flax import save

    if storage.list_names(out):
        raise ExportError(f"--out {out} is not empty: export into a new folder")
    flat = {_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    blob = save({name: jax.numpy.asarray(value) for name, value in flat.items()})
    for name, content in text_encoder_files.items():
        storage.write_bytes(storage.join(out, TEXT_ENCODER_DIR, name), content)
    storage.write_bytes(storage.join(out, PARAMS_FILE), blob)
    storage.write_text(storage.join(out, CARD), card)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": config.to_dict(),
        "data": data.to_dict(),
        "params": {"file": PARAMS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
        "scores": dict(scores),
        "source": dict(source),
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree
