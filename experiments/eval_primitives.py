"""Evaluate the reasoning primitives on a checkpoint: k-shot in context and fine-tuned on 64.

A thin wrapper around `stackops_harness.cli.eval_primitives`, which is also installed as the
`stackops-eval-primitives` command; `--help` lists the options.
"""

from stackops_harness.cli.eval_primitives import entry

if __name__ == "__main__":
    raise SystemExit(entry())
