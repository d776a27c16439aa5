"""The evaluation gallery renders in a real browser (headless Chromium) with every GIF present."""

import io
import json
import re
from pathlib import Path

import browser
import numpy as np
import pytest
from PIL import Image

from eval.gallery import write_gallery


def _write_eval_dir(eval_dir, steps=(100, 200)):
    rng = np.random.default_rng(0)
    with open(eval_dir / "metrics.jsonl", "w") as f:
        for i, step in enumerate(steps):
            f.write(json.dumps({"step": step, "probe/color_acc": 0.5 + 0.2 * i, "val/loss": 0.3 - 0.1 * i}) + "\n")
            (eval_dir / str(step)).mkdir()
            samples = []
            for j, prompt in enumerate(["a red circle moving left", "a <b>blue</b> square & more"]):
                frames = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
                name = f"{j:02d}.gif"
                frames[0].save(eval_dir / str(step) / name, save_all=True, append_images=frames[1:], duration=100)
                samples.append({"file": name, "prompt": prompt, "seed": j, "scores": {"probe/color": 1.0}})
            (eval_dir / str(step) / "samples.json").write_text(json.dumps(samples))


def test_page_structure(tmp_path):
    _write_eval_dir(tmp_path)
    page = Path(write_gallery(tmp_path)).read_text()
    # Newest step first, prompts escaped, images by relative path, one curve per metric.
    assert page.index('id="step-200"') < page.index('id="step-100"')
    assert "a &lt;b&gt;blue&lt;/b&gt; square &amp; more" in page and "<b>blue</b>" not in page
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {"100/00.gif", "100/01.gif", "200/00.gif", "200/01.gif"}
    assert page.count("<polyline") == 2


def test_counts_labels_and_warnings_are_shown_beside_the_scores_without_curves(tmp_path):
    row = {
        "step": 10,
        "fvd": 812.5,
        "fvd/n": 48,
        "fvd/n_ref": 32,
        "fvd/protocol": "reference (16 frames, stretch to 224x224, sqrtm eigh)",
        "fvd/warning": "FVD from 48 and 32 clips, fewer than 2048 per side: <biased>",
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    page = Path(write_gallery(tmp_path)).read_text()
    assert page.count("<polyline") == 1  # fvd only: counts and labels are not curves
    assert "fvd 812.5, fvd/n 48, fvd/n_ref 32" in page
    assert "fvd/protocol: reference (16 frames, stretch to 224x224, sqrtm eigh)" in page
    warning = "fvd/warning: FVD from 48 and 32 clips, fewer than 2048 per side: &lt;biased&gt;"
    assert f'<p class="warning">{warning}</p>' in page


def test_empty_eval_dir(tmp_path):
    assert "No evaluated steps yet" in Path(write_gallery(tmp_path)).read_text()


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.NEEDS_CHROMIUM)
def test_renders_in_a_real_browser_with_every_gif(tmp_path):
    _write_eval_dir(tmp_path)
    index = Path(write_gallery(tmp_path))
    with browser.page() as page:
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(browser.IMAGES)
        assert images == {"count": 4, "broken": []}
        assert page.locator("svg polyline").count() == 2  # a curve per score
        shot = page.screenshot(full_page=True)
    with Image.open(io.BytesIO(shot)) as im:
        assert np.asarray(im.convert("RGB")).std() > 5  # something was drawn, not a blank page
