"""Load, grow and save a Llama checkpoint file to file, next to a plain file copy and mergekit.

A thin wrapper around `stackops_harness.cli.bench_upscale`, which is also installed as the
`stackops-bench-upscale` command; `--help` lists the options.
"""

from stackops_harness.cli.bench_upscale import entry

if __name__ == "__main__":
    raise SystemExit(entry())
