"""A looped model `(k ⊗ L)` against iso-parameter and iso-FLOP untied baselines.

    python experiments/looped.py --preset smoke      # under a minute
    python experiments/looped.py                     # default: (2 ⊗ 3) vs 2 and 6 untied layers
    python experiments/looped.py --k 3 --loops 4 --out runs/looped-3x4

Three models train on the same data, seed and step budget:

- `looped (k⊗L)`: `k` distinct layers run `L` times with shared weights
  (`stackops.loop_tie(block=k, repeats=L)`), effective depth `k·L`;
- `iso-param`: `k` untied layers (the same parameters, `1/L` of the FLOPs);
- `iso-FLOP`: `k·L` untied layers (the same FLOPs, `L×` the block parameters).

The looped model is built by the harness as an `L`-stage run with `loop_tie(block=k)` at
every boundary (each adds one more pass through the same `k` layers) and Prop-α with a
large α, so the first `L - 1` stages last one step each and the full loop trains for the
rest of the budget. Reports validation loss, FLOPs, the reasoning
primitives (k-shot and fine-tuned) and writes `report.md` in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from stackops_harness import require_extras
from stackops_harness.corpus import corpus_dir
from stackops_harness.presets import LOOPED_PRESETS

PRESETS: dict[str, dict[str, Any]] = LOOPED_PRESETS  # stackops_harness.presets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--k", type=int, default=2, help="distinct layers in the loop")
    p.add_argument("--loops", type=int, default=3, help="times the k layers run (L)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of synthetic documents in the pretraining tokens (default: preset)")
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.k < 1 or args.loops < 2:
        raise SystemExit("--k must be >= 1 and --loops >= 2")

    import numpy as np

    import stackops as so
    from stackops_harness import config as C
    from stackops_harness import reasoning as R
    from stackops_harness import report as Rep
    from stackops_harness.corpus import build_mixed_corpus
    from stackops_harness.metrics import read_metrics
    from stackops_harness.paths import data_root
    from stackops_harness.trainer import train

    preset = PRESETS[args.preset]
    out = args.out or Path("runs") / f"looped-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    corpus = dict(preset["corpus"])
    if args.synthetic_fraction is not None:
        corpus["synthetic_fraction"] = args.synthetic_fraction
    data_dir = corpus_dir(data_root(), corpus)
    build_mixed_corpus(data_dir, **corpus)
    k, L = args.k, args.loops
    common = dict(preset["train"], data_dir=str(data_dir), progress=not args.no_progress)
    prim_cfg = R.PrimitiveEvalConfig(max_len=common["seq_len"], **preset["prim"])
    suite = R.PrimitiveSuite(prim_cfg)

    runs = {
        f"looped ({k}⊗{L})": (
            C.TrainConfig(**dict(common, method="custom", depth=k * L, stages=L, alpha=30.0)),
            so.loop_tie(block=k),
        ),
        f"iso-param ({k} layers)": (
            C.TrainConfig(**dict(common, method="baseline", depth=k, stages=1)), None),
        f"iso-FLOP ({k * L} layers)": (
            C.TrainConfig(**dict(common, method="baseline", depth=k * L, stages=1)), None),
    }
    (out / "config.json").write_text(json.dumps(
        {"argv": argv if argv is not None else sys.argv[1:],
         "runs": {name: C.config_to_dict(cfg) for name, (cfg, _) in runs.items()},
         "op": repr(so.loop_tie(block=k, repeats=L)),
         "primitives": dataclasses.asdict(prim_cfg)}, indent=2, default=str))

    rows, sims, summary = [], {}, {}
    for i, (name, (cfg, op)) in enumerate(runs.items()):
        run_dir = out / ["looped", "iso-param", "iso-flop"][i]
        print(f"\n=== {name} -> {run_dir}")
        res = train(cfg, run_dir, op=op)
        few = suite.accuracy(res.model)
        ft = {} if args.no_finetune else R.finetune_accuracy(res.model, prim_cfg)
        recs = read_metrics(res.metrics_path)
        last = [r for r in recs if r.get("kind") == "eval"][-1]
        blocks = res.model.blocks
        n_params = sum(x.size for x in __import__("jax").tree.leaves(blocks.layers))
        sims[name] = R.layer_similarity(blocks)
        summary[name] = {"val_loss": last["val_loss"], "flops": last["flops"],
                         "block_params": int(n_params), "positions": len(blocks),
                         "stored_layers": blocks.num_layers, "fewshot": few, "finetune": ft}
        rows.append([name, len(blocks), blocks.num_layers, f"{n_params:,}",
                     f"{last['val_loss']:.3f}", f"{last['flops']:.3g}",
                     f"{np.mean(list(few.values())):.3f}",
                     f"{np.mean([v['mean'] for v in ft.values()]):.3f}" if ft else "–"]
                    + [f"{few[t]:.2f} / " + (f"{ft[t]['mean']:.2f}" if ft else "–")
                       for t in prim_cfg.tasks])
    header = ["model", "positions", "stored layers", "block params", "val loss", "FLOPs",
              "avg k-shot", "avg FT-64"] + [f"{t} (k-shot / FT)" for t in prim_cfg.tasks]
    table = Rep.markdown_table(header, rows)
    Rep.plot_similarity(sims, out / "layer_similarity.png")
    (out / "report.md").write_text("\n".join([
        f"# Looped ({k}⊗{L}) vs untied baselines ({args.preset} preset)", "", table, "",
        "Teacher-forced exact match with complete shots ("
        + ", ".join(f"{t} {n}-shot" for t, n in suite.shots.items()) + "). Floors (the "
        "highest of uniform chance, informed guess and structural shortcut): "
        + ", ".join(f"{t} {f['floor']:.3f}" for t, f in suite.floors.items()) + ". One seed "
        "per model: differences are not established without more.", "",
        "![layer similarity](layer_similarity.png)", ""]))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n" + table)
    return summary


def entry() -> int:
    """Console script `stackops-looped` (also `python experiments/looped.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-looped")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
