"""Hugging Face interop, tested against the real clients: transformers (CPU torch) and mergekit.

Every model here is a tiny random one made locally with transformers' own config classes and
`save_pretrained` (or with stackops, then loaded by transformers); nothing is downloaded.
Needs the `hf-test` extra; skipped without it.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stackops as so
from stackops.models import DecoderLM, LMConfig, from_hf, to_hf, upscale_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

WHERE = lambda m: m.blocks
VOCAB, T = 96, 12


def _hf_config(family: str, **kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    base.update(kw)
    if family == "llama":
        return transformers.LlamaConfig(**base)
    if family == "qwen2":
        return transformers.Qwen2Config(**base)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **base)
    raise AssertionError(family)


def _random_hf_model(family: str, seed: int = 0, **kw):
    """A transformers causal LM with every parameter random (norm scales and biases too, so a
    mapping that mixed them up would show)."""
    torch.manual_seed(seed)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[family]
    model = cls(_hf_config(family, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def _tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(2, T))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    return model.eval(), info


def _tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read with the safetensors package itself."""
    from pathlib import Path

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for k, v in safetensors_torch.load_file(str(f)).items():
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


CASES = {
    "llama-mha": ("llama", {}),
    "llama-gqa-tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama-headdim-llama3rope": (
        "llama",
        {
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_theta": 500.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-gqa": ("qwen2", {"num_key_value_heads": 2}),
    "mistral-gqa": ("mistral", {"num_key_value_heads": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_logits_equal_transformers(case, tmp_path):
    family, kw = CASES[case]
    hf = _random_hf_model(family, **kw)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.depth == 4
    if kw.get("tie_word_embeddings"):
        assert model.head is None and model.config.tie_embeddings
    tokens = _tokens()
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(hf, tokens), atol=1e-4, rtol=0)


def _our_model(seed=0, **kw) -> DecoderLM:
    cfg = LMConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=3, d_ff=64, max_len=64, mlp="swiglu",
        norm_eps=1e-5, **kw,
    )
    model = DecoderLM(cfg, key=jax.random.key(seed))
    # Random norm scales and biases (the init sets them to ones/zeros).
    keys = iter(jax.random.split(jax.random.key(seed + 100), 16))
    model = eqx.tree_at(
        lambda m: (m.blocks.layers.norm1.scale, m.blocks.layers.norm2.scale, m.norm_f.scale),
        model,
        replace_fn=lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape),
    )
    if model.blocks.layers.attn.bqkv is not None:
        model = eqx.tree_at(lambda m: m.blocks.layers.attn.bqkv, model,
                            replace_fn=lambda x: 0.1 * jax.random.normal(next(keys), x.shape))
    return model


@pytest.mark.parametrize(
    "kw",
    [{}, {"n_kv_heads": 2, "tie_embeddings": True}, {"n_kv_heads": 2, "qkv_bias": True},
     {"head_dim": 16, "n_kv_heads": 1, "rope_base": 500.0}],
    ids=["llama", "llama-gqa-tied", "qwen2", "llama-headdim"],
)
def test_to_hf_loads_in_transformers_with_no_missing_keys_and_equal_logits(kw, tmp_path):
    model = _our_model(**kw)
    to_hf(model, tmp_path)
    hf, info = _load_hf(tmp_path)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = _tokens(2)
    np.testing.assert_allclose(
        _hf_logits(hf, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=0
    )
    # Every written tensor is its own buffer: safetensors' own loader (which refuses shared
    # storage on save) and transformers' save round-trip both work.
    hf.save_pretrained(tmp_path / "again")


def test_a_loop_tied_model_is_written_as_copies_and_loads(tmp_path):
    model = _our_model()
    tied = so.grow(model, so.loop_tie(block=1, repeats=3), where=WHERE)
    assert tied.blocks.is_tied
    to_hf(tied, tmp_path)
    hf, info = _load_hf(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.num_hidden_layers == tied.depth == 5
    tokens = _tokens(3)
    np.testing.assert_allclose(
        _hf_logits(hf, tokens), np.asarray(tied(jnp.asarray(tokens))), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_pro_expansion_written_by_to_hf_gives_the_original_logits_in_transformers(
    family, tmp_path
):
    hf = _random_hf_model(family, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    grown = so.grow(model, so.llama_pro(every=2), where=WHERE, preserve=True)
    assert grown.depth == 6
    plan = so.plan_for(model, so.llama_pro(every=2), where=WHERE)
    to_hf(grown, tmp_path / "pro", like=tmp_path / "src", provenance=so.provenance(plan))
    hf_pro, info = _load_hf(tmp_path / "pro")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_pro.config.num_hidden_layers == 6
    tokens = _tokens(4)
    np.testing.assert_allclose(_hf_logits(hf_pro, tokens), _hf_logits(hf, tokens), atol=1e-5)
    rec = json.loads((tmp_path / "pro" / "stackops_provenance.json").read_text())
    assert rec["inserted"] == [2, 5]
    # The streaming file-to-file path writes the same checkpoint.
    upscale_hf(tmp_path / "src", tmp_path / "pro2", so.llama_pro(every=2), preserve=True)
    a, b = _tensors(tmp_path / "pro"), _tensors(tmp_path / "pro2")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _mergekit(src, out, op, depth, preserve=False):
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = so.to_mergekit(op, depth, model=str(src), dtype="float32", preserve=preserve)
    conf = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg)))
    run_merge(conf, str(out), MergeOptions(copy_tokenizer=False, quiet=True,
                                           write_model_card=False, clone_tensors=True))


@pytest.mark.parametrize("op", [so.solar(drop=1), so.gstack(times=2)], ids=repr)
def test_upscaling_equals_mergekit_passthrough_tensor_for_tensor(op, tmp_path):
    hf = _random_hf_model("llama", num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "src")
    _mergekit(tmp_path / "src", tmp_path / "mk", op, 4)
    upscale_hf(tmp_path / "src", tmp_path / "ours", op)
    to_hf(so.grow(from_hf(tmp_path / "src"), op, where=WHERE), tmp_path / "mem")
    theirs = _tensors(tmp_path / "mk")
    for out in ("ours", "mem"):
        ours = _tensors(tmp_path / out)
        assert ours.keys() == theirs.keys(), out
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), (out, k)
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert mk_cfg["num_hidden_layers"] == our_cfg["num_hidden_layers"] == op.plan(4).depth_out


def test_llama_pro_identity_blocks_equal_mergekit_with_zero_scaled_projections(tmp_path):
    hf = _random_hf_model("llama", num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "src")
    op = so.llama_pro(every=2)
    _mergekit(tmp_path / "src", tmp_path / "mk", op, 4, preserve=True)
    upscale_hf(tmp_path / "src", tmp_path / "ours", op, preserve=True)
    theirs, ours = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    for k in theirs:  # values equal (mergekit's 0.0 * w may be -0.0)
        assert np.array_equal(ours[k], theirs[k]), k
    assert not ours["model.layers.2.self_attn.o_proj.weight"].any()
    assert ours["model.layers.2.self_attn.q_proj.weight"].any()


def test_sharded_checkpoints_read_and_write(tmp_path):
    hf = _random_hf_model("llama", num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    model = from_hf(tmp_path / "src")
    tokens = _tokens(5)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), _hf_logits(hf, tokens), atol=1e-4, rtol=0
    )
    files = to_hf(model, tmp_path / "out", max_shard_size="40KB")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    hf2, info = _load_hf(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_allclose(_hf_logits(hf2, tokens), _hf_logits(hf, tokens), atol=1e-5)
    src, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(np.array_equal(src[k], out[k]) for k in src)
    # upscale_hf reads shards and writes shards too.
    upscale_hf(tmp_path / "src", tmp_path / "up", so.solar(drop=1), max_shard_size="40KB")
    assert (tmp_path / "up" / "model.safetensors.index.json").is_file()
    assert from_hf(tmp_path / "up").depth == 6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_stored_dtypes_are_kept_bit_for_bit(dtype, tmp_path):
    hf = _random_hf_model("llama", num_key_value_heads=2).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    assert {str(x.dtype) for x in jax.tree.leaves(model)} == {dtype}
    to_hf(model, tmp_path / "out")
    src = safetensors_torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    out = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert src.keys() == out.keys()
    for k in src:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == dtype
