"""Optimizer pieces (train/state.py) and metric bookkeeping (train/metrics.py), in process, without a model."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train.metrics import StepMetrics, truncate_metrics_file
from train.state import ema_update, learning_rate_schedule, weight_decay_mask

OPTIMIZER = ml_collections.ConfigDict(
    dict(learning_rate=1e-3, warmup_steps=10, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip_norm=1.0)
)


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    schedule = learning_rate_schedule(OPTIMIZER, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-3)  # half way through the cosine
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_applies_to_kernels_only():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 3, 4, 8)), "bias": jnp.ones(8)},
        "norm": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
        "rel_pos_bias": {"table": jnp.ones((65, 2))},
        "dense": {"kernel": jnp.ones((8, 8))},
    }
    mask = weight_decay_mask(params)
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
        "rel_pos_bias": {"table": False},
        "dense": {"kernel": True},
    }


def test_ema_follows_quickly_at_first_then_at_the_configured_decay():
    ema, params = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
    # Step 0: decay min(0.999, 1/10) = 0.1, so the average moves 90% of the way.
    assert float(ema_update(ema, params, jnp.int32(0), 0.999)["w"]) == pytest.approx(0.9)
    # Late in training the configured decay rules.
    assert float(ema_update(ema, params, jnp.int32(100_000), 0.999)["w"]) == pytest.approx(0.001, rel=1e-3)


def _step(loss, buckets_sum, buckets_count):
    return {
        "loss": np.float32(loss),
        "grad_norm": np.float32(2 * loss),
        "param_norm": np.float32(10 + loss),
        "learning_rate": np.float32(loss / 10),
        "bucket_loss_sum": np.asarray(buckets_sum, np.float32),
        "bucket_count": np.asarray(buckets_count, np.float32),
    }


def test_interval_summary_averages_losses_and_reports_only_buckets_with_examples():
    interval = StepMetrics()
    interval.add(_step(1.0, [1.0, 0.0, 3.0, 0.0], [1, 0, 3, 0]))
    interval.add(_step(3.0, [2.0, 0.0, 0.0, 0.0], [1, 0, 0, 0]))
    summary = interval.summary()
    assert summary["loss"] == pytest.approx(2.0) and summary["grad_norm"] == pytest.approx(4.0)
    assert summary["param_norm"] == pytest.approx(13.0) and summary["learning_rate"] == pytest.approx(0.3)
    assert summary["loss_t0of4"] == pytest.approx(1.5) and summary["loss_t2of4"] == pytest.approx(1.0)
    assert "loss_t1of4" not in summary and "loss_t3of4" not in summary


def test_metrics_file_is_cut_back_to_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    truncate_metrics_file(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
