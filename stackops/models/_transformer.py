"""A reference pre-LN decoder-only transformer LM whose blocks are a `stackops.Stack`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

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


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of [`stackops.models.DecoderLM`][].

    **Arguments:**

    - `vocab_size`: number of token ids (256 for bytes).
    - `d_model`, `n_heads`, `d_ff` (default `4 * d_model`): widths.
    - `n_layers`: depth at initialisation (growth changes the model's depth, not this).
    - `max_len`: longest sequence (sizes the learned position table).
    - `norm`: `"rms"` (RMSNorm) or `"layer"` (LayerNorm).
    - `pos`: `"rope"` (rotary) or `"learned"` positions.

    !!! Example

        ```python
        from stackops.models import LMConfig

        cfg = LMConfig(d_model=64, n_heads=4, n_layers=2)
        assert cfg.ff == 256
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

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {v!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LMConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}."
            )
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("LMConfig: rotary positions need an even head dimension.")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f'LMConfig.norm must be "rms" or "layer", got {self.norm!r}.')
        if self.pos not in ("rope", "learned"):
            raise ValueError(f'LMConfig.pos must be "rope" or "learned", got {self.pos!r}.')

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


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

    def __init__(self, d: int, kind: str = "rms"):
        self.scale = jnp.ones((d,), jnp.float32)
        self.bias = jnp.zeros((d,), jnp.float32) if kind == "layer" else None
        self.kind = kind

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.astype(x.dtype)


def _dense(x: Array, w: Array) -> Array:
    """`x @ w` over the last axis, computed on `(rows, d)`: XLA's CPU backend runs a 2-D
    matmul (and its gradient) about twice as fast as the same product on `(B, T, d)`."""
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _rope(x: Float[Array, "B T H Dh"], cos: Array, sin: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Array, Array]:
    """Rotary cos/sin tables of shape `(seq_len, 1, head_dim // 2)`.

    !!! Example

        ```python
        from stackops.models import rope_tables

        cos, sin = rope_tables(8, 16)
        assert cos.shape == sin.shape == (8, 1, 8)
        ```
    """
    inv = 1.0 / (base ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim))
    ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]


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
    """Causal multi-head self-attention with fused QKV and an output projection `wo`.

    Call it as `attn(x, rope, attention=None)`: `rope` is `rope_tables(...)` or `None`,
    `attention` an [`AttentionFn`][stackops.models.AttentionFn] that replaces the default
    core [`causal_attention`][stackops.models.causal_attention].

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import Attention

        attn = Attention(16, 2, rope=False, out_std=0.02, key=jax.random.key(0))
        assert attn(jnp.ones((1, 5, 16)), None).shape == (1, 5, 16)
        ```
    """

    wqkv: Float[Array, "d three_d"]
    wo: Float[Array, "d d"]
    n_heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)

    def __init__(self, d: int, n_heads: int, *, rope: bool, out_std: float, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.wqkv = 0.02 * jax.random.normal(k1, (d, 3 * d), jnp.float32)
        self.wo = out_std * jax.random.normal(k2, (d, d), jnp.float32)
        self.n_heads = n_heads
        self.rope = rope

    def __call__(
        self,
        x: Float[Array, "B T d"],
        rope: tuple[Array, Array] | None,
        attention: AttentionFn | None = None,
    ) -> Array:
        b, t, d = x.shape
        h = self.n_heads
        qkv = _dense(x, self.wqkv)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # B T H Dh
        out = (attention or causal_attention)(q, k, v, rope if self.rope else None)
        return _dense(out.reshape(b, t, d), self.wo)


class MLP(eqx.Module):
    """GELU MLP with an input projection `w_in` and an output projection `w_out`.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import MLP

        mlp = MLP(8, 32, out_std=0.02, key=jax.random.key(0))
        assert mlp(jnp.ones((1, 3, 8))).shape == (1, 3, 8)
        ```
    """

    w_in: Float[Array, "d ff"]
    w_out: Float[Array, "ff d"]

    def __init__(self, d: int, ff: int, *, out_std: float, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.w_in = 0.02 * jax.random.normal(k1, (d, ff), jnp.float32)
        self.w_out = out_std * jax.random.normal(k2, (ff, d), jnp.float32)

    def __call__(self, x: Float[Array, "B T d"]) -> Array:
        return _dense(jax.nn.gelu(_dense(x, self.w_in)), self.w_out)


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
        self.norm1 = Norm(d, config.norm)
        self.attn = Attention(d, config.n_heads, rope=config.pos == "rope", out_std=out_std, key=k1)
        self.norm2 = Norm(d, config.norm)
        self.mlp = MLP(d, config.ff, out_std=out_std, key=k2)

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
    head: Float[Array, "d V"]
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
        self.norm_f = Norm(d, config.norm)
        self.head = 0.02 * jax.random.normal(kh, (d, config.vocab_size), jnp.float32)

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
            rope = rope_tables(t, self.config.d_model // self.config.n_heads)
        h = h.astype(compute_dtype)
        h = self.blocks(h, rope, attention, unroll=unroll)
        h = self.norm_f(h)
        return _dense(h, self.head.astype(compute_dtype)).astype(jnp.float32)


def flops_per_token(config: LMConfig, depth: int, seq_len: int, *, train: bool = True) -> float:
    """Model FLOPs per token counted from the architecture (embedding and head included).

    Forward: `2·(depth·(4d² + 2d·ff) + d·V)` for the matmuls plus `4·depth·T·d` for attention
    scores and values (full `T×T`, as computed); the embedding lookup is free. Training
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
    fwd = 2 * (depth * (4 * d * d + 2 * d * ff) + d * v) + 4 * depth * seq_len * d
    return float(3 * fwd if train else fwd)
