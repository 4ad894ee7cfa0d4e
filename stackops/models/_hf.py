"""Hugging Face checkpoints in and out: Llama-family `config.json` plus safetensors files.

Only local directories are read; nothing is ever downloaded. Tensors are streamed one at a
time (see `_safetensors.py`), so reading holds about one model in memory, and
[`upscale_hf`][stackops.models.upscale_hf] grows a checkpoint file to file holding about one
tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._ops import AbstractGrowth
from .._plan import Keep, Mix, Plan
from .._stack import Stack
from . import _safetensors as st
from ._transformer import DecoderLM, LMConfig

__all__ = ["from_hf", "to_hf", "upscale_hf", "FAMILIES", "PROVENANCE_NAME"]

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""The `model_type`s read and written, with their `architectures` entry."""

PROVENANCE_NAME = "stackops_provenance.json"
"""The file, beside a grown checkpoint, that says how it was grown."""

RESIDUAL_OUT = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight",
                "mlp.down_proj.bias")
"""Per-layer tensors (names after `model.layers.N.`) that `preserve=True` zeroes."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_COPIED = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|generation_config\.json|vocab\.json|merges\.txt"
    r"|added_tokens\.json|chat_template.*)$"
)
_IGNORED = ("rotary_emb.inv_freq",)  # a buffer that old transformers versions saved


# --------------------------------------------------------------------------- paths


def _local_dir(path: Any, argname: str, fn: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: `{argname}` must be a path to a local directory, got {path!r}.")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NotADirectoryError(
            f"{fn}: `{argname}`={str(path)!r} is not a local directory. stackops reads local "
            "checkpoints only and never downloads: fetch the model first (e.g. with "
            "`huggingface-cli download NAME --local-dir DIR`) and pass that directory."
        )
    return p


def _out_dir(path: Any, argname: str, fn: str, overwrite: bool, sources: Sequence[Path]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: `{argname}` must be a directory path, got {path!r}.")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{fn}: `{argname}`={str(path)!r} exists and is not a directory.")
    for src in sources:
        if p.exists() and p.resolve() == src.resolve():
            raise ValueError(
                f"{fn}: `{argname}` is the directory being read ({src}); write to a new directory."
            )
    p.mkdir(parents=True, exist_ok=True)
    old = [q for q in p.iterdir() if q.suffix == ".safetensors" or q.name == st.INDEX_NAME]
    if old and not overwrite:
        raise FileExistsError(
            f"{fn}: {p} already holds a checkpoint ({old[0].name}, ...): pass overwrite=True to "
            "replace it, or choose a new directory."
        )
    for q in old:
        q.unlink()  # stale shards of an earlier write would otherwise be read with the new ones
    return p


def _read_config(directory: Path, fn: str) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: {directory} has no config.json: it is not a HF model.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn}: {path} is not valid JSON ({e}).") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{fn}: {path} must hold a JSON object.")
    return cfg


def _shard_bytes(max_shard_size: int | str) -> int:
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        n = max_shard_size
    elif isinstance(max_shard_size, str):
        m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(I?B)?\s*", max_shard_size.upper())
        if not m:
            raise ValueError(f'`max_shard_size` must be bytes or a size like "5GB", got '
                             f"{max_shard_size!r}.")
        base = 1024 if m.group(3) == "IB" else 1000
        n = int(float(m.group(1)) * base ** " KMG".index(m.group(2) or " "))
    else:
        raise TypeError(f"`max_shard_size` must be an int or a string, got {max_shard_size!r}.")
    if n < 1:
        raise ValueError(f"`max_shard_size` must be positive, got {max_shard_size!r}.")
    return n


# --------------------------------------------------------------------------- config


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """`(rope_base, rope_scaling)` from either config style: transformers 5's
    `rope_parameters`, or the older `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        base = float(params["rope_theta"])
        scaling: dict[str, Any] | None = params
    else:
        base = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or None
    if scaling is not None and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("from_hf: partial rotary embeddings (partial_rotary_factor) are not "
                         "supported.")
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return base, None
    assert scaling is not None
    return base, {k: v for k, v in scaling.items() if k != "rope_theta"}


def config_from_hf(cfg: Mapping[str, Any]) -> LMConfig:
    """The [`stackops.models.LMConfig`][] of a Llama-family `config.json` (as a dict)."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"from_hf reads the model types {sorted(FAMILIES)}; this config has model_type="
            f"{model_type!r} (architectures {cfg.get('architectures')})."
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"from_hf: hidden_act={act!r} is not supported (Llama's MLP is silu).")
    for key in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and cfg.get(key):
            raise ValueError(f"from_hf: {key}=true (biases on o_proj/MLP) is not supported.")
    if model_type == "mistral" and cfg.get("sliding_window") is not None:
        raise ValueError("from_hf: sliding-window attention is not supported "
                         f"(sliding_window={cfg['sliding_window']}).")
    if model_type == "qwen2" and (
        cfg.get("use_sliding_window")
        or any(t != "full_attention" for t in cfg.get("layer_types") or ())
    ):
        raise ValueError("from_hf: sliding-window attention (use_sliding_window / layer_types) "
                         "is not supported.")
    base, scaling = _rope_from_hf(dict(cfg))
    try:
        return LMConfig(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_layers=int(cfg["num_hidden_layers"]),
            d_ff=int(cfg["intermediate_size"]),
            max_len=int(cfg.get("max_position_embeddings", 4096)),
            norm="rms",
            pos="rope",
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=_head_dim(cfg),
            mlp="swiglu",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=base,
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
        )
    except KeyError as e:
        raise ValueError(f"from_hf: config.json lacks the field {e.args[0]!r}.") from e


def _head_dim(cfg: Mapping[str, Any]) -> int | None:
    """`head_dim`, or `None` where it is the default `hidden_size // num_attention_heads`."""
    hd = cfg.get("head_dim")
    if hd is None or int(hd) * int(cfg["num_attention_heads"]) == int(cfg["hidden_size"]):
        return None
    return int(hd)


def _config_to_hf(
    config: LMConfig, depth: int, dtype: np.dtype, base: Mapping[str, Any] | None
) -> dict[str, Any]:
    family = (base or {}).get("model_type") or ("qwen2" if config.qkv_bias else "llama")
    if family not in FAMILIES:
        raise ValueError(f"to_hf writes the model types {sorted(FAMILIES)}; `like` is a "
                         f"{family!r} model.")
    if config.norm != "rms" or config.pos != "rope" or config.mlp != "swiglu":
        raise ValueError(
            "to_hf writes Llama-family checkpoints: the model needs LMConfig(norm='rms', "
            f"pos='rope', mlp='swiglu'); it has norm={config.norm!r}, pos={config.pos!r}, "
            f"mlp={config.mlp!r}."
        )
    if config.qkv_bias != (family == "qwen2"):
        raise ValueError(
            f"to_hf: a {family} checkpoint {'has' if family == 'qwen2' else 'has no'} q/k/v "
            f"biases, but the model has qkv_bias={config.qkv_bias}."
        )
    out: dict[str, Any] = dict(base or {})
    out.update(
        architectures=[FAMILIES[family]],
        model_type=family,
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ff,
        num_hidden_layers=depth,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_len,
        tie_word_embeddings=config.tie_embeddings,
        dtype=str(np.dtype(dtype)),
    )
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    if "rope_theta" in out and "rope_parameters" not in out:  # the older style, kept
        out["rope_theta"] = config.rope_base
        out["rope_scaling"] = scaling
    else:
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {"rope_theta": config.rope_base, "rope_type": "default",
                                  **(scaling or {})}
    if family == "llama":
        out.setdefault("attention_bias", False)
        out.setdefault("mlp_bias", False)
    if "layer_types" in out:
        out["layer_types"] = ["full_attention"] * depth
    out.pop("torch_dtype", None)
    return out


# --------------------------------------------------------------------------- tensor layout


def _layout(config: LMConfig) -> dict[str, tuple[bool, list[tuple[str, bool]]]]:
    """For each array leaf of a `DecoderLM` (by its key path), whether it is stacked over
    layers and the HF tensors it is the concatenation of (last axis), each `(name,
    transposed)`; `{i}` in a name is the layer. `nn.Linear` stores `(out, in)`; the model
    stores `(in, out)`, hence the transposes."""
    att, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    lay: dict[str, tuple[bool, list[tuple[str, bool]]]] = {
        ".embed": (False, [("model.embed_tokens.weight", False)]),
        ".blocks.layers.norm1.scale": (True, [("model.layers.{i}.input_layernorm.weight", False)]),
        ".blocks.layers.attn.wqkv": (True, [(att + f"{p}_proj.weight", True) for p in "qkv"]),
        ".blocks.layers.attn.wo": (True, [(att + "o_proj.weight", True)]),
        ".blocks.layers.norm2.scale": (
            True, [("model.layers.{i}.post_attention_layernorm.weight", False)]),
        ".blocks.layers.mlp.w_in": (True, [(mlp + "up_proj.weight", True)]),
        ".blocks.layers.mlp.w_out": (True, [(mlp + "down_proj.weight", True)]),
        ".blocks.layers.mlp.w_gate": (True, [(mlp + "gate_proj.weight", True)]),
        ".norm_f.scale": (False, [("model.norm.weight", False)]),
    }
    if config.qkv_bias:
        lay[".blocks.layers.attn.bqkv"] = (True, [(att + f"{p}_proj.bias", False) for p in "qkv"])
    if not config.tie_embeddings:
        lay[".head"] = (False, [("lm_head.weight", True)])
    return lay


def _skeleton(config: LMConfig) -> Any:
    return eqx.filter_eval_shape(lambda: DecoderLM(config, key=jax.random.key(0)))


def _path_str(path: Any) -> str:
    return jax.tree_util.keystr(path)


def _load_leaf(
    reader: st.Reader, stacked: bool, parts: list[tuple[str, bool]], like: Any,
    depth: int, dtype: Any, used: set[str],
) -> jax.Array:
    """One leaf, assembled tensor by tensor in a numpy buffer of its final shape."""
    rows = range(depth) if stacked else [None]
    first = parts[0][0].format(i=0)
    if first not in reader.tensors:
        raise ValueError(f"from_hf: the checkpoint has no tensor {first!r}.")
    stored = reader.tensors[first].dtype
    buf = _aligned_empty(like.shape, stored if dtype is None else np.dtype(dtype))
    for i in rows:
        col = 0
        for name_t, transposed in parts:
            name = name_t.format(i=i)
            if name not in reader.tensors:
                raise ValueError(f"from_hf: the checkpoint has no tensor {name!r}.")
            arr = reader.get(name)
            used.add(name)
            if transposed:
                arr = arr.T
            dst = buf if i is None else buf[i]
            width = arr.shape[-1]
            if arr.shape[:-1] != dst.shape[:-1] or col + width > dst.shape[-1]:
                raise ValueError(
                    f"from_hf: tensor {name!r} has shape {reader.tensors[name].shape}, which "
                    "does not match config.json."
                )
            _assign(dst[..., col : col + width], arr)
            col += width
        if col != buf.shape[-1]:
            names = [n.format(i=0 if i is None else i) for n, _ in parts]
            raise ValueError(
                f"from_hf: the tensors {names} have shapes "
                f"{[reader.tensors[n].shape for n in names]}, which does not match config.json."
            )
    # An aligned host buffer becomes the device array without a copy on CPU (JAX keeps it
    # alive); elsewhere device_put copies it once.
    return jax.device_put(buf)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`np.empty` whose data starts on a 64-byte boundary (what XLA's CPU client needs to
    adopt the buffer instead of copying it)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _assign(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src`, in row tiles when `src` is a large transposed view: a plain strided
    copy of a (32000, 512) transpose is ~4x slower than the same copy tile by tile."""
    if src.ndim == 2 and not src.flags.c_contiguous and src.size > 2**20:
        if src.shape[1] >= src.shape[0]:
            for j in range(0, src.shape[1], 256):
                dst[:, j : j + 256] = src[:, j : j + 256]
        else:
            for j in range(0, src.shape[0], 256):
                dst[j : j + 256] = src[j : j + 256]
    else:
        dst[...] = src


def from_hf(path: str | os.PathLike, *, dtype: Any = None) -> DecoderLM:
    """Read a local Hugging Face checkpoint directory as a [`stackops.models.DecoderLM`][].

    Reads `config.json` and the safetensors weights (one `model.safetensors`, or shards and
    `model.safetensors.index.json`) of a Llama, Mistral (without sliding window) or Qwen2
    causal LM. Tensors are read one at a time into the model's stacked arrays, so memory
    peaks at about one model plus one layer-stacked leaf. Nothing is downloaded.

    **Arguments:**

    - `path`: a local directory, as `save_pretrained` writes it.
    - `dtype`: `None` keeps each tensor's stored dtype (bf16, fp16 or fp32); a dtype casts.

    **Returns:** the model; its `config` is the checkpoint's architecture.

    !!! Example

        ```python
        import tempfile, jax, jax.numpy as jnp
        from stackops.models import DecoderLM, LMConfig, from_hf, to_hf

        cfg = LMConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                       mlp="swiglu", d_ff=64, max_len=32)
        model = DecoderLM(cfg, key=jax.random.key(0))
        with tempfile.TemporaryDirectory() as d:
            to_hf(model, d)
            again = from_hf(d)
        tokens = jnp.zeros((1, 8), jnp.int32)
        assert jnp.array_equal(again(tokens), model(tokens))
        ```
    """
    src = _local_dir(path, "path", "from_hf")
    config = config_from_hf(_read_config(src, "from_hf"))
    if dtype is not None:
        dtype = np.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"from_hf: `dtype` must be a floating dtype, got {dtype}.")
    layout = _layout(config)
    skeleton = _skeleton(config)
    used: set[str] = set()
    leaves: dict[str, jax.Array] = {}
    with st.Reader(src) as reader:
        for kp, like in jax.tree_util.tree_flatten_with_path(skeleton)[0]:
            key = _path_str(kp)
            stacked, parts = layout[key]
            leaves[key] = _load_leaf(reader, stacked, parts, like, config.n_layers, dtype, used)
        extra = sorted(
            n for n in reader.tensors if n not in used and not n.endswith(_IGNORED)
            and not (config.tie_embeddings and n == "lm_head.weight")
        )
    if extra:
        raise ValueError(
            f"from_hf: the checkpoint has tensors a {config_name(config)} model does not use: "
            f"{extra[:6]}{' ...' if len(extra) > 6 else ''}. Reading on would drop them."
        )
    return jax.tree_util.tree_map_with_path(lambda kp, _: leaves[_path_str(kp)], skeleton)


def config_name(config: LMConfig) -> str:
    return "Qwen2" if config.qkv_bias else "Llama"


# --------------------------------------------------------------------------- writing


def _check_model(model: Any) -> tuple[LMConfig, tuple[int, ...]]:
    if not isinstance(model, DecoderLM):
        raise TypeError(f"to_hf: `model` must be a stackops.models.DecoderLM, got "
                        f"{type(model).__name__}.")
    if not isinstance(model.blocks, Stack):
        raise TypeError("to_hf: `model.blocks` must be a stackops.Stack; convert a list with "
                        "`stackops.stack(layers)`.")
    order = model.blocks.order
    rows = tuple(range(model.blocks.num_layers)) if order is None else tuple(order)
    return model.config, rows


def to_hf(
    model: DecoderLM,
    path: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write a [`stackops.models.DecoderLM`][] as a Hugging Face checkpoint directory.

    Writes `config.json` and safetensors weights that `transformers`'
    `AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys. Every
    tensor is its own contiguous buffer (no two names share memory), so a grown model whose
    new layers were copies writes without shared-tensor errors. Positions that share a
    stored layer (a `loop_tie`) are written as separate copies: the format has no ties.
    Tensors are written one at a time.

    **Arguments:**

    - `model`: a `DecoderLM` with `norm="rms"`, `pos="rope"`, `mlp="swiglu"` (Llama family;
      `qkv_bias=True` writes Qwen2).
    - `path`: the output directory (created if needed).
    - `like`: a source checkpoint directory: its `config.json` fields that stackops does not
      model (token ids, ...) are kept, and its tokenizer and generation files are copied.
    - `dtype`: `None` keeps each leaf's dtype; a dtype casts every tensor.
    - `max_shard_size`: bytes (or `"5GB"`) per safetensors file; beyond it, shards and
      `model.safetensors.index.json` are written.
    - `provenance`: a JSON-able mapping (see [`stackops.provenance`][]) written beside the
      weights as `stackops_provenance.json`.
    - `overwrite`: replace a checkpoint already in `path`.

    **Returns:** the names of the files written.

    !!! Example

        ```python
        import json, tempfile, jax
        from stackops.models import DecoderLM, LMConfig, to_hf

        cfg = LMConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, mlp="swiglu",
                       tie_embeddings=True)
        with tempfile.TemporaryDirectory() as d:
            files = to_hf(DecoderLM(cfg, key=jax.random.key(0)), d, max_shard_size=20_000)
            assert "model.safetensors.index.json" in files     # sharded
            assert json.load(open(f"{d}/config.json"))["tie_word_embeddings"]
        ```
    """
    config, rows = _check_model(model)
    sources = [] if like is None else [_local_dir(like, "like", "to_hf")]
    base = None if like is None else _read_config(sources[0], "to_hf")
    if dtype is not None:
        dtype = np.dtype(dtype)
    out_dtype = np.dtype(model.embed.dtype) if dtype is None else dtype
    cfg = _config_to_hf(config, len(rows), out_dtype, base)  # checks the architecture first
    layout = _layout(config)
    leaves = {
        _path_str(kp): leaf
        for kp, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    }
    if set(leaves) != set(layout):
        raise ValueError(f"to_hf: the model's leaves {sorted(leaves)} are not those of its "
                         f"config ({sorted(layout)}).")
    entries = _entries(config, leaves, layout, rows, dtype)
    out = _out_dir(path, "path", "to_hf", overwrite, sources)
    files = st.write_checkpoint(out, entries, max_shard_size=_shard_bytes(max_shard_size))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    files.append("config.json")
    files += _copy_side_files(sources[0], out) if sources else []
    if provenance is not None:
        (out / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        files.append(PROVENANCE_NAME)
    return files


def _entries(
    config: LMConfig,
    leaves: dict[str, jax.Array],
    layout: dict[str, tuple[bool, list[tuple[str, bool]]]],
    rows: tuple[int, ...],
    dtype: np.dtype | None,
) -> list[st.Entry]:
    """One entry per HF tensor, in the order transformers writes them."""
    arrays: dict[str, np.ndarray] = {}

    def host(key: str) -> np.ndarray:
        # One host view per leaf (zero-copy on CPU); slices of it are copied per tensor.
        if key not in arrays:
            arrays[key] = np.asarray(leaves[key])
        return arrays[key]

    per_tensor: dict[str, tuple[str, int | None, int, int, bool]] = {}
    for key, (stacked, parts) in layout.items():
        col = 0
        widths = _part_widths(config, leaves[key], parts)
        for (name_t, transposed), width in zip(parts, widths):
            for q, row in enumerate(rows if stacked else [None]):
                name = name_t.format(i=q)
                per_tensor[name] = (key, row, col, col + width, transposed)
            col += width

    def produce(name: str) -> Callable[[], np.ndarray]:
        key, row, a, b, transposed = per_tensor[name]

        def run() -> np.ndarray:
            x = host(key)
            x = (x if row is None else x[row])[..., a:b]
            x = x.T if transposed else x
            out = np.empty(x.shape, x.dtype)  # a fresh buffer per tensor: nothing shared
            _assign(out, x)
            return out if dtype is None else out.astype(dtype)

        return run

    def order_key(name: str) -> tuple[int, int, str]:
        m = _LAYER.match(name)
        if name.startswith("model.embed"):
            return (0, 0, name)
        if m:
            return (1, int(m.group(1)), m.group(2))
        return (2, 0, name)

    out = []
    for name in sorted(per_tensor, key=order_key):
        key, row, a, b, transposed = per_tensor[name]
        leaf = leaves[key]
        shape = (*leaf.shape[1 if row is not None else 0 : -1], b - a)
        if transposed:
            shape = shape[::-1]
        dt = np.dtype(leaf.dtype) if dtype is None else dtype
        out.append(st.Entry(name, tuple(shape), dt, produce(name)))
    return out


def _part_widths(config: LMConfig, leaf: jax.Array, parts: list[tuple[str, bool]]) -> list[int]:
    if len(parts) == 1:
        return [leaf.shape[-1]]
    # q, k, v side by side: n_heads, then n_kv_heads twice, heads of head_dim columns.
    dh = config.head_size
    return [config.n_heads * dh, config.kv_heads * dh, config.kv_heads * dh]


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and _COPIED.match(f.name):
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    return copied


# --------------------------------------------------------------------------- file to file


def _identity_positions(plan: Plan) -> set[int]:
    ids = set(plan.inserted)
    for q in ids:
        spec = plan.layers[plan.order[q]]
        users = [p for p, i in enumerate(plan.order) if i == plan.order[q]]
        if isinstance(spec, Keep) or any(p not in ids for p in users):
            raise ValueError(
                f"upscale_hf: preserve needs inserted positions that are copies; {plan.name} "
                "inserts positions that share weights with kept ones."
            )
    return ids


def upscale_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    op: AbstractGrowth | Plan,
    *,
    preserve: bool | Sequence[str] = False,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    provenance: bool = True,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Plan:
    """Grow a Hugging Face checkpoint in depth, file to file, one tensor at a time.

    The plan of `op` for the checkpoint's `num_hidden_layers` decides every layer of the
    output: kept and copied layers are their source's bytes, mixes (`interpolate`) are
    weighted sums computed in float32 and cast back, tied positions are written as copies.
    Tensors outside `model.layers.N.` (embeddings, final norm, head) are copied. Memory
    stays at about one tensor, whatever the model's size; `config.json` gets the new depth
    (and per-layer `layer_types` follow their source layers). The result equals
    [`from_hf`][stackops.models.from_hf], [`stackops.grow`][] and
    [`to_hf`][stackops.models.to_hf] in sequence, without holding the model.

    **Arguments:**

    - `src`: a local HF checkpoint directory (safetensors).
    - `dst`: the output directory.
    - `op`: a growth operator (e.g. [`stackops.solar`][]) or a plan for the source depth.
    - `preserve`: `True` zeroes the residual output projections of inserted layers
      (`self_attn.o_proj` and `mlp.down_proj`, as LLaMA Pro does), so the grown model
      computes the same function; or a sequence of per-layer tensor names to zero.
    - `dtype`: `None` keeps each tensor's stored dtype; a dtype casts floating tensors.
    - `max_shard_size`: bytes (or `"5GB"`) per output file.
    - `provenance`: write `stackops_provenance.json` (see [`stackops.provenance`][]).
    - `overwrite`: replace a checkpoint already in `dst`.
    - `progress`: called with the byte count of each tensor written (for a progress bar).

    **Returns:** the plan that was applied.

    !!! Example

        ```python
        import json, tempfile, jax
        import stackops as so
        from stackops.models import DecoderLM, LMConfig, from_hf, to_hf, upscale_hf

        cfg = LMConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=4, mlp="swiglu")
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            to_hf(DecoderLM(cfg, key=jax.random.key(0)), a)
            plan = upscale_hf(a, b, so.solar(drop=1))       # 4 -> 6 layers
            assert from_hf(b).depth == plan.depth_out == 6
            assert json.load(open(f"{b}/stackops_provenance.json"))["depth_out"] == 6
        ```
    """
    from .._provenance import provenance as make_provenance

    source = _local_dir(src, "src", "upscale_hf")
    cfg = _read_config(source, "upscale_hf")
    depth = cfg.get("num_hidden_layers")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"upscale_hf: config.json has no valid num_hidden_layers ({depth!r}).")
    if isinstance(op, Plan):
        if op.depth_in != depth:
            raise ValueError(f"upscale_hf: the plan starts at depth {op.depth_in}, the checkpoint "
                             f"has {depth} layers: make it with `op.plan(depth={depth})`.")
        plan = op
    elif isinstance(op, AbstractGrowth):
        plan = op.plan(depth)
    else:
        raise TypeError(f"upscale_hf: `op` must be a growth operator or a Plan, got {op!r}.")
    zero: tuple[str, ...] = ()
    if preserve is True:
        zero = RESIDUAL_OUT
    elif preserve is not False and preserve is not None:
        if isinstance(preserve, str) or not all(isinstance(s, str) for s in preserve):
            raise TypeError("upscale_hf: `preserve` must be a bool or a sequence of per-layer "
                            "tensor names such as ('self_attn.o_proj.weight',).")
        zero = tuple(preserve)
    identities = _identity_positions(plan) if zero else set()
    out = _out_dir(dst, "dst", "upscale_hf", overwrite, [source])
    with st.Reader(source) as reader:
        entries = _upscale_entries(reader, plan, depth, zero, identities, dtype)
        st.write_checkpoint(out, entries, max_shard_size=_shard_bytes(max_shard_size),
                            progress=progress)
    new_cfg = dict(cfg)
    new_cfg["num_hidden_layers"] = plan.depth_out
    if isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) == depth:
        new_cfg["layer_types"] = [cfg["layer_types"][s] for s in plan.sources()]
    if dtype is not None:
        new_cfg["dtype"] = str(np.dtype(dtype))
        new_cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
    _copy_side_files(source, out)
    if provenance:
        record = make_provenance(
            plan, op=None if isinstance(op, Plan) else op, preserve=bool(zero), source=str(source)
        )
        (out / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return plan


def _upscale_entries(
    reader: st.Reader, plan: Plan, depth: int, zero: tuple[str, ...], identities: set[int],
    dtype: Any,
) -> list[st.Entry]:
    per_layer: dict[int, dict[str, str]] = {i: {} for i in range(depth)}
    head, tail = [], []
    for name in reader.tensors:
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            if i not in per_layer:
                raise ValueError(f"upscale_hf: tensor {name!r} names layer {i}, but config.json "
                                 f"has num_hidden_layers={depth}.")
            per_layer[i][m.group(2)] = name
        elif name.startswith("model.embed"):
            head.append(name)
        else:
            tail.append(name)
    suffixes = sorted(per_layer[0])
    for i, names in per_layer.items():
        if sorted(names) != suffixes:
            raise ValueError(f"upscale_hf: layer {i} has tensors {sorted(names)}, layer 0 has "
                             f"{suffixes}: the layers must be alike.")
    cast = None if dtype is None else np.dtype(dtype)

    def out_dtype(info: st.TensorInfo) -> np.dtype:
        floating = np.issubdtype(info.dtype, np.floating) or info.dtype == st._DTYPES["BF16"]
        return cast if cast is not None and floating else info.dtype

    def copy_of(name: str) -> st.Entry:
        info = reader.tensors[name]
        dt = out_dtype(info)
        raw = info if dt == info.dtype else None  # unchanged bytes: copied file to file
        return st.Entry(name, info.shape, dt, lambda: reader.get(name).astype(dt, copy=False), raw)

    entries = [copy_of(n) for n in head]
    for q, li in enumerate(plan.order):
        spec = plan.layers[li]
        for suffix in suffixes:
            info = reader.tensors[per_layer[0][suffix]]
            dt = out_dtype(info)
            name = f"model.layers.{q}.{suffix}"
            zeroed = q in identities and suffix in zero
            raw = None
            if not zeroed and (isinstance(spec, Keep) or spec.is_copy):
                src_layer = spec.source if isinstance(spec, Keep) else spec.sources[0]
                src_info = reader.tensors[per_layer[src_layer][suffix]]
                raw = src_info if src_info.dtype == dt else None
            entries.append(st.Entry(name, info.shape, dt, _layer_producer(
                reader, per_layer, spec, suffix, dt, zeroed), raw))
    entries += [copy_of(n) for n in tail]
    return entries


def _layer_producer(
    reader: st.Reader, per_layer: dict[int, dict[str, str]], spec: Keep | Mix, suffix: str,
    dt: np.dtype, zeroed: bool,
) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        if zeroed:
            return np.zeros(reader.tensors[per_layer[0][suffix]].shape, dt)
        if isinstance(spec, Keep):
            return reader.get(per_layer[spec.source][suffix]).astype(dt, copy=False)
        if spec.is_copy:
            return reader.get(per_layer[spec.sources[0]][suffix]).astype(dt, copy=False)
        # A mix, accumulated like stackops.grow does: in at least float32, term by term.
        acc = None
        for s, w in zip(spec.sources, spec.weights):
            x = reader.get(per_layer[s][suffix])
            acc_dt = np.promote_types(x.dtype, np.float32) if x.dtype != st._DTYPES["BF16"] \
                else np.dtype(np.float32)
            term = x.astype(acc_dt) * np.asarray(w, acc_dt)
            acc = term if acc is None else acc + term
        assert acc is not None
        return acc.astype(dt)

    return run
