"""Baseline vs GradStack vs MIDAS at small scale: loss, compute, wall time, reasoning primitives.

A thin wrapper around `stackops_harness.cli.midas`, which is also installed as the
`stackops-midas` command; `--help` lists the options.
"""

from stackops_harness.cli.midas import entry

if __name__ == "__main__":
    raise SystemExit(entry())
