"""Grow a Hugging Face checkpoint in depth, file to file: LLaMA Pro, SOLAR, Gstack, MIDAS, ...

    python experiments/upscale.py IN_DIR OUT_DIR --op "solar(drop=8)"
    python experiments/upscale.py IN_DIR OUT_DIR --op "llama_pro(every=4)" --preserve
    python experiments/upscale.py IN_DIR OUT_DIR --mergekit config.yml
    python experiments/upscale.py IN_DIR OUT_DIR --op "middle_stack(block=4)" --dry-run

`--op` is a stackops operator written as in Python (`middle_stack`, `last_stack`,
`interpolate`, `loop_tie`, `untie`, `layer_map`, `compose`, `llama_pro`, `solar`, `gstack`,
with literal arguments; nothing else is evaluated). `--mergekit` reads a mergekit passthrough
config (`slices:` of `layer_range`s). The checkpoint is streamed tensor by tensor
(`stackops.models.upscale_hf`): memory stays at about one tensor. Beside the weights, the
output holds `config.json` with the new depth, the source's tokenizer files and
`stackops_provenance.json` (which layers are new, built from which). `--write-mergekit FILE`
also writes the equivalent mergekit config, so the same model can be rebuilt with mergekit
(with `--preserve`, its inserted slices scale `o_proj` and `down_proj` by 0).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

OPERATORS = (
    "middle_stack",
    "last_stack",
    "interpolate",
    "loop_tie",
    "untie",
    "layer_map",
    "compose",
    "llama_pro",
    "solar",
    "gstack",
)
"""The operator names `--op` accepts."""


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Call):
        return _call(node, text)
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise ValueError(
            f"--op {text!r}: arguments must be literals or operators, got "
            f"{ast.unparse(node)!r}."
        ) from e


def _call(node: ast.Call, text: str) -> Any:
    import stackops as so

    fn = node.func
    if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id in (
        "so",
        "stackops",
    ):
        name = fn.attr
    elif isinstance(fn, ast.Name):
        name = fn.id
    else:
        name = ast.unparse(fn)
    if name not in OPERATORS:
        raise ValueError(f"--op {text!r}: unknown operator {name!r}; use one of {OPERATORS}.")
    args = [_literal(a, text) for a in node.args]
    kwargs = {k.arg: _literal(k.value, text) for k in node.keywords if k.arg is not None}
    return getattr(so, name)(*args, **kwargs)


def parse_op(text: str) -> Any:
    """A stackops operator from its Python spelling, without evaluating anything else.

    !!! Example

        ```python
        import stackops as so

        assert parse_op("solar(drop=8)") == so.solar(drop=8)
        op = parse_op("so.compose(middle_stack(block=2), last_stack())")
        assert op.plan(4).depth_out == 7
        ```
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"--op {text!r} is not an expression such as 'solar(drop=8)'.") from e
    if not isinstance(tree.body, ast.Call):
        raise ValueError(f"--op {text!r} must be an operator call such as 'solar(drop=8)'.")
    return _call(tree.body, text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser.

    !!! Example

        ```python
        args = build_parser().parse_args(["in", "out", "--op", "gstack(times=2)"])
        assert args.op == "gstack(times=2)" and not args.preserve
        ```
    """
    p = argparse.ArgumentParser(
        prog="stackops-upscale", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument("src", help="local HF checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--op", help='a stackops operator, e.g. "solar(drop=8)"')
    how.add_argument("--mergekit", help="a mergekit passthrough config (YAML)")
    p.add_argument("--preserve", action="store_true",
                   help="make inserted layers identities (zero o_proj and down_proj)")
    p.add_argument("--dtype", default=None, help="cast floating tensors (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per output file (5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint in DST")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--write-mergekit", default=None, metavar="FILE",
                   help="also write the equivalent mergekit config (YAML, or JSON for .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _depth(src: Path) -> int:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"stackops-upscale: {src} has no config.json (not a HF checkpoint).")
    depth = json.loads(cfg_path.read_text()).get("num_hidden_layers")
    if not isinstance(depth, int):
        raise SystemExit(f"stackops-upscale: {cfg_path} has no num_hidden_layers.")
    return depth


def _write_mergekit(path: Path, cfg: dict[str, Any]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    else:
        import yaml

        path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import stackops as so
    from stackops.models import upscale_hf
    from stackops.models._safetensors import Reader

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        print(f"stackops-upscale: {src} is not a local directory (nothing is downloaded).",
              file=sys.stderr)
        return 2
    try:
        op = parse_op(args.op) if args.op else so.from_mergekit(Path(args.mergekit))
        depth = _depth(src)
        plan = op.plan(depth)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"stackops-upscale: {e}", file=sys.stderr)
        return 2
    mergekit_cfg = None
    if args.write_mergekit:
        try:  # before anything is written: an operator with mixes has no passthrough form
            mergekit_cfg = so.to_mergekit(plan, model=str(src), dtype=args.dtype,
                                          preserve=args.preserve)
        except ValueError as e:
            print(f"stackops-upscale: --write-mergekit: {e}", file=sys.stderr)
            return 2
    print(plan)
    if args.dry_run:
        return 0
    with Reader(src) as reader:
        in_bytes = sum(t.nbytes for t in reader.tensors.values())
        layer_bytes = sum(
            t.nbytes for n, t in reader.tensors.items() if n.startswith("model.layers.")
        )
    out_bytes = in_bytes + layer_bytes * (plan.depth_out - depth) // depth
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=out_bytes, unit="B", unit_scale=True, desc="writing")
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    try:
        upscale_hf(src, dst, op, preserve=args.preserve, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                   progress=None if bar is None else bar.update)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"stackops-upscale: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if mergekit_cfg is not None:
        _write_mergekit(Path(args.write_mergekit), mergekit_cfg)
    new = [q for q in range(plan.depth_out) if q in set(plan.inserted)]
    print(
        f"built {dst}: {depth} -> {plan.depth_out} layers ({len(new)} inserted: {new}), "
        f"{in_bytes / 1e9:.3f} GB -> {out_bytes / 1e9:.3f} GB in {seconds:.1f} s"
        f"{', inserted layers are identities' if args.preserve else ''}; provenance in "
        f"{dst / 'stackops_provenance.json'}"
    )
    return 0


def entry() -> int:
    """The `stackops-upscale` console script (and `python experiments/upscale.py`)."""
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
