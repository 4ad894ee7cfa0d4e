"""The harness's command-line programs, one module each (`main(argv)` returns what it
measured or wrote; `entry()` is the console script). Installed as `stackops-train`,
`stackops-midas`, `stackops-looped`, `stackops-eval-primitives`, `stackops-build-tokens`,
`stackops-bench-growth` and `stackops-bench-train`."""
