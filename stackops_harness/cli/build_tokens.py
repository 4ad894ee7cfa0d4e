"""Build byte-level token files (train.bin, val.bin, meta.json) from local text.

By default the corpus is the Python standard library's own sources (no download):

    python experiments/build_tokens.py --out data/stdlib
    python experiments/build_tokens.py --out data/docs --src /usr/share/doc --pattern '*.txt'
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stackops_harness import require_extras


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, build the token files and print a short summary.

    !!! Example

        `python experiments/build_tokens.py --out data/stdlib --max-mb 20`
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--src",
        type=Path,
        action="append",
        default=None,
        help="file or directory of text (repeatable); default: the stdlib's sources",
    )
    parser.add_argument(
        "--pattern", default="*.py", help="glob used inside --src directories (default *.py)"
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=20.0,
        help="cap on the default stdlib corpus, in MB (ignored with --src)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return _build(args)
    except (ValueError, OSError) as e:
        # One line, no traceback: the messages name the flag or file and the fix.
        print(f"stackops-build-tokens: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_flags(args: argparse.Namespace) -> None:
    if not args.max_mb > 0 or args.max_mb == float("inf"):
        raise ValueError(f"--max-mb must be a positive number of megabytes, got {args.max_mb}.")
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(
            f"--val-fraction must lie strictly between 0 and 1 (e.g. 0.05), got "
            f"{args.val_fraction}."
        )
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the token files.")
    for src in args.src or []:
        if not src.exists():
            raise ValueError(f"--src {src} does not exist; give a text file or a directory.")


def _build(args: argparse.Namespace) -> dict:
    from stackops_harness import data  # needs the experiments extra (grain)

    _check_flags(args)
    start = time.perf_counter()
    if args.src:
        sources: list[Path] = args.src
        label = ", ".join(str(s) for s in sources)
    else:
        sources = data.default_corpus_files(max_bytes=int(args.max_mb * 1e6))
        label = f"stdlib ({len(sources)} files)"
    meta = data.build_token_files(
        sources,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        pattern=args.pattern,
    )
    elapsed = time.perf_counter() - start

    n, f = meta["num_tokens"], meta["num_files"]
    print(f"source:  {label}")
    print(f"train:   {n['train']:>12,} tokens from {f['train']} files -> {args.out / 'train.bin'}")
    print(f"val:     {n['val']:>12,} tokens from {f['val']} files -> {args.out / 'val.bin'}")
    print(f"skipped: {meta['skipped_files']} unreadable or empty files; {elapsed:.1f} s")
    return meta


def entry() -> int:
    """Console script `stackops-build-tokens` (also `python experiments/build_tokens.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-build-tokens")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
