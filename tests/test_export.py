"""`yagg export` (inference/export.py) and the exported model contract (contracts/export.py), on the tiny run."""

import json
import shutil

import pytest

from inference.export import main as export_main
from inference.sample import main as sample_main

PROMPT = "a green triangle moving right"


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def test_the_export_holds_everything_sampling_needs_and_a_model_card(exported, tiny_run):
    names = {p.name for p in exported.iterdir()}
    assert names == {"yagg_model.json", "params.safetensors", "text_encoder", "README.md"}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {
        p.name for p in (exported / "text_encoder").iterdir()
    }
    manifest = json.loads((exported / "yagg_model.json").read_text())
    assert manifest["step"] == 4 and manifest["data"]["frames"] == 4 and manifest["data"]["size"] == 16
    assert manifest["scores"]["step"] == 4 and "probe/color_acc" in manifest["scores"]  # the run's newest eval row
    card = (exported / "README.md").read_text()
    assert "step 4" in card and "probe/color_acc" in card and "yagg sample --model" in card


def test_sampling_the_export_is_byte_identical_to_sampling_the_workdir(exported, tiny_run, tmp_path):
    from_workdir, from_export = tmp_path / "w.gif", tmp_path / "e.gif"
    common = [PROMPT, "--seed", "7", "--steps", "3"]
    assert sample_main(["--workdir", str(tiny_run.workdir), *common, "--out", str(from_workdir)]) == 0
    # The export needs neither the workdir nor the dataset: sample it from a copy elsewhere.
    assert sample_main(["--model", str(exported), *common, "--out", str(from_export)]) == 0
    assert from_export.read_bytes() == from_workdir.read_bytes()


def test_a_tampered_partial_or_foreign_folder_is_refused_clearly(exported, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    data = bytearray((tampered / "params.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "params.safetensors").write_bytes(bytes(data))
    partial = tmp_path / "partial"
    shutil.copytree(exported, partial)
    (partial / "yagg_model.json").unlink()
    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(exported, no_encoder)
    (no_encoder / "text_encoder" / "model.safetensors").unlink()
    for folder, message in [
        (tampered, "is corrupt: its sha256"),
        (partial, "not a complete yagg model export"),
        (no_encoder, "lacks config.json or the weights"),
    ]:
        assert sample_main(["--model", str(folder), PROMPT, "--out", str(tmp_path / "x.gif")]) == 2
        assert message in capsys.readouterr().err


def test_export_refuses_an_unknown_step_and_a_non_empty_folder(tiny_run, exported, capsys):
    assert export_main(["--workdir", str(tiny_run.workdir), "--step", "3", "--out", str(exported.parent / "x")]) == 2
    assert "no finished checkpoint of that step" in capsys.readouterr().err
    assert export_main(["--workdir", str(tiny_run.workdir), "--out", str(exported)]) == 2
    assert "is not empty" in capsys.readouterr().err
