"""A looped model `(k ⊗ L)` against iso-parameter and iso-FLOP untied baselines.

A thin wrapper around `stackops_harness.cli.looped`, which is also installed as the
`stackops-looped` command; `--help` lists the options.
"""

from stackops_harness.cli.looped import entry

if __name__ == "__main__":
    raise SystemExit(entry())
