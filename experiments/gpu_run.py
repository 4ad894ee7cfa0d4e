"""The prepared accelerator run (many vmapped seeds of baseline, GradStack, MIDAS; gpu preset MFU).

A thin wrapper around `stackops_harness.cli.gpu_run`; `--help` lists the options. Needs JAX,
Equinox and optax only (no grain, no orbax, no network).
"""

from stackops_harness.cli.gpu_run import entry

if __name__ == "__main__":
    raise SystemExit(entry())
