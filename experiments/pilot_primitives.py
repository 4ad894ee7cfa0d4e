"""Pilot runs that choose the pretraining mix of the MIDAS experiments.

A thin wrapper around `stackops_harness.cli.pilot_primitives`; `--help` lists the options.
"""

from stackops_harness.cli.pilot_primitives import entry

if __name__ == "__main__":
    raise SystemExit(entry())
