"""`yagg train` / `python -m train.main` usage errors: a message and status 2, before any training starts."""

from pathlib import Path

import pytest

from train.main import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config.data.path=/nonexistent"], "must be the --output folder of a finished `yagg preprocess` run"),
        (["--num_processes=2"], "go together: give all three"),
        (["--config.batch_size", "8"], "unrecognised argument(s) 8"),
        (["--config.no_such_field=1"], "the config has no field 'no_such_field'"),
        (["--config.log_every=0"], "log_every must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_a_message(extra, message, tmp_path, capsys):
    assert main(["--config", CONFIG, "--workdir", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
