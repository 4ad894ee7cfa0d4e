"""from_hf / to_hf / upscale_hf without transformers: round trips, file-to-file growth against
in-memory growth, and a clear error for each way the input can be wrong."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stackops as so
from stackops.models import DecoderLM, LMConfig, from_hf, to_hf, upscale_hf
from stackops.models import _safetensors as st

WHERE = lambda m: m.blocks


def _model(seed=0, dtype=None, **kw):
    cfg = LMConfig(vocab_size=40, d_model=16, n_heads=4, n_kv_heads=2, n_layers=4, d_ff=32,
                   max_len=16, mlp="swiglu", **kw)
    m = DecoderLM(cfg, key=jax.random.key(seed))
    return m if dtype is None else jax.tree.map(lambda x: x.astype(dtype), m)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"qkv_bias": True}])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_to_hf_then_from_hf_is_the_identity(kw, dtype, tmp_path):
    model = _model(dtype=dtype, **kw)
    to_hf(model, tmp_path, max_shard_size=3000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = from_hf(tmp_path)
    assert back.config == model.config
    assert _leaves_equal(back, model)


def test_from_hf_casts_on_request(tmp_path):
    model = _model(dtype=jnp.bfloat16)
    to_hf(model, tmp_path)
    back = from_hf(tmp_path, dtype=jnp.float32)
    assert _leaves_equal(back, jax.tree.map(lambda x: x.astype(jnp.float32), model))
    with pytest.raises(ValueError, match="floating"):
        from_hf(tmp_path, dtype=jnp.int32)


@pytest.mark.parametrize(
    "op",
    [so.solar(drop=1), so.llama_pro(every=2), so.interpolate(block=1, t=0.3, at="all"),
     so.loop_tie(block=2, repeats=3), so.compose(so.middle_stack(block=1), so.gstack(times=2))],
    ids=repr,
)
def test_upscale_hf_equals_grow_in_memory(op, tmp_path):
    model = _model()
    to_hf(model, tmp_path / "src")
    preserve = isinstance(op, so.llama_pro)
    plan = upscale_hf(tmp_path / "src", tmp_path / "file", op, preserve=preserve)
    grown = so.grow(model, op, where=WHERE, preserve=preserve or None)
    assert plan == so.plan_for(model, op, where=WHERE)
    from_file = from_hf(tmp_path / "file")
    assert from_file.depth == grown.depth
    # Untie the in-memory model position by position to compare with the (untied) file.
    order = grown.blocks.order or range(grown.blocks.num_layers)
    rows = np.asarray(list(order))
    for a, b in zip(jax.tree.leaves(from_file.blocks), jax.tree.leaves(grown.blocks)):
        # Copies are exact; a mix may differ in its last bit (XLA may fuse multiply-add).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[rows], rtol=1e-6, atol=1e-7)
        if not isinstance(op, so.interpolate):
            assert np.array_equal(np.asarray(a), np.asarray(b)[rows])
    assert np.array_equal(from_file.embed, model.embed)
    rec = json.loads((tmp_path / "file" / "stackops_provenance.json").read_text())
    assert rec["operator"] == repr(op) and rec["depth_out"] == plan.depth_out
    assert rec["preserve"] == preserve


def test_upscale_hf_keeps_dtypes_and_casts_on_request(tmp_path):
    to_hf(_model(dtype=jnp.bfloat16), tmp_path / "src")
    upscale_hf(tmp_path / "src", tmp_path / "a", so.interpolate(block=1))
    assert {str(x.dtype) for x in jax.tree.leaves(from_hf(tmp_path / "a"))} == {"bfloat16"}
    upscale_hf(tmp_path / "src", tmp_path / "b", so.solar(drop=1), dtype="float32")
    assert {str(x.dtype) for x in jax.tree.leaves(from_hf(tmp_path / "b"))} == {"float32"}
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float32"


def test_upscale_hf_follows_per_layer_layer_types(tmp_path):
    to_hf(_model(), tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["layer_types"] = ["a", "b", "c", "d"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    upscale_hf(tmp_path / "src", tmp_path / "out", so.solar(drop=1))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["layer_types"] == ["a", "b", "c", "b", "c", "d"] and out["num_hidden_layers"] == 6


def test_to_hf_keeps_the_like_config_and_copies_tokenizer_files(tmp_path):
    to_hf(_model(), tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["bos_token_id"] = 7
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    model = so.grow(from_hf(tmp_path / "src"), so.solar(drop=1), where=WHERE)
    files = to_hf(model, tmp_path / "out", like=tmp_path / "src")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["bos_token_id"] == 7 and out["num_hidden_layers"] == 6
    assert "tokenizer.json" in files and (tmp_path / "out" / "tokenizer.json").is_file()


def test_from_hf_reads_only_local_directories(tmp_path):
    for bad in ("meta-llama/Llama-3.2-1B", str(tmp_path / "missing"), tmp_path / "file.json"):
        with pytest.raises(NotADirectoryError, match="never downloads"):
            from_hf(bad)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="local directory"):
        from_hf(tmp_path / "file.json")
    with pytest.raises(TypeError, match="path"):
        from_hf(3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)


def _write(tmp_path, model=None):
    to_hf(model or _model(), tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_from_hf_refuses_unsupported_configs(tmp_path):
    cfg = _write(tmp_path)
    for change, match in [
        ({"model_type": "gpt2"}, "model types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0}},
         "not supported"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            from_hf(tmp_path)


def test_from_hf_refuses_missing_extra_and_misshapen_tensors(tmp_path):
    cfg = _write(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match="no tensor 'model.layers.4"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not use"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 33}))
    with pytest.raises(ValueError, match="does not match config.json"):
        from_hf(tmp_path)


def test_truncated_and_corrupt_files_are_errors(tmp_path):
    _write(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_hf(tmp_path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        from_hf(tmp_path)
    path.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        from_hf(tmp_path)


def test_writers_refuse_to_clobber_or_write_onto_their_source(tmp_path):
    model = _model()
    to_hf(model, tmp_path / "a", max_shard_size=3000)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_hf(model, tmp_path / "a")
    to_hf(model, tmp_path / "a", overwrite=True)  # one file now: the old shards are gone
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "a" / st.INDEX_NAME).exists()
    with pytest.raises(ValueError, match="being read"):
        upscale_hf(tmp_path / "a", tmp_path / "a", so.solar(drop=1), overwrite=True)
    with pytest.raises(ValueError, match="depth"):
        upscale_hf(tmp_path / "a", tmp_path / "b", so.solar(drop=1).plan(3))
    with pytest.raises(TypeError, match="preserve"):
        upscale_hf(tmp_path / "a", tmp_path / "b", so.solar(drop=1), preserve="o_proj")


def test_to_hf_refuses_models_that_are_not_llama_family(tmp_path):
    gelu = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=2), key=jax.random.key(0))
    with pytest.raises(ValueError, match="mlp='swiglu'"):
        to_hf(gelu, tmp_path)
    with pytest.raises(TypeError, match="DecoderLM"):
        to_hf({"w": jnp.ones(2)}, tmp_path)
    listed = eqx.tree_at(lambda m: m.blocks, _model(), so.unstack(_model().blocks))
    with pytest.raises(TypeError, match="stackops.stack"):
        to_hf(listed, tmp_path)
