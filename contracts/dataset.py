"""The dataset description: `dataset_info.json` as a typed `DatasetInfo`, written by the preprocessing job's commit
(pipeline/shards.py) and read by training, evaluation and inference through `read_dataset_info`.

A dataset folder (local or gs://) holds shard files, dead-letter files and `dataset_info.json`, which the job writes
last: its presence means the folder is complete. `DataFacts` is the part of a dataset that sampling needs once the
dataset itself is gone (frame count, size, frame rate, the text encoder): an exported model carries it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts import records, storage

INFO_FILE = "dataset_info.json"
SPLITS = ("train", "val")
DEFAULT_FPS = 8.0  # a GIF's frame rate when nothing better is known
# Records read to estimate the frame rate of a dataset sampled time-uniformly (no fixed fps).
_RATE_PROBE_RECORDS = 64


class DataError(ValueError):
    """The dataset folder is missing, incomplete, or does not fit the config."""


@dataclasses.dataclass(frozen=True)
class TextEncoderInfo:
    """The CLIP whose text tower embedded the captions, and the shapes of what it stored."""

    name: str  # as the user gave it: a hub id, a local folder or a gs:// folder
    max_length: int  # L: tokens per caption, padded
    pooled_dim: int  # P
    token_dim: int  # D

    def mismatches(self, data_config: Mapping[str, Any]) -> list[str]:
        """The fields of a config's `data` section that disagree with these shapes, as messages (empty: all fit)."""
        pairs = [
            ("data.text_embed_dim", data_config["text_embed_dim"], self.pooled_dim),
            ("data.text_token_dim", data_config["text_token_dim"], self.token_dim),
            ("data.text_max_length", data_config["text_max_length"], self.max_length),
        ]
        return [f"{field}={ours} but {self.name!r} gives {theirs}" for field, ours, theirs in pairs if ours != theirs]


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str  # the name inside the dataset folder
    examples: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Split:
    examples: int
    shards: tuple[Shard, ...]


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Where every manifest line went: lines_read = examples_written + dead_lettered + duplicates_removed."""

    lines_read: int
    examples_written: int
    dead_lettered: int
    duplicates_removed: int
    dead_lettered_by_reason: dict[str, int]
    dead_lettered_by_stage: dict[str, int]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Everything `dataset_info.json` says: the record schema and shapes, how clips were made, splits, accounting."""

    schema_version: int
    frames: int  # F
    size: int  # S (frames are S x S)
    fps: float | None  # frames sampled at this rate; None: spread uniformly over each clip ("time-uniform")
    keep_stills: bool
    text_encoder: TextEncoderInfo
    val_fraction: float
    writer_options: str  # ArrayRecord writer options of the shards
    manifests: tuple[str, ...]
    splits: dict[str, Split]
    dead_letter_files: tuple[str, ...]
    accounting: Accounting

    @property
    def frame_sampling(self) -> str:
        return "time-uniform" if self.fps is None else "fixed fps"

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        """Shape and dtype of every record field (contracts/records.py)."""
        t = self.text_encoder
        return records.features(self.frames, self.size, t.pooled_dim, t.max_length, t.token_dim)

    def to_json(self) -> str:
        value = dataclasses.asdict(self)
        value.update(features=self.features, frame_sampling=self.frame_sampling)
        return json.dumps(value, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = INFO_FILE) -> DatasetInfo:
        """Parses dataset_info.json; DataError for another record schema version or a file that is not one."""
        try:
            value = json.loads(text)
            version = value.get("schema_version")
            if version != records.SCHEMA_VERSION:
                raise DataError(
                    f"{where} was written with record schema version {version} but this yagg reads version "
                    f"{records.SCHEMA_VERSION}: re-run `yagg preprocess` to rewrite the dataset"
                )
            return cls(
                schema_version=version,
                frames=int(value["frames"]),
                size=int(value["size"]),
                fps=None if value["fps"] is None else float(value["fps"]),
                keep_stills=bool(value["keep_stills"]),
                text_encoder=TextEncoderInfo(**value["text_encoder"]),
                val_fraction=float(value["val_fraction"]),
                writer_options=str(value["writer_options"]),
                manifests=tuple(value["manifests"]),
                splits={
                    name: Split(int(split["examples"]), tuple(Shard(**shard) for shard in split["shards"]))
                    for name, split in value["splits"].items()
                },
                dead_letter_files=tuple(value["dead_letter_files"]),
                accounting=Accounting(**value["accounting"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where} is not a yagg dataset description ({type(e).__name__}: {e})") from e

    def check_fits(self, data_config: Mapping[str, Any]) -> None:
        """DataError listing every field of a config's `data` section that disagrees with this dataset's shapes."""
        pairs = [("data.frames", data_config["frames"], self.frames), ("data.size", data_config["size"], self.size)]
        wrong = [f"{name}={ours} but the dataset has {theirs}" for name, ours, theirs in pairs if ours != theirs]
        wrong += self.text_encoder.mismatches(data_config)
        if wrong:
            raise DataError(
                f"the dataset at {data_config['path']} does not fit the config: {'; '.join(wrong)}. Override these "
                "fields (e.g. --config.data.frames=N) or preprocess the data again with the config's values"
            )


def read_dataset_info(folder: str) -> DatasetInfo:
    """The description of the finished dataset in `folder` (local or gs://); DataError if there is none."""
    path = storage.join(folder, INFO_FILE)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist: the folder must be the --output folder of a finished `yagg preprocess` run"
        ) from None
    return DatasetInfo.from_json(text, where=path)


def shard_paths(folder: str, info: DatasetInfo, split: str = "train") -> list[str]:
    """The split's shard files, checked to exist."""
    paths = [storage.join(folder, shard.file) for shard in info.splits[split].shards]
    missing = [p for p in paths if not storage.exists(p)]
    if missing:
        raise DataError(f"{len(missing)} shard file(s) listed in {INFO_FILE} are missing, e.g. {missing[0]}")
    return paths


def local_shards(folder: str, info: DatasetInfo, split: str = "train") -> list[str]:
    """The split's shards as local files, for readers that read only local files (ArrayRecord, hence Grain): the
    shards themselves for a local dataset; for a gs:// one, copies in the cache folder (contracts/storage.py), each
    fetched once and checked against the size dataset_info.json records. Every host of a job keeps a copy; for data
    larger than a host's disk, mount the bucket with gcsfuse and pass the mounted path instead."""
    paths = shard_paths(folder, info, split)
    try:
        return [storage.local_file(p, s.bytes) for p, s in zip(paths, info.splits[split].shards, strict=True)]
    except OSError as e:
        raise DataError(f"cannot copy the dataset's shards from {folder}: {e}") from e


def frame_rate(folder: str, info: DatasetInfo) -> float:
    """The GIF frame rate of the dataset's clips: its fps, or for time-uniform sampling the median rate of the frames
    the first records kept (single-frame clips have none: then DEFAULT_FPS). Only the shards read are fetched."""
    if info.fps:
        return float(info.fps)
    from array_record.python.array_record_module import ArrayRecordReader

    gaps: list[float] = []
    for path, shard in zip(shard_paths(folder, info, "train"), info.splits["train"].shards, strict=True):
        reader = ArrayRecordReader(storage.local_file(path, shard.bytes), "readahead_buffer_size:0")
        try:
            for i in range(min(reader.num_records(), _RATE_PROBE_RECORDS - len(gaps))):
                gaps.extend(np.diff(records.decode(reader.read([i])[0])["frame_times_ms"]).tolist())
        finally:
            reader.close()
        if len(gaps) >= _RATE_PROBE_RECORDS:
            break
    median_ms = float(np.median(gaps)) if gaps else 0.0
    return 1000.0 / median_ms if median_ms > 0 else DEFAULT_FPS


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What sampling must know about the data a model was trained on: the clips' shape and frame rate, and the CLIP
    that embedded the captions (prompts must be embedded by the same one)."""

    frames: int
    size: int
    fps: float
    text_encoder: TextEncoderInfo

    @classmethod
    def of_dataset(cls, folder: str, info: DatasetInfo) -> DataFacts:
        return cls(frames=info.frames, size=info.size, fps=frame_rate(folder, info), text_encoder=info.text_encoder)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DataFacts:
        return cls(
            frames=int(value["frames"]),
            size=int(value["size"]),
            fps=float(value["fps"]),
            text_encoder=TextEncoderInfo(**value["text_encoder"]),
        )
