"""The presets' sizes that the docs state are counted from the models they build."""

from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from stackops_harness.cli.midas import PRESETS as MIDAS_PRESETS
from stackops_harness.config import TrainConfig, preset
from stackops_harness.state import build_model, is_param

ROOT = Path(__file__).resolve().parents[2]


def params_at_final_depth(cfg: TrainConfig) -> int:
    model = eqx.filter_eval_shape(lambda: build_model(cfg, jax.random.key(0), cfg.depth))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(eqx.filter(model, is_param)))


def test_training_presets_sizes_in_the_docs_are_counted():
    training = (ROOT / "docs" / "training.md").read_text()
    gpu = params_at_final_depth(preset("gpu"))
    cpu = params_at_final_depth(preset("cpu"))
    assert f"({gpu / 1e6:.0f}M params)" in training
    assert f"({cpu / 1e6:.1f}M params)" in training


def test_midas_gpu_preset_size_in_the_docs_is_counted():
    n = params_at_final_depth(TrainConfig(**MIDAS_PRESETS["gpu"]["train"]))
    said = f"# {n / 1e6:.0f}M parameters"
    assert said in (ROOT / "docs" / "reproduce.md").read_text()
    assert said in (ROOT / "stackops_harness" / "cli" / "midas.py").read_text()
