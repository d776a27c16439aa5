"""Config loading and command-line overrides (yagg/config.py)."""

import ml_collections
import pytest

from yagg.config import ConfigError, load_config

CONFIG = """
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.batch_size = 8
    c.data = ml_collections.ConfigDict()
    c.data.fps = ml_collections.FieldReference(None, field_type=float)
    c.data.size = 32
    c.data.text_encoder = "openai/clip-vit-base-patch32"
    c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, betas=(0.9, 0.99)))
    c.lock()
    return c
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG)
    return path


def test_overrides_parse_literals_and_strings(config_path):
    config = load_config(
        config_path,
        ["data.size=64", "--config.batch_size=16", "data.fps=8", "optimizer.learning_rate=1", "data.text_encoder=/x/y"],
    )
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.data.size == 64 and config.batch_size == 16
    assert config.data.fps == 8.0
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert config.data.text_encoder == "/x/y"
    config = load_config(config_path, ["optimizer.betas=[0.8, 0.9]"])
    assert config.optimizer.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sise=64", "no field 'data.sise'"),
        ("dta.size=64", "no section 'dta'"),
        ("data.size", "not of the form"),
        ("data.size=big", "data.size=big"),
    ],
)
def test_bad_overrides_fail_clearly(config_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_path, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")
