"""The evaluation gallery: `DIR/eval/index.html`, rebuilt after each evaluated checkpoint.

It reads only what the eval job wrote:
  DIR/eval/metrics.jsonl        one JSON object per evaluated step ({"step": N, "<name>": value, ...});
  DIR/eval/STEP/samples.json    [{"file": "<gif name in that folder>", "prompt": ..., "seed": ..., "scores": {...}}].
The page is self-contained (inline CSS and SVG, no scripts, no network), references GIFs by paths relative to itself
(so the folder can be copied or served anywhere), shows one metric curve per score (float), then one section per step,
newest first: its scores and counts (ints, e.g. `fvd/n`), its labels (strings, e.g. `fvd/protocol`), any warnings
(labels named `.../warning`, e.g. an FVD from few clips) and each sample's GIF, prompt, seed and scores.
"""

from __future__ import annotations

import html
import json
import math
import os

from contracts import storage
from contracts.scores import read_rows

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.curves, .samples { display: flex; flex-wrap: wrap; gap: 12px; }
.curve, .sample { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.curve svg { display: block; }
.sample { width: 200px; font-size: 0.85em; }
.sample img { width: 192px; height: 192px; image-rendering: pixelated; display: block; background: #000; }
table.scores td { padding: 0 4px; } .value { text-align: right; font-variant-numeric: tabular-nums; }
.labels { color: #555; font-size: 0.9em; }
.warning { background: #fff4d6; border-left: 4px solid #d99a00; padding: 4px 8px; }
"""

_CURVE_W, _CURVE_H, _PAD = 260, 120, 28


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _curve_svg(name: str, points: list[tuple[int, float]]) -> str:
    """One metric's values against step as an inline SVG polyline with its min/max labelled."""
    points = [(s, v) for s, v in points if isinstance(v, int | float) and math.isfinite(v)]
    if not points:
        return ""
    steps, values = [p[0] for p in points], [p[1] for p in points]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    span_s, span_v = (s1 - s0) or 1, (v1 - v0) or 1

    def xy(s: float, v: float) -> str:
        x = _PAD + (s - s0) / span_s * (_CURVE_W - 2 * _PAD)
        y = _CURVE_H - _PAD - (v - v0) / span_v * (_CURVE_H - 2 * _PAD)
        return f"{x:.1f},{y:.1f}"

    polyline = " ".join(xy(s, v) for s, v in points)
    dots = "".join(f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="2.5"/>' for s, v in points)
    return (
        f'<div class="curve"><div>{html.escape(name)}</div>'
        f'<svg width="{_CURVE_W}" height="{_CURVE_H}" role="img" aria-label="{html.escape(name)} by step">'
        f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{polyline}"/>'
        f'<g fill="#2a6fdb">{dots}</g>'
        f'<text x="2" y="{_PAD - 8}" font-size="10">{_fmt(v1)}</text>'
        f'<text x="2" y="{_CURVE_H - 4}" font-size="10">{_fmt(v0)} · steps {s0}–{s1}</text>'
        "</svg></div>"
    )


def _sample_card(step: int, sample: dict) -> str:
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="value">{_fmt(v)}</td></tr>'
        for k, v in sorted(sample.get("scores", {}).items())
    )
    src = html.escape(f"{step}/{sample['file']}", quote=True)
    prompt = html.escape(sample["prompt"])
    return (
        f'<div class="sample"><img src="{src}" alt="{prompt}"><div><b>{prompt}</b></div>'
        f'<div>seed {sample.get("seed", "")}</div><table class="scores">{rows}</table></div>'
    )


def write_gallery(eval_dir: str | os.PathLike, title: str = "yagg evaluation") -> str:
    """Rebuilds `eval_dir/index.html` (local or gs://) from metrics.jsonl and the per-step samples.json files;
    returns its path."""
    eval_dir = os.fspath(eval_dir)
    rows = sorted(read_rows(eval_dir), key=lambda r: r["step"])
    scores = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, float)})
    curves = "".join(_curve_svg(n, [(r["step"], r[n]) for r in rows if n in r]) for n in scores)
    sections = []
    for row in reversed(rows):
        step = row["step"]
        samples_path = storage.join(eval_dir, str(step), "samples.json")
        samples = json.loads(storage.read_text(samples_path)) if storage.is_file(samples_path) else []
        numbers = [k for k, v in sorted(row.items()) if k != "step" and isinstance(v, int | float)]
        summary = ", ".join(f"{html.escape(n)} {_fmt(row[n])}" for n in numbers)
        labels = " · ".join(
            f"{html.escape(k)}: {html.escape(v)}"
            for k, v in sorted(row.items())
            if isinstance(v, str) and not k.endswith("/warning")
        )
        warnings = "".join(
            f'<p class="warning">{html.escape(k)}: {html.escape(v)}</p>'
            for k, v in sorted(row.items())
            if isinstance(v, str) and k.endswith("/warning")
        )
        cards = "".join(_sample_card(step, s) for s in samples)
        sections.append(
            f'<section id="step-{step}"><h2>Step {step}</h2><p>{summary}</p>{warnings}'
            f'<p class="labels">{labels}</p><div class="samples">{cards}</div></section>'
        )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<h2>Metrics by step</h2><div class="curves">{curves or "<p>No evaluated steps yet.</p>"}</div>'
        f"{''.join(sections)}</body></html>\n"
    )
    out = storage.join(eval_dir, "index.html")
    storage.write_text(out, page)  # written whole: readers never see a half-written page
    return out
