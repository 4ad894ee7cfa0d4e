"""One home for "which leaves are stacked" (the decay mask and the FSDP shardings use it),
and `compile_stage`, the trainer's step compiled for one stage (what bench_train times)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness_support import reference_run, smoke, token_dir, train_losses

import stackops as so
from stackops_harness import data
from stackops_harness.cli.bench_train import no_attention_core
from stackops_harness.sharding import make_mesh, shard_rows, stacked_leaves
from stackops_harness.state import (
    _decay_mask,
    build_model,
    compile_stage,
    is_param,
    make_optimizer,
)


def eqx_params(model):
    return eqx.filter(model, is_param)


def _named(tree, mask):
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): m for (p, _), m in zip(paths, jax.tree.leaves(mask))}


def test_stacked_leaves_marks_exactly_the_leaves_under_a_stack():
    params = eqx_params(build_model(smoke(), jax.random.key(0), 3))
    marks = _named(params, stacked_leaves(params))
    assert marks and all(v == (".blocks" in k) for k, v in marks.items()), marks
    # Optimizer moments mirror the parameters: their Stack leaves are marked too; the
    # step count is not.
    opt_state = make_optimizer(smoke())[0].init(params)
    opt_marks = jax.tree.leaves(stacked_leaves(opt_state))
    n_stacked = sum(marks.values())
    assert sum(opt_marks) == 2 * n_stacked  # mu and nu
    assert len(opt_marks) == len(jax.tree.leaves(opt_state))


def test_decay_mask_decays_matrices_by_their_own_rank():
    params = eqx_params(build_model(smoke(), jax.random.key(0), 2))
    mask = _named(params, _decay_mask(params))
    assert mask[".embed"] and mask[".head"]
    attn = [k for k in mask if k.endswith("wqkv") or k.endswith("wo")]
    assert attn and all(mask[k] for k in attn)  # stacked (L, d, 3d): a matrix per layer
    norms = [k for k in mask if "norm" in k]
    assert norms and not any(mask[k] for k in norms)  # stacked (L, d): a vector per layer
    # A plain list of layers (no Stack) takes each leaf's own rank as it is.
    plain = {
        "w": jnp.zeros((3, 4)),
        "layers": [jnp.zeros(4)],
        "s": so.stack([jnp.zeros(4)] * 2),
        "sm": so.stack([jnp.zeros((4, 4))] * 2),
    }
    assert _named(plain, _decay_mask(plain)) == {
        "['layers'][0]": False,
        "['s'].layers": False,
        "['sm'].layers": True,
        "['w']": True,
    }


def test_compile_stage_runs_the_trainers_first_step_bit_identically():
    result, _ = reference_run()  # smoke MIDAS: stage 1 has 1 block
    cfg, mesh = smoke(), make_mesh()
    stage = compile_stage(cfg, 1, mesh)
    assert stage.skeleton.depth == 1 and stage.tokens.shape == (cfg.global_batch, cfg.seq_len + 1)
    it = data.make_train_iter(
        data.load_tokens(token_dir() / "train.bin"),
        seq_len=cfg.seq_len,
        global_batch=cfg.global_batch,
        seed=cfg.data_seed,
    )
    batch = shard_rows(next(it)["tokens"], mesh)
    _, _, metrics = stage.step(stage.params, stage.opt_state, batch)
    assert float(metrics["loss"]) == train_losses(result.metrics_path)[1]


def test_compile_stage_takes_another_attention_core_and_checks_depth():
    cfg, mesh = smoke(), make_mesh()
    stage = compile_stage(cfg, 2, mesh, attention=no_attention_core)
    assert stage.attention == "no_attention_core" and stage.skeleton.depth == 2
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, stage.tokens.shape)
    tokens = shard_rows(rows.astype(np.int32), mesh)  # distinct tokens: attention matters
    p, o, m = stage.step(stage.params, stage.opt_state, tokens)
    ref = compile_stage(cfg, 2, mesh)
    _, _, m_ref = ref.step(ref.params, ref.opt_state, tokens)
    assert float(m["loss"]) != float(m_ref["loss"])  # the core was replaced
    assert optax.tree.norm(p) > 0
    with pytest.raises(ValueError, match="positive int"):
        compile_stage(cfg, 0, mesh)
