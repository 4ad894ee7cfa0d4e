"""How long does `stackops.grow` take next to the physical floor: one copy of the grown weights?

A thin wrapper around `stackops_harness.cli.bench_growth`, which is also installed as the
`stackops-bench-growth` command; `--help` lists the options.
"""

from stackops_harness.cli.bench_growth import entry

if __name__ == "__main__":
    raise SystemExit(entry())
