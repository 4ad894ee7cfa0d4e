"""Byte-level tokenizer, flat uint16 token files and a checkpointable grain pipeline.

The experiments train on local text only (nothing is downloaded): by default the Python
standard library's own sources, see [`default_corpus_files`][]. Text becomes UTF-8 bytes
(token ids 0..255), stored in nanoGPT's flat format: a raw array of `uint16` token ids,
one file per split (`train.bin`, `val.bin`) plus a `meta.json` that records, for each file,
its dtype, length, largest id and SHA-256, and the vocabulary size. [`open_token_dir`][]
checks all of them (and the largest id against the model's vocabulary) before a run trains
on the files, so a replaced, truncated or wrongly written file is refused with advice.

Training batches come from [`make_train_iter`][]: a grain pipeline over non-overlapping
windows of `seq_len + 1` tokens, shuffled by seed, repeated forever, split across processes
and batched. Its iterator's `get_state()` / `set_state()` resume it exactly, so it can be
saved with the model in a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import numpy.typing as npt

VOCAB_SIZE = 256
"""Size of the byte-level vocabulary: one token per byte value, nothing reserved."""

TOKEN_DTYPE = np.uint16
"""On-disk dtype of token files (nanoGPT's flat format)."""

DEFAULT_SEPARATOR = "\n\n"
"""Text placed after every document when a corpus is concatenated."""



# --------------------------------------------------------------------------- tokenizer


def encode(text: str) -> np.ndarray:
    """Encode text as its UTF-8 bytes, one token id (0..255) per byte.

    **Arguments:**

    - `text`: any Python string.

    **Returns:**

    A 1-D `uint16` array of token ids, one per UTF-8 byte.

    !!! Example

        >>> encode("hé").tolist()
        [104, 195, 169]
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE)


def decode(ids: npt.ArrayLike) -> str:
    """Decode byte-level token ids back to text.

    Invalid UTF-8 (for example a multi-byte character cut in half by a model's output)
    becomes U+FFFD instead of raising.

    **Arguments:**

    - `ids`: a 1-D sequence or array of integer token ids in `0..255`.

    **Returns:**

    The decoded string.

    !!! Example

        >>> decode(encode("hé"))
        'hé'
        >>> decode([104, 195])
        'h\\ufffd'
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"`ids` must be 1-D, got shape {arr.shape}.")
    if arr.size == 0:
        return ""
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`ids` must hold integers, got dtype {arr.dtype}.")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= VOCAB_SIZE:
        raise ValueError(
            f"`ids` must lie in 0..{VOCAB_SIZE - 1} (byte-level vocabulary), "
            f"got values in {lo}..{hi}."
        )
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- token files


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    # Write next to the target and rename: a reader (or a crashed writer) never sees a
    # half-written file, because os.replace is atomic within one filesystem.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tokens(path: str | os.PathLike[str], ids: npt.ArrayLike) -> Path:
    """Write token ids as a flat `uint16` file, atomically (temporary file + rename).

    **Arguments:**

    - `path`: destination file; parent directories are created.
    - `ids`: a non-empty 1-D array of integer ids in `0..65535`.

    **Returns:**

    The path written, as a `Path`.

    !!! Example

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> p = write_tokens(f"{d}/val.bin", encode("abc"))
        >>> load_tokens(p).tolist()
        [97, 98, 99]
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"`ids` must be 1-D, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("`ids` is empty; a token file needs at least one token.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`ids` must hold integers, got dtype {arr.dtype}.")
    lo, hi = int(arr.min()), int(arr.max())
    info = np.iinfo(TOKEN_DTYPE)
    if lo < info.min or hi > info.max:
        raise ValueError(f"`ids` must fit in uint16 (0..{info.max}), got values in {lo}..{hi}.")
    out = Path(path)
    _atomic_write_bytes(out, arr.astype(TOKEN_DTYPE).tobytes())
    return out


def load_tokens(path: str | os.PathLike[str]) -> np.memmap:
    """Open a flat `uint16` token file read-only, without loading it into memory.

    **Arguments:**

    - `path`: a file written by [`write_tokens`][] (or nanoGPT's `prepare.py`).

    **Returns:**

    A 1-D read-only `np.memmap` of `uint16` token ids.

    !!! Example

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> tokens = load_tokens(write_tokens(f"{d}/t.bin", [1, 2, 3]))
        >>> tokens.dtype, len(tokens)
        (dtype('uint16'), 3)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"`path` {str(p)!r} is not a token file (it does not exist).")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"`path` {str(p)!r} is empty; a token file needs at least one token.")
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise ValueError(
            f"`path` {str(p)!r} has {size} bytes, not a whole number of uint16 tokens; "
            "is it really a flat token file? (A file of uint8 ids, one byte per token, must be "
            "rewritten with write_tokens(path, np.fromfile(path, np.uint8)).)"
        )
    return np.memmap(p, dtype=TOKEN_DTYPE, mode="r")


class TokenDataError(ValueError):
    """Token files that cannot be trained on: wrong dtype, changed content, ids beyond the
    vocabulary, or a `meta.json` that disagrees with the files."""


SPLITS = ("train", "val")


def token_file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a flat `uint16` token file: `{"dtype", "length", "max_id", "sha256"}`.

    One sequential pass over the file (about 1 GB/s), so it is cheap next to training.

    **Arguments:**

    - `path`: a token file.

    **Returns:** the dtype name, the number of tokens, the largest id and the SHA-256 of
    the file's bytes.

    !!! Example

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> info = token_file_info(write_tokens(f"{d}/t.bin", [5, 7, 2]))
        >>> info["dtype"], info["length"], info["max_id"], len(info["sha256"])
        ('uint16', 3, 7, 64)
    """
    tokens = load_tokens(path)
    digest = hashlib.sha256()
    top = 0
    chunk = 1 << 22
    for start in range(0, len(tokens), chunk):
        block = np.asarray(tokens[start : start + chunk])
        digest.update(block.tobytes())
        top = max(top, int(block.max()))
    return {
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "length": int(len(tokens)),
        "max_id": top,
        "sha256": digest.hexdigest(),
    }


def write_token_meta(
    out_dir: str | os.PathLike[str], *, vocab_size: int, **extra: Any
) -> dict[str, Any]:
    """Write (or rewrite) `meta.json` for the `train.bin` and `val.bin` in `out_dir`.

    Use it after writing token files yourself with [`write_tokens`][], so that a run
    verifies them. [`build_token_files`][] calls it.

    **Arguments:**

    - `out_dir`: the directory holding `train.bin` and `val.bin`.
    - `vocab_size`: the vocabulary the ids come from (every id must be below it).
    - `extra`: more JSON-able entries to record.

    **Returns:** the metadata written.

    !!! Example

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = write_tokens(f"{d}/train.bin", [1, 2, 3]), write_tokens(f"{d}/val.bin", [4])
        >>> meta = write_token_meta(d, vocab_size=8)
        >>> meta["token_files"]["train.bin"]["length"], meta["vocab_size"]
        (3, 8)
    """
    out = Path(out_dir)
    _check_positive_int("vocab_size", vocab_size)
    files = {f"{name}.bin": token_file_info(out / f"{name}.bin") for name in SPLITS}
    for name, info in files.items():
        if info["max_id"] >= vocab_size:
            raise TokenDataError(
                f"{out / name} holds token id {info['max_id']}, not below `vocab_size`="
                f"{vocab_size}; pass the vocabulary the ids come from."
            )
    meta = {**extra, "dtype": np.dtype(TOKEN_DTYPE).name, "vocab_size": int(vocab_size)}
    meta["token_files"] = files
    _atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
    return meta


def _dtype_advice(path: Path, tokens: np.ndarray, vocab_size: int) -> str:
    """What a file that does not look like uint16 ids below `vocab_size` probably is."""
    sample = np.asarray(tokens[: 1 << 20])
    raw = sample.view(np.uint8)
    if len(sample) >= 4 and not sample[1::2].any() and int(sample[0::2].max()) < vocab_size:
        return (
            f"every second uint16 of {path} is 0: it looks like int32 (or int64) ids. Rewrite "
            f"it as uint16 with stackops_harness.data.write_tokens(path, "
            f"np.fromfile(path, np.int32)) and rebuild meta.json (write_token_meta)."
        )
    top = int(sample.max())
    # uint8 ids read in pairs: the high bytes are ids too, mostly nonzero (text bytes); ids
    # of a vocabulary just over `vocab_size` have mostly zero high bytes.
    high_mostly_nonzero = float(np.mean(raw[1::2] != 0)) > 0.5
    if int(raw.max()) < vocab_size <= 256 and top >= vocab_size and high_mostly_nonzero:
        return (
            f"each of its bytes is a valid id but its uint16 ids are not, so it looks like "
            f"uint8 ids (one byte per token). Rewrite it as uint16 with "
            f"stackops_harness.data.write_tokens(path, np.fromfile(path, np.uint8)) and "
            "rebuild meta.json (write_token_meta); only if its ids really come from a "
            f"vocabulary of {top + 1} or more, raise TrainConfig.vocab_size instead."
        )
    return (
        "if the ids really come from a larger vocabulary, raise TrainConfig.vocab_size to at "
        "least the largest id + 1; otherwise rebuild the file with stackops-build-tokens."
    )


def open_token_dir(
    data_dir: str | os.PathLike[str], *, vocab_size: int
) -> tuple[np.memmap, np.memmap, dict[str, Any]]:
    """Open `train.bin` and `val.bin` of `data_dir`, verified, for a model of `vocab_size`.

    Each file is read once: its length, largest id and SHA-256 are compared with what
    `meta.json` records (when it records them; files from older builds or other tools are
    described from their content alone), its largest id with `vocab_size`, and the dtype
    in `meta.json` with `uint16`. A mismatch raises [`TokenDataError`][] saying what
    differs and what to do, including for files written as int32 or uint8 by mistake.

    **Arguments:**

    - `data_dir`: a directory with `train.bin` and `val.bin` (and usually `meta.json`).
    - `vocab_size`: the model's vocabulary size.

    **Returns:** `(train, val, info)`: the two read-only memmaps and
    `{"train": {"length", "sha256"}, "val": {...}}`, the description a checkpoint records.

    !!! Example

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = build_token_files([__file__, sysconfig.__file__], d, val_fraction=0.4)
        >>> train, val, info = open_token_dir(d, vocab_size=256)
        >>> info["train"]["length"] == len(train)
        True
    """
    root = Path(data_dir)
    meta_path = root / "meta.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenDataError(
                f"{meta_path} is not valid JSON ({e}); rebuild it with "
                f"stackops_harness.data.write_token_meta({str(root)!r}, vocab_size=...)."
            ) from e
    dtype = meta.get("dtype")
    if dtype is not None and dtype != np.dtype(TOKEN_DTYPE).name:
        raise TokenDataError(
            f"{meta_path} says the token files hold {dtype} ids, but the harness reads flat "
            f"uint16 files. Rewrite them with stackops_harness.data.write_tokens(path, "
            f"np.fromfile(path, np.{dtype})) and then write_token_meta."
        )
    meta_vocab = meta.get("vocab_size")
    if isinstance(meta_vocab, int) and meta_vocab > vocab_size:
        raise TokenDataError(
            f"The token files in {root} have a vocabulary of {meta_vocab} (meta.json), but "
            f"TrainConfig.vocab_size={vocab_size}; set vocab_size={meta_vocab}."
        )
    recorded = meta.get("token_files") or {}
    arrays, info = [], {}
    for split in SPLITS:
        path = root / f"{split}.bin"
        tokens = load_tokens(path)
        now = token_file_info(path)
        want = recorded.get(path.name)
        if isinstance(want, dict):
            for key in ("length", "sha256", "max_id"):
                if want.get(key) != now[key]:
                    raise TokenDataError(
                        f"{path} does not match {meta_path}: its {key} is {now[key]}, meta.json "
                        f"records {want.get(key)}. The file was replaced, truncated or "
                        "corrupted after meta.json was written: restore it, or if the new "
                        "file is right, rebuild meta.json with stackops_harness.data."
                        "write_token_meta (or stackops-build-tokens)."
                    )
        if now["max_id"] >= vocab_size:
            raise TokenDataError(
                f"{path} holds token id {now['max_id']}, but TrainConfig.vocab_size="
                f"{vocab_size}: {_dtype_advice(path, tokens, vocab_size)}"
            )
        if len(tokens) >= 4 and not np.asarray(tokens[1 : 1 << 21 : 2]).any():
            raise TokenDataError(
                f"{path}: {_dtype_advice(path, tokens, vocab_size)}"
            )
        arrays.append(tokens)
        info[split] = {"length": now["length"], "sha256": now["sha256"]}
    return arrays[0], arrays[1], info


# --------------------------------------------------------------------------- corpora


def default_corpus_files(max_bytes: int = 20_000_000) -> list[Path]:
    """List the Python standard library's source files: text available on any machine.

    Tests (`test/`, `tests/`), `idlelib` and `site-packages` are left out. Files are sorted
    by their path relative to the standard library, so the list is deterministic on a
    given Python install; the sorted prefix whose total size fits in `max_bytes` is kept.

    **Arguments:**

    - `max_bytes`: cap on the files' total size in bytes (about 12 MB qualify on CPython
      3.11, so the default keeps them all).

    **Returns:**

    A sorted list of `.py` file paths.

    !!! Example

        >>> files = default_corpus_files(max_bytes=200_000)
        >>> sum(f.stat().st_size for f in files) <= 200_000
        True
        >>> sorted({f.suffix for f in files})
        ['.py']
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"`max_bytes` must be a positive int, got {max_bytes!r}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    if next(root.rglob("*.py"), None) is None:
        raise FileNotFoundError(f"No standard-library sources found under {str(root)!r}.")
    # One list of stdlib sources: corpus.stdlib_sources (importable without grain).
    from .corpus import stdlib_sources

    return stdlib_sources(max_bytes)


def _expand_sources(sources: Sequence[str | os.PathLike[str]], pattern: str) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        raise TypeError("`sources` must be a list of paths, not a single path.")
    files: list[Path] = []
    seen: set[Path] = set()
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise ValueError(f"`sources` entry {str(p)!r} is neither a file nor a directory.")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def _read_text(path: Path) -> str | None:
    # Corpora such as the stdlib contain a few files that are not UTF-8 (test fixtures,
    # deliberately broken encodings) or not readable; skipping them beats failing a build.
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def build_token_files(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    pattern: str = "*.py",
    separator: str = DEFAULT_SEPARATOR,
) -> dict[str, Any]:
    """Tokenize local text files into `train.bin`, `val.bin` and `meta.json`.

    Directories in `sources` are searched recursively for `pattern`; plain files are taken
    as they are. Unreadable, non-UTF-8 and empty files are skipped. The file order is
    shuffled by `seed`, and whole files go to the validation split (from the front of the
    shuffled order) until it holds at least `val_fraction` of all tokens; the rest is the
    training split. Each file's text is followed by `separator`.

    **Arguments:**

    - `sources`: a list of files and/or directories.
    - `out_dir`: output directory (created if needed); existing files are replaced
      atomically.
    - `val_fraction`: target share of tokens in the validation split, in `(0, 1)`.
    - `seed`: seed of the file shuffle.
    - `pattern`: glob used inside directories.
    - `separator`: text appended to every file.

    **Returns:**

    The metadata also written to `meta.json`: token and file counts per split, the
    sources, seed and the files of each split, and (see [`write_token_meta`][]) each token
    file's dtype, length, largest id and SHA-256.

    !!! Example

        >>> import tempfile
        >>> from pathlib import Path
        >>> src = Path(tempfile.mkdtemp())
        >>> for i in range(4):
        ...     _ = (src / f"m{i}.py").write_text(f"x = {i}\\n")
        >>> meta = build_token_files([src], src / "out", val_fraction=0.25)
        >>> meta["num_files"], meta["num_tokens"]
        ({'train': 3, 'val': 1}, {'train': 24, 'val': 8})
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"`val_fraction` must lie strictly between 0 and 1, got {val_fraction}.")
    files = _expand_sources(sources, pattern)
    docs: list[tuple[Path, np.ndarray]] = []
    skipped = 0
    for f in files:
        text = _read_text(f)
        if not text:
            skipped += 1
            continue
        docs.append((f, encode(text + separator)))
    if len(docs) < 2:
        raise ValueError(
            f"`sources` yielded {len(docs)} readable non-empty file(s) matching {pattern!r}; "
            "at least 2 are needed to split into train and val."
        )

    order = np.random.default_rng(seed).permutation(len(docs))
    total = sum(len(ids) for _, ids in docs)
    val_idx: list[int] = []
    val_tokens = 0
    for i in order:
        # Stop before emptying the training split, even for a tiny corpus.
        if val_tokens >= val_fraction * total or len(val_idx) == len(docs) - 1:
            break
        val_idx.append(int(i))
        val_tokens += len(docs[i][1])
    val_set = set(val_idx)
    train_idx = [int(i) for i in order if int(i) not in val_set]

    out = Path(out_dir)
    splits = {"train": train_idx, "val": val_idx}
    for name, idx in splits.items():
        write_tokens(out / f"{name}.bin", np.concatenate([docs[i][1] for i in idx]))
    meta: dict[str, Any] = {
        "format": "flat uint16 token ids (nanoGPT)",
        "tokenizer": "utf-8 bytes",
        "vocab_size": VOCAB_SIZE,
        "seed": seed,
        "val_fraction": float(val_fraction),
        "pattern": pattern,
        "separator": separator,
        "sources": [str(s) for s in sources],
        "skipped_files": skipped,
        "num_files": {name: len(idx) for name, idx in splits.items()},
        "num_tokens": {
            name: int(sum(len(docs[i][1]) for i in idx)) for name, idx in splits.items()
        },
        "files": {name: [str(docs[i][0]) for i in idx] for name, idx in splits.items()},
    }
    return write_token_meta(out, **meta)


# --------------------------------------------------------------------------- pipeline


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def _check_tokens(tokens: Any, seq_len: int) -> np.ndarray:
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"`tokens` must be a 1-D token array, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`tokens` must hold integer ids, got dtype {arr.dtype}.")
    if len(arr) < seq_len + 1:
        raise ValueError(
            f"`tokens` has {len(arr)} tokens, shorter than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a larger token file or a smaller `seq_len`."
        )
    return arr


class _GatherWindows:
    """Turns the global batch's window ids into this process's rows of tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, start: int, stop: int):
        self.tokens = tokens
        self.offsets = np.arange(seq_len + 1)
        self.seq_len = seq_len
        self.start, self.stop = start, stop

    def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        local = np.asarray(window_ids[self.start : self.stop], dtype=np.int64)
        idx = local[:, None] * self.seq_len + self.offsets[None, :]
        return {"tokens": np.asarray(self.tokens[idx], dtype=np.int32)}


def make_train_iter(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """A deterministic, checkpointable, endless iterator of training batches.

    The token array is cut into `num_windows = (len(tokens) - 1) // seq_len` windows of
    `seq_len + 1` tokens, window `i` starting at `i * seq_len` (so consecutive windows share
    one token: the last target of one is the first input of the next). Window ids are
    shuffled by `seed`, repeated forever (each epoch reshuffled) and grouped into global
    batches of `global_batch` ids. Global batch `b` is the same set of windows whatever the
    number of processes; process `p` gets its rows `[p * local, (p + 1) * local)` with
    `local = global_batch // process_count`, and only gathers the tokens of those rows.

    **Arguments:**

    - `tokens`: 1-D integer token array, e.g. from [`load_tokens`][].
    - `seq_len`: model context length; each row holds `seq_len + 1` tokens.
    - `global_batch`: rows per step over all processes; divisible by `process_count`.
    - `seed`: shuffle seed.
    - `process_index`, `process_count`: this process and the number of processes
      (`jax.process_index()`, `jax.process_count()`).

    **Returns:**

    A grain `DatasetIterator` of dicts `{"tokens": int32 array (local, seq_len + 1)}`:
    inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`. `it.get_state()` gives a small
    JSON-able dict; `it.set_state(state)` makes it yield exactly the batches that followed.

    !!! Example

        >>> it = make_train_iter(np.arange(100), seq_len=8, global_batch=4, seed=0)
        >>> state = it.get_state()
        >>> first = next(it)["tokens"]
        >>> first.shape, first.dtype
        ((4, 9), dtype('int32'))
        >>> it.set_state(state)
        >>> bool((next(it)["tokens"] == first).all())
        True
    """
    seq_len = _check_positive_int("seq_len", seq_len)
    global_batch = _check_positive_int("global_batch", global_batch)
    process_count = _check_positive_int("process_count", process_count)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)):
        raise ValueError(f"`process_index` must be an int, got {process_index!r}.")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"`process_index` must lie in 0..{process_count - 1} (process_count="
            f"{process_count}), got {process_index}."
        )
    if global_batch % process_count:
        raise ValueError(
            f"`global_batch` ({global_batch}) must be divisible by `process_count` "
            f"({process_count})."
        )
    arr = _check_tokens(tokens, seq_len)
    num_windows = (len(arr) - 1) // seq_len
    local = global_batch // process_count
    gather = _GatherWindows(arr, seq_len, process_index * local, (process_index + 1) * local)
    ds = (
        grain.MapDataset.range(num_windows)
        .shuffle(seed=int(seed))
        .repeat(None)
        # Batch the (cheap) ids globally first, then keep this process's rows: that is what
        # makes global batch b identical for any process_count.
        .batch(global_batch, drop_remainder=True)
        .map(gather)
    )
    # A couple of threads and a short buffer: the gather is a memcpy, and the training
    # step needs the (few) CPU cores more than a deep prefetch queue does.
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return iter(ds.to_iter_dataset(options))


def make_eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch: int, num_batches: int
) -> list[np.ndarray]:
    """Fixed held-out batches: the first windows of a (validation) token array, in order.

    Windows are laid out as in [`make_train_iter`][] (window `i` starts at `i * seq_len`),
    with no shuffling, so every run evaluates on exactly the same tokens.

    **Arguments:**

    - `tokens`: 1-D integer token array, normally the validation split.
    - `seq_len`: model context length; rows hold `seq_len + 1` tokens.
    - `batch`: rows per batch.
    - `num_batches`: number of batches; needs `batch * num_batches * seq_len + 1` tokens.

    **Returns:**

    A list of `num_batches` int32 arrays of shape `(batch, seq_len + 1)`.

    !!! Example

        >>> batches = make_eval_batches(np.arange(50), seq_len=4, batch=2, num_batches=3)
        >>> len(batches), batches[0].tolist()
        (3, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
    """
    seq_len = _check_positive_int("seq_len", seq_len)
    batch = _check_positive_int("batch", batch)
    num_batches = _check_positive_int("num_batches", num_batches)
    arr = _check_tokens(tokens, seq_len)
    available = (len(arr) - 1) // seq_len
    needed = batch * num_batches
    if needed > available:
        raise ValueError(
            f"`num_batches` * `batch` = {needed} windows of {seq_len + 1} tokens requested, "
            f"but `tokens` holds only {available}; lower `num_batches` (at most "
            f"{available // batch}) or `batch`."
        )
    idx = np.arange(needed)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    rows = np.asarray(arr[idx], dtype=np.int32)
    return [rows[i * batch : (i + 1) * batch] for i in range(num_batches)]
