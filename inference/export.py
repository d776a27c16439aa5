"""`yagg export`: a training checkpoint -> a self-contained model folder (contracts/export.py) that samples with
neither the workdir nor the dataset.

    yagg export --workdir runs/demo --out models/shapes-800
    yagg sample --model models/shapes-800 "a red circle moving left" --out red.gif

The folder holds the checkpoint's EMA parameters (safetensors), the training config, the facts of the data that
sampling needs (frames, size, frame rate, text shapes), a copy of the text encoder, and a README model card with the
step, the data and the newest eval scores of the run, if it was evaluated.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def export(workdir: str, out: str, *, step: int | None = None) -> dict[str, Any]:
    """Exports checkpoint `step` of `workdir` (default: its newest finished one) to `out`, which must be empty or
    missing; returns {"step", "out", "files"}. GenerateError for anything the user can fix."""
    import jax

    from contracts import checkpoint as checkpoint_lib
    from contracts import export as export_lib
    from contracts import scores, storage
    from contracts.dataset import DataError, read_dataset_info
    from inference.generator import GenerateError, placement, training_data_facts
    from model.clip import CLIP_FILES, resolve_clip_dir

    try:
        reader, found = checkpoint_lib.find_checkpoint(workdir=workdir)
        if step is not None and step not in reader.steps():
            raise GenerateError(f"--step {step}: no finished checkpoint of that step in {reader.directory}")
        step = found if step is None else step
        config = reader.config(step)
        facts = training_data_facts(config)
        _, abstract, _ = placement(config, None)
        params = jax.device_get(reader.params(step, abstract))
    except checkpoint_lib.ReadError as e:
        raise GenerateError(str(e)) from e
    try:
        clip_dir = resolve_clip_dir(storage.local_copy(facts.text_encoder.name))
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot find the text encoder {facts.text_encoder.name!r} to copy it: {e}") from e
    text_files = {name: (clip_dir / name).read_bytes() for name in CLIP_FILES if (clip_dir / name).is_file()}
    rows = scores.read_rows(storage.join(workdir, scores.EVAL_DIR))
    evaluated = [row for row in rows if row["step"] <= step]
    last_scores = max(evaluated, key=lambda row: row["step"]) if evaluated else {}
    try:
        dataset = read_dataset_info(str(config.data.path))
    except DataError:
        dataset = None
    source = {"workdir": str(workdir), "dataset": str(config.data.path)}
    card = model_card(config, facts, step, last_scores, dataset, source)
    try:
        export_lib.write_export(
            out,
            step=step,
            config=config,
            data=facts,
            params=params,
            text_encoder_files=text_files,
            card=card,
            scores=last_scores,
            source=source,
        )
    except export_lib.ExportError as e:
        raise GenerateError(str(e)) from e
    return {"step": step, "out": out, "files": sorted(storage.list_names(out))}


def model_card(
    config: Any, facts: Any, step: int, last_scores: dict[str, Any], dataset: Any, source: dict[str, str]
) -> str:
    """The README of an exported model: what it is, what it was trained on, how it scored, how to sample it."""
    m, s = config.model, config.sampling
    lines = [
        "# yagg text-to-GIF model",
        "",
        f"A conditional 3D U-Net diffusion model exported from step {step} of the training run `{source['workdir']}`"
        f" (`num_train_steps` {config.num_train_steps}).",
        "",
        "## Output",
        f"- {facts.frames} frames of {facts.size} x {facts.size} pixels, shown at {facts.fps:.3g} frames per second",
        f"- text encoder: `{facts.text_encoder.name}` (a copy is in `text_encoder/`), captions of at most "
        f"{facts.text_encoder.max_length} tokens",
        "",
        "## Model",
        f"- U-Net: channels {m.channels}, channel multipliers {tuple(m.channel_mults)}, {m.num_res_blocks} residual "
        f"block(s) per level, attention at {tuple(m.attention_resolutions)}, {m.conv_mode} convolutions",
        f"- diffusion: {config.diffusion.schedule} schedule, {config.diffusion.num_timesteps} timesteps, predicts "
        f"{config.diffusion.prediction_type}; parameters are the EMA (decay {config.ema_decay})",
        f"- sampling defaults: {s.method}, {s.num_steps} steps, guidance {s.guidance_scale}, eta {s.eta}",
        "",
        "## Data",
    ]
    if dataset is not None:
        acc = dataset.accounting
        lines += [
            f"- `{source['dataset']}`, from {', '.join(f'`{m}`' for m in dataset.manifests)}",
            f"- {dataset.splits['train'].examples} training and {dataset.splits['val'].examples} validation clips "
            f"({acc.lines_read} manifest lines: {acc.dead_lettered} dead-lettered, {acc.duplicates_removed} "
            "duplicates)",
            f"- frames sampled {dataset.frame_sampling}" + (f" at {dataset.fps:g} fps" if dataset.fps else ""),
        ]
    else:
        lines.append(f"- `{source['dataset']}` (not on the exporting machine: no counts)")
    lines += ["", "## Evaluation"]
    if last_scores:
        lines.append(f"The run's newest evaluation at or before this step (step {last_scores['step']}):")
        lines.append("")
        lines += [f"- {name}: {value:.4g}" for name, value in last_scores.items() if isinstance(value, float)]
        lines += [f"- {name}: {value}" for name, value in last_scores.items() if isinstance(value, str)]
    else:
        lines.append("Not evaluated (`yagg eval` had not scored a checkpoint of this run).")
    lines += [
        "",
        "## Use",
        "```sh",
        'yagg sample --model THIS_FOLDER "a prompt" --out clip.gif --seed 0',
        "yagg serve --model THIS_FOLDER",
        "```",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg export",
        description="Write a self-contained model folder from a training checkpoint: EMA parameters (safetensors), "
        "config, data facts, the text encoder and a model card. `yagg sample --model DIR` and `yagg serve --model "
        "DIR` read it without the workdir or the dataset.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--workdir", required=True, help="the training run's folder (WORKDIR/checkpoints/STEP), local or gs://"
    )
    parser.add_argument("--step", type=int, help="the checkpoint to export (default: the newest finished one)")
    parser.add_argument("--out", required=True, help="the model folder to write, local or gs://; empty or missing")
    return parser


def main(argv: Sequence[str]) -> int:
    """`yagg export ARGS`; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from contracts.storage import PathError
    from inference.generator import GenerateError

    try:
        result = export(args.workdir, args.out, step=args.step)
    except (GenerateError, PathError) as e:
        print(f"yagg export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {result['step']} of {args.workdir} to {result['out']}: {', '.join(result['files'])}")
    return 0
