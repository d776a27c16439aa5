"""The `yagg` console command: help lists the subcommands, and make-shapes runs through it."""

import subprocess
import sys
from pathlib import Path

from yagg.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "yagg", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("make-shapes", "make-tiny-clip", "preprocess", "train", "eval", "sample", "export", "serve", "fvd"):
        assert command in out


def test_fvd_help_names_every_flag_the_inputs_and_the_protocol():
    run = subprocess.run([sys.executable, "-m", "yagg", "fvd", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--protocol", "--frames", "--max-clips", "--center-crop", "--split", "--cache", "--batch-size"):
        assert flag in run.stdout
    for words in ("a folder of GIFs", "a manifest file", "yagg preprocess", "224x224", "Fréchet", "Exit status"):
        assert words in run.stdout


def test_make_shapes_command(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path), "--num", "3", "--seed", "1"]) == 0
    assert "wrote 3 GIFs" in capsys.readouterr().out
    assert len(Path(tmp_path, "manifest.tsv").read_text().splitlines()) == 3
    assert len(list((tmp_path / "gifs").glob("*.gif"))) == 3
