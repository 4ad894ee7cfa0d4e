"""Benchmark: N seeds as one vmapped program against N sequential runs.

A thin wrapper around `stackops_harness.cli.bench_seeds`; `--help` lists the options.
"""

from stackops_harness.cli.bench_seeds import entry

if __name__ == "__main__":
    raise SystemExit(entry())
