"""The safetensors file format, read and written tensor by tensor with numpy.

A safetensors file is an 8-byte little-endian header length, a JSON header (for each tensor:
`dtype`, `shape` and `data_offsets` into the data that follows; an optional `__metadata__`
of strings), then the tensors' bytes, contiguous and in offset order. The format is small
enough to implement directly, and doing so lets reading and writing stream: a tensor is
read into its own buffer with `readinto` (no memory map, whose touched pages would stay
resident and count against the process) and written from one, so converting a checkpoint
never holds more than the model plus one tensor. bfloat16 comes from `ml_dtypes`, which JAX
already depends on; no other package is needed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

__all__ = ["TensorInfo", "Reader", "Entry", "write_checkpoint", "dtype_name", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the limit safetensors itself enforces


def dtype_name(dtype: Any) -> str:
    """The safetensors name (`"F32"`, `"BF16"`, ...) of a numpy/JAX dtype."""
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise TypeError(f"safetensors cannot store dtype {dt}; supported: {sorted(_DTYPES)}.")
    return _NAMES[dt]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header).")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path} is not a safetensors file (header length {n} is invalid).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON).") from e
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: tensor {name!r} has an unsupported or malformed entry {meta!r} "
                f"(dtypes read: {sorted(_DTYPES)})."
            ) from e
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} (shape {shape}, {meta['dtype']}) does not fit its byte "
                f"range {begin}..{end}: the file is truncated or corrupt."
            )
        out[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
    return out


class Reader:
    """The tensors of a checkpoint directory (one file, or shards and their index).

    Files stay open while the reader is used as a context manager; `get` reads one tensor
    into a fresh array of its stored dtype.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index (no weight_map).") from e
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt"))
            hint = (
                f" It holds {others}: only safetensors checkpoints are read; convert them first "
                "(e.g. load in transformers and `save_pretrained(dir, safe_serialization=True)`)."
                if others
                else ""
            )
            raise FileNotFoundError(
                f"{directory} holds neither {SINGLE_NAME} nor {INDEX_NAME}.{hint}"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = directory / fname
            if not path.is_file():
                raise FileNotFoundError(f"{index} names the shard {fname}, which is missing.")
            for name, info in read_header(path).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative about which shard holds a tensor
                self.tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise ValueError(
                    f"{index} lists tensors that its shards do not hold: {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}."
                )
        self._files: dict[Path, IO[bytes]] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")  # noqa: SIM115 -- closed in __exit__
        out = np.empty(info.shape, info.dtype)
        f.seek(info.start)
        view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        if f.readinto(view) != info.nbytes:  # type: ignore[attr-defined]
            raise ValueError(f"{info.file}: tensor {name!r} is truncated.")
        return out


@dataclass(frozen=True)
class Entry:
    """One tensor to write: `produce()` returns it (only when its turn comes), or, with
    `raw`, its bytes are copied unchanged from `raw = TensorInfo` of a source file (by the
    kernel where it can: no trip through a Python buffer)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    raw: TensorInfo | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _shard(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_file(
    path: Path,
    entries: Iterable[Entry],
    metadata: dict[str, str],
    progress: Callable[[int], None] | None,
) -> None:
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": dtype_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    tmp = path.with_name(path.name + ".tmp")
    sources: dict[Path, int] = {}
    try:
        with open(tmp, "wb", buffering=0) as f:
            fd = f.fileno()
            _write_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw))
            for e in entries:
                if e.raw is not None:
                    if e.raw.nbytes != e.nbytes or e.raw.dtype != e.dtype:
                        raise AssertionError(f"tensor {e.name}: raw source does not match")
                    if e.raw.file not in sources:
                        sources[e.raw.file] = os.open(e.raw.file, os.O_RDONLY)
                    _copy_range(sources[e.raw.file], e.raw.start, fd, e.nbytes)
                else:
                    arr = e.produce()
                    if arr.shape != e.shape or arr.dtype != e.dtype:
                        raise AssertionError(
                            f"tensor {e.name}: produced {arr.shape} {arr.dtype}, planned "
                            f"{e.shape} {e.dtype}"
                        )
                    _write_all(fd, np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
                if progress is not None:
                    progress(e.nbytes)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for sfd in sources.values():
            os.close(sfd)
    os.replace(tmp, path)


def _write_all(fd: int, data: memoryview) -> None:
    """`os.write` until every byte is out (one call writes at most ~2 GiB on Linux)."""
    data = data.cast("B")
    while data:
        n = os.write(fd, data)
        data = data[n:]


_CHUNK = 16 * 2**20


def _copy_range(src_fd: int, offset: int, dst_fd: int, count: int) -> None:
    """Append `count` bytes of `src_fd` from `offset` to `dst_fd` (at its current offset)."""
    if hasattr(os, "copy_file_range"):
        try:
            while count > 0:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 2**30), offset)
                if n == 0:
                    raise ValueError("source file ended early: it is truncated")
                offset += n
                count -= n
            return
        except OSError:
            pass  # e.g. across file systems on old kernels: copy through a buffer instead
    buf = bytearray(min(_CHUNK, count))
    while count > 0:
        n = os.preadv(src_fd, [memoryview(buf)[: min(len(buf), count)]], offset)
        if n == 0:
            raise ValueError("source file ended early: it is truncated")
        _write_all(dst_fd, memoryview(buf)[:n])
        offset += n
        count -= n


def write_checkpoint(
    directory: Path,
    entries: Sequence[Entry],
    *,
    max_shard_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write `entries` as `model.safetensors`, or as shards plus their index when they do
    not fit in one file of `max_shard_size` bytes. Returns the file names written."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate tensor names")
    shards = _shard(entries, max_shard_size)
    meta = {"format": "pt"}  # what transformers' own writer records; its loader checks it
    if len(shards) == 1:
        _write_file(directory / SINGLE_NAME, shards[0], meta, progress)
        return [SINGLE_NAME]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(files, shards):
        _write_file(directory / fname, shard, meta, progress)
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {e.name: fname for fname, shard in zip(files, shards) for e in shard},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX_NAME]
