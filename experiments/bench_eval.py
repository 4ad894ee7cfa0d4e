"""Benchmark: the primitive evaluation's share of a default-preset seed.

A thin wrapper around `stackops_harness.cli.bench_eval`; `--help` lists the options.
"""

from stackops_harness.cli.bench_eval import entry

if __name__ == "__main__":
    raise SystemExit(entry())
