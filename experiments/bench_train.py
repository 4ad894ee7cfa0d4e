"""Benchmark the training harness: step throughput against PyTorch, compile time per stage,

A thin wrapper around `stackops_harness.cli.bench_train`, which is also installed as the
`stackops-bench-train` command; `--help` lists the options.
"""

from stackops_harness.cli.bench_train import entry

if __name__ == "__main__":
    raise SystemExit(entry())
