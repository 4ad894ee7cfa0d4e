"""The harness's command-line programs, one module each (`main(argv)` returns what it
measured or wrote; `entry()` is the console script). Installed as `stackops-train`,
`stackops-midas`, `stackops-looped`, `stackops-eval-primitives`, `stackops-build-tokens`,
`stackops-upscale`, `stackops-gpu-run`, `stackops-pilot-primitives` and the benchmarks
`stackops-bench-growth`, `stackops-bench-train`, `stackops-bench-upscale`,
`stackops-bench-seeds`, `stackops-bench-eval`; in a checkout `python experiments/NAME.py`
runs the same program."""
