"""A reference pre-LN decoder-only transformer LM whose blocks are a `stackops.Stack`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._stack import Stack

__all__ = [
    "LMConfig",
    "Norm",
    "Attention",
    "MLP",
    "Block",
    "DecoderLM",
    "flops_per_token",
    "causal_attention",
    "AttentionFn",
]

AttentionFn = Callable[
    [
        Float[Array, "B T H Dh"],
        Float[Array, "B T H Dh"],
        Float[Array, "B T H Dh"],
        "tuple[Array, Array] | None",
    ],
    Float[Array, "B T H Dh"],
]
"""`(q, k, v, rope) -> out`, arrays `(batch, time, heads, head_dim)`: the attention core
that [`Attention`][stackops.models.Attention] calls after its projections. `rope` is `None`
or the `(cos, sin)` tables of [`rope_tables`][stackops.models.rope_tables], to rotate `q`
and `k` by before the scores (so a fused kernel can apply them on the fly)."""


ROPE_SCALINGS = ("linear", "llama3")
"""The rotary scalings `LMConfig.rope_scaling` knows, by their `rope_type` in config.json."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of [`stackops.models.DecoderLM`][].

    The defaults are the reference model (GELU MLP, multi-head attention, untied embeddings,
    no biases). The other options make the model a Llama-family decoder as a Hugging Face
    `config.json` describes it (see [`stackops.models.from_hf`][]).

    **Arguments:**

    - `vocab_size`: number of token ids (256 for bytes).
    - `d_model`, `n_heads`, `d_ff` (default `4 * d_model`): widths.
    - `n_layers`: depth at initialisation (growth changes the model's depth, not this).
    - `max_len`: longest sequence (sizes the learned position table).
    - `norm`: `"rms"` (RMSNorm) or `"layer"` (LayerNorm).
    - `pos`: `"rope"` (rotary) or `"learned"` positions.
    - `n_kv_heads`: key/value heads for grouped-query attention (`None`: `n_heads`); must
      divide `n_heads`.
    - `head_dim`: width of one head (`None`: `d_model // n_heads`).
    - `mlp`: `"gelu"` (`w_out · gelu(w_in · x)`) or `"swiglu"`
      (`w_out · (silu(w_gate · x) * (w_in · x))`, Llama's MLP).
    - `norm_eps`: the epsilon inside the norms' square root.
    - `rope_base`: the rotary base (`rope_theta`).
    - `rope_scaling`: `None`, or a mapping with `rope_type` `"linear"` (`factor`) or
      `"llama3"` (`factor`, `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings`), as in config.json; stored as sorted pairs so
      the config stays hashable.
    - `tie_embeddings`: the head is the transposed embedding (no `head` array).
    - `qkv_bias`: biases on the query/key/value projections (Qwen2).

    !!! Example

        ```python
        from stackops.models import LMConfig

        cfg = LMConfig(d_model=64, n_heads=4, n_layers=2)
        assert cfg.ff == 256
        llama = LMConfig(d_model=64, n_heads=4, n_kv_heads=2, mlp="swiglu", d_ff=128,
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
        assert llama.kv_heads == 2 and llama.head_size == 16
        ```
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int | None = None
    max_len: int = 256
    norm: Literal["rms", "layer"] = "rms"
    pos: Literal["rope", "learned"] = "rope"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: Any = None
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {v!r}.")
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"LMConfig.{name} must be None or a positive integer, got {v!r}.")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"LMConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads dividing d_model (e.g. {math.gcd(self.d_model, self.n_heads)})."
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"LMConfig: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}."
            )
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(
                f"LMConfig: rotary positions need an even head dimension, got {self.head_size}; "
                "change n_heads or use pos='learned'."
            )
        if self.norm not in ("rms", "layer"):
            raise ValueError(f'LMConfig.norm must be "rms" or "layer", got {self.norm!r}.')
        if self.pos not in ("rope", "learned"):
            raise ValueError(f'LMConfig.pos must be "rope" or "learned", got {self.pos!r}.')
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f'LMConfig.mlp must be "gelu" or "swiglu", got {self.mlp!r}.')
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"LMConfig.norm_eps must be a positive number, got {self.norm_eps!r}.")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"LMConfig.rope_base must be a number > 1, got {self.rope_base!r}.")
        object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        """Key/value heads (`n_kv_heads`, or `n_heads` without grouped-query attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head (`head_dim`, or `d_model // n_heads`)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


_ROPE_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _check_rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...] | None:
    """`None`, or the scaling as sorted `(key, value)` pairs, checked."""
    if scaling is None:
        return None
    if isinstance(scaling, tuple):
        scaling = dict(scaling)
    if not isinstance(scaling, Mapping):
        raise TypeError(
            "LMConfig.rope_scaling must be None or a mapping such as "
            f"{{'rope_type': 'linear', 'factor': 2.0}}; got {scaling!r}."
        )
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in _ROPE_KEYS:
        raise ValueError(
            f"LMConfig.rope_scaling: rope_type {kind!r} is not supported; supported: "
            f"{', '.join(ROPE_SCALINGS)} (or none)."
        )
    missing = _ROPE_KEYS[kind] - set(scaling)
    if missing:
        raise ValueError(
            f"LMConfig.rope_scaling: rope_type {kind!r} needs {sorted(missing)}; "
            f"got {dict(scaling)}."
        )
    out = {"rope_type": kind, **{k: float(scaling[k]) for k in _ROPE_KEYS[kind]}}
    if kind == "llama3":
        out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return tuple(sorted(out.items()))


class Norm(eqx.Module):
    """RMSNorm or LayerNorm over the last axis (statistics in float32).

    !!! Example

        ```python
        import jax.numpy as jnp
        from stackops.models import Norm

        y = Norm(4, "layer")(jnp.arange(8.0).reshape(2, 4))
        assert jnp.allclose(y.mean(-1), 0, atol=1e-5)
        ```
    """

    scale: Float[Array, " d"]
    bias: Float[Array, " d"] | None
    kind: str = eqx.field(static=True)
    eps: float = eqx.field(static=True, default=1e-6)

    def __init__(self, d: int, kind: str = "rms", eps: float = 1e-6):
        self.scale = jnp.ones((d,), jnp.float32)
        self.bias = jnp.zeros((d,), jnp.float32) if kind == "layer" else None
        self.kind = kind
        self.eps = float(eps)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale.astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(x.dtype)


def _dense(x: Array, w: Array) -> Array:
    """`x @ w` over the last axis, computed on `(rows, d)`: XLA's CPU backend runs a 2-D
    matmul (and its gradient) about twice as fast as the same product on `(B, T, d)`."""
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _rope(x: Float[Array, "B T H Dh"], cos: Array, sin: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_tables(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None,
) -> tuple[Array, Array]:
    """Rotary cos/sin tables of shape `(seq_len, 1, head_dim // 2)`.

    **Arguments:**

    - `seq_len`, `head_dim`: the table's length and the head width (even).
    - `base`: the rotary base (`rope_theta` in a Hugging Face config).
    - `scaling`: `None`, or a `rope_scaling` mapping (`"linear"` or `"llama3"`, see
      [`stackops.models.LMConfig`][]): the inverse frequencies are rescaled as
      `transformers` does.

    !!! Example

        ```python
        import jax.numpy as jnp
        from stackops.models import rope_tables

        cos, sin = rope_tables(8, 16)
        assert cos.shape == sin.shape == (8, 1, 8)
        cos2, _ = rope_tables(8, 16, scaling={"rope_type": "linear", "factor": 2.0})
        assert jnp.allclose(cos2[2], cos[1], atol=1e-6)   # positions are halved
        ```
    """
    inv = 1.0 / (base ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim))
    if scaling is not None:
        inv = _scale_inv_freq(inv, _check_rope_scaling(scaling))
    ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]


def _scale_inv_freq(inv: Array, scaling: tuple[tuple[str, Any], ...] | None) -> Array:
    """Rescale rotary inverse frequencies as `transformers`' `rope_type`s do."""
    if scaling is None:
        return inv
    sc = dict(scaling)
    factor = sc["factor"]
    if sc["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = sc["original_max_position_embeddings"]
    low, high = sc["low_freq_factor"], sc["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def causal_attention(
    q: Float[Array, "B T H Dh"],
    k: Float[Array, "B T H Dh"],
    v: Float[Array, "B T H Dh"],
    rope: tuple[Array, Array] | None = None,
) -> Float[Array, "B T H Dh"]:
    """Causal softmax attention written in `jax.numpy`: the default attention core.

    `q` and `k` are first rotated by `rope` (rotary positions) when it is given. Scores are
    `q·k / sqrt(Dh)` in float32, future positions are masked, the softmax is cast back to
    `q.dtype` before weighting `v`. Any function with this signature (an
    [`AttentionFn`][stackops.models.AttentionFn]: a fused kernel, or a wrapper around
    `jax.nn.dot_product_attention(..., is_causal=True)` on GPU) can replace it through the
    `attention=` argument of [`DecoderLM`][stackops.models.DecoderLM].

    **Arguments:**

    - `q`, `k`, `v`: shape `(batch, time, heads, head_dim)`, one dtype.
    - `rope`: `None`, or `rope_tables(time, head_dim)`.

    **Returns:** the attended values, shape `(batch, time, heads, head_dim)`.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import causal_attention

        q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
        out = causal_attention(q, k, v)
        assert out.shape == (1, 4, 2, 8)
        assert jnp.allclose(out[:, 0], v[:, 0])   # the first position sees only itself
        ```
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "causal_attention: q, k and v must share one shape (batch, time, heads, head_dim); "
            f"got {q.shape}, {k.shape}, {v.shape}."
        )
    if rope is not None:
        q, k = _rope(q, *rope), _rope(k, *rope)
    t, dh = q.shape[1], q.shape[3]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(dh)
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(eqx.Module):
    """Causal self-attention with fused QKV and an output projection `wo`.

    `wqkv` holds the query, key and value projections side by side (`n_heads`, then
    `n_kv_heads`, then `n_kv_heads` heads of `head_dim` columns); with fewer key/value heads
    than query heads (grouped-query attention) each key/value head serves
    `n_heads // n_kv_heads` consecutive query heads. `bqkv` is the optional bias of the same
    projections (Qwen2).

    Call it as `attn(x, rope, attention=None)`: `rope` is `rope_tables(...)` or `None`,
    `attention` an [`AttentionFn`][stackops.models.AttentionFn] that replaces the default
    core [`causal_attention`][stackops.models.causal_attention] (it gets the key/value heads
    already repeated to `n_heads`).

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import Attention

        attn = Attention(16, 2, rope=False, out_std=0.02, key=jax.random.key(0))
        assert attn(jnp.ones((1, 5, 16)), None).shape == (1, 5, 16)
        gqa = Attention(16, 4, rope=False, out_std=0.02, key=jax.random.key(0), n_kv_heads=2)
        assert gqa.wqkv.shape == (16, 16 + 2 * 8)
        ```
    """

    wqkv: Float[Array, "d qkv"]
    wo: Float[Array, "hd d"]
    bqkv: Float[Array, " qkv"] | None
    n_heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(
        self,
        d: int,
        n_heads: int,
        *,
        rope: bool,
        out_std: float,
        key: PRNGKeyArray,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
    ):
        k1, k2 = jax.random.split(key)
        kv = n_heads if n_kv_heads is None else n_kv_heads
        dh = d // n_heads if head_dim is None else head_dim
        self.wqkv = 0.02 * jax.random.normal(k1, (d, (n_heads + 2 * kv) * dh), jnp.float32)
        self.wo = out_std * jax.random.normal(k2, (n_heads * dh, d), jnp.float32)
        self.bqkv = jnp.zeros(((n_heads + 2 * kv) * dh,), jnp.float32) if bias else None
        self.n_heads = n_heads
        self.rope = rope
        self.n_kv_heads = kv
        self.head_dim = dh

    def __call__(
        self,
        x: Float[Array, "B T d"],
        rope: tuple[Array, Array] | None,
        attention: AttentionFn | None = None,
    ) -> Array:
        b, t, d = x.shape
        h, kv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = _dense(x, self.wqkv)
        if kv == h and h * dh == d and self.bqkv is None:
            # The reference model's path, kept as it was (its numerics are pinned).
            q, k, v = jnp.split(qkv.reshape(b, t, 3, h, dh), 3, axis=2)
            q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # B T H Dh
        else:
            if self.bqkv is not None:
                qkv = qkv + self.bqkv.astype(qkv.dtype)
            q = qkv[..., : h * dh].reshape(b, t, h, dh)
            k = qkv[..., h * dh : (h + kv) * dh].reshape(b, t, kv, dh)
            v = qkv[..., (h + kv) * dh :].reshape(b, t, kv, dh)
            if kv != h:
                k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
        out = (attention or causal_attention)(q, k, v, rope if self.rope else None)
        return _dense(out.reshape(b, t, h * dh), self.wo)


class MLP(eqx.Module):
    """The MLP: GELU (`w_in`, `w_out`) or SwiGLU (`w_gate` as well).

    GELU computes `gelu(x @ w_in) @ w_out`; SwiGLU (`gated=True`, Llama's MLP) computes
    `(silu(x @ w_gate) * (x @ w_in)) @ w_out`.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import MLP

        mlp = MLP(8, 32, out_std=0.02, key=jax.random.key(0))
        assert mlp(jnp.ones((1, 3, 8))).shape == (1, 3, 8)
        swiglu = MLP(8, 32, out_std=0.02, key=jax.random.key(0), gated=True)
        assert swiglu.w_gate is not None and swiglu(jnp.ones((1, 3, 8))).shape == (1, 3, 8)
        ```
    """

    w_in: Float[Array, "d ff"]
    w_out: Float[Array, "ff d"]
    w_gate: Float[Array, "d ff"] | None

    def __init__(
        self, d: int, ff: int, *, out_std: float, key: PRNGKeyArray, gated: bool = False
    ):
        k1, k2 = jax.random.split(key)
        self.w_in = 0.02 * jax.random.normal(k1, (d, ff), jnp.float32)
        self.w_out = out_std * jax.random.normal(k2, (ff, d), jnp.float32)
        self.w_gate = (
            0.02 * jax.random.normal(jax.random.fold_in(k1, 1), (d, ff), jnp.float32)
            if gated
            else None
        )

    def __call__(self, x: Float[Array, "B T d"]) -> Array:
        if self.w_gate is None:
            return _dense(jax.nn.gelu(_dense(x, self.w_in)), self.w_out)
        return _dense(jax.nn.silu(_dense(x, self.w_gate)) * _dense(x, self.w_in), self.w_out)


class Block(eqx.Module):
    """A pre-LN residual block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    Zeroing `attn.wo` and `mlp.w_out` makes the block the identity, which is what
    `residual_out_leaves` tells `stackops.grow(..., preserve=True)`.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        from stackops.models import Block, LMConfig

        block = Block(LMConfig(d_model=16, n_heads=2), key=jax.random.key(0))
        identity = eqx.tree_at(lambda b: b.residual_out_leaves(), block, replace_fn=jnp.zeros_like)
        x = jnp.ones((1, 4, 16))
        assert jnp.array_equal(identity(x), x)
        ```
    """

    norm1: Norm
    attn: Attention
    norm2: Norm
    mlp: MLP

    def __init__(self, config: LMConfig, *, key: PRNGKeyArray, total_layers: int | None = None):
        k1, k2 = jax.random.split(key)
        depth = total_layers or config.n_layers
        out_std = 0.02 / math.sqrt(2 * depth)
        d = config.d_model
        self.norm1 = Norm(d, config.norm, config.norm_eps)
        self.attn = Attention(
            d,
            config.n_heads,
            rope=config.pos == "rope",
            out_std=out_std,
            key=k1,
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            bias=config.qkv_bias,
        )
        self.norm2 = Norm(d, config.norm, config.norm_eps)
        self.mlp = MLP(d, config.ff, out_std=out_std, key=k2, gated=config.mlp == "swiglu")

    def __call__(
        self,
        x: Float[Array, "B T d"],
        rope: tuple[Array, Array] | None = None,
        attention: AttentionFn | None = None,
    ) -> Array:
        x = x + self.attn(self.norm1(x), rope, attention)
        return x + self.mlp(self.norm2(x))

    def residual_out_leaves(self) -> tuple[Array, Array]:
        """The residual output projections: zero them and the block is the identity."""
        return (self.attn.wo, self.mlp.w_out)


class DecoderLM(eqx.Module):
    """A decoder-only language model: embedding, a `Stack` of `Block`s, final norm, head.

    **Arguments:**

    - `config`: the [`stackops.models.LMConfig`][].
    - `key`: a JAX PRNG key (keyword-only).

    Call it on int tokens of shape `(B, T)` to get float32 logits `(B, T, vocab)`.
    With `config.tie_embeddings` there is no `head` (it is `None`): the logits are
    `h @ embed.T`.
    `compute_dtype=jnp.bfloat16` runs the matmuls in bf16 (norms and softmax stay fp32).
    `unroll` is passed to the blocks' `lax.scan` (`True` unrolls all of them);
    `attention` replaces the attention core (default
    [`causal_attention`][stackops.models.causal_attention]).

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import stackops as so
        from stackops.models import DecoderLM, LMConfig

        model = DecoderLM(LMConfig(d_model=32, n_heads=2, n_layers=2, max_len=16),
                          key=jax.random.key(0))
        logits = model(jnp.zeros((1, 8), jnp.int32))
        assert logits.shape == (1, 8, 256)
        bigger = so.grow(model, so.middle_stack(block=1), where=lambda m: m.blocks)
        assert bigger.depth == 3
        ```
    """

    embed: Float[Array, "V d"]
    pos_embed: Float[Array, "maxlen d"] | None
    blocks: Stack[Block]
    norm_f: Norm
    head: Float[Array, "d V"] | None
    config: LMConfig = eqx.field(static=True)

    def __init__(self, config: LMConfig, *, key: PRNGKeyArray, total_layers: int | None = None):
        ke, kp, kb, kh = jax.random.split(key, 4)
        d = config.d_model
        self.config = config
        self.embed = 0.02 * jax.random.normal(ke, (config.vocab_size, d), jnp.float32)
        self.pos_embed = (
            0.02 * jax.random.normal(kp, (config.max_len, d), jnp.float32)
            if config.pos == "learned"
            else None
        )
        keys = jax.random.split(kb, config.n_layers)
        self.blocks = Stack(
            eqx.filter_vmap(lambda k: Block(config, key=k, total_layers=total_layers))(keys)
        )
        self.norm_f = Norm(d, config.norm, config.norm_eps)
        self.head = (
            None
            if config.tie_embeddings
            else 0.02 * jax.random.normal(kh, (d, config.vocab_size), jnp.float32)
        )

    @property
    def depth(self) -> int:
        """Number of block positions (layers run in sequence)."""
        return len(self.blocks)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        compute_dtype: jnp.dtype = jnp.float32,
        unroll: int | bool = 1,
        attention: AttentionFn | None = None,
    ) -> Float[Array, "B T V"]:
        if tokens.ndim != 2:
            raise ValueError(
                f"DecoderLM expects tokens of shape (batch, time), got {tokens.shape}."
            )
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"Sequence length {t} exceeds max_len={self.config.max_len}.")
        h = jnp.take(self.embed, tokens, axis=0)
        rope = None
        if self.pos_embed is not None:
            h = h + self.pos_embed[:t]
        else:
            cfg = self.config
            rope = rope_tables(t, cfg.head_size, cfg.rope_base, cfg.rope_scaling)
        h = h.astype(compute_dtype)
        h = self.blocks(h, rope, attention, unroll=unroll)
        h = self.norm_f(h)
        head = self.embed.T if self.head is None else self.head
        return _dense(h, head.astype(compute_dtype)).astype(jnp.float32)


def flops_per_token(config: LMConfig, depth: int, seq_len: int, *, train: bool = True) -> float:
    """Model FLOPs per token counted from the architecture (embedding and head included).

    Forward: `2·(depth·(4d² + 2d·ff) + d·V)` for the matmuls plus `4·depth·T·d` for attention
    scores and values (full `T×T`, as computed); the embedding lookup is free. With
    grouped-query attention, another head width or SwiGLU the projection terms follow the
    shapes (`d·(H + 2·KV)·Dh + H·Dh·d` for attention, `3·d·ff` for SwiGLU). Training
    (`train=True`) is three times the forward.

    !!! Example

        ```python
        from stackops.models import LMConfig, flops_per_token

        cfg = LMConfig(d_model=64, n_heads=4)
        assert flops_per_token(cfg, 8, 64) > flops_per_token(cfg, 4, 64)
        ```
    """
    if depth < 0 or seq_len < 1:
        raise ValueError(f"depth must be >= 0 and seq_len >= 1, got {depth}, {seq_len}.")
    d, v, ff = config.d_model, config.vocab_size, config.ff
    h, kv, dh = config.n_heads, config.kv_heads, config.head_size
    attn = d * (h + 2 * kv) * dh + h * dh * d  # = 4d² for multi-head attention
    mlp = (3 if config.mlp == "swiglu" else 2) * d * ff
    fwd = 2 * (depth * (attn + mlp) + d * v) + 4 * depth * seq_len * h * dh
    return float(3 * fwd if train else fwd)
