"""Build byte-level token files (train.bin, val.bin, meta.json) from local text.

A thin wrapper around `stackops_harness.cli.build_tokens`, which is also installed as the
`stackops-build-tokens` command; `--help` lists the options.
"""

from stackops_harness.cli.build_tokens import entry

if __name__ == "__main__":
    raise SystemExit(entry())
