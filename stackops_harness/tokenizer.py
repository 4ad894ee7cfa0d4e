"""The byte-level tokenizer, importable without the experiments extra.

The evaluation code and the prepared accelerator run (`stackops_harness.cli.gpu_run`) need
only NumPy to turn text into token ids; `stackops_harness.data` (grain pipelines, token
files) uses the same byte-per-token convention.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["VOCAB_SIZE", "encode", "decode"]

VOCAB_SIZE = 256
"""Token ids are bytes: `0..255`."""


def encode(text: str) -> np.ndarray:
    """Encode text as its UTF-8 bytes, one token id per byte (`uint16`, as in token files).

    !!! Example

        >>> encode("hé").tolist()
        [104, 195, 169]
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode(ids: npt.ArrayLike) -> str:
    """Decode byte-level token ids back to text; invalid UTF-8 becomes U+FFFD.

    !!! Example

        >>> decode([104, 195, 169])
        'hé'
    """
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"`ids` must lie in 0..{VOCAB_SIZE - 1}.")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
