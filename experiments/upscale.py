"""Grow a Hugging Face checkpoint in depth, file to file (LLaMA Pro, SOLAR, Gstack, ...).

A thin wrapper around `stackops_harness.cli.upscale`, which is also installed as the
`stackops-upscale` command; `--help` lists the options.
"""

from stackops_harness.cli.upscale import entry

if __name__ == "__main__":
    raise SystemExit(entry())
