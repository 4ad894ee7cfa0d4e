"""Train the reference LM under a growth method (MIDAS, GradStack, ...) or the baseline.

A thin wrapper around `stackops_harness.cli.train`, which is also installed as the
`stackops-train` command; `--help` lists the options.
"""

from stackops_harness.cli.train import entry

if __name__ == "__main__":
    raise SystemExit(entry())
