"""Tests of stackops_harness/data.py: tokenizer, token files, corpus, grain pipeline."""

import doctest
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackops_harness import data
from stackops_harness.cli import build_tokens

# --------------------------------------------------------------------------- tokenizer


@settings(deadline=None, max_examples=200)
@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    ids = data.encode(text)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.size == 0 or int(ids.max()) < data.VOCAB_SIZE
    assert data.decode(ids) == text


def test_decode_accepts_lists_and_replaces_invalid_utf8():
    assert data.decode([104, 105]) == "hi"
    assert data.decode([]) == ""
    assert data.decode([104, 0xC3]) == "h\ufffd"


@pytest.mark.parametrize(
    "ids, match", [([256], "0..255"), ([-1], "0..255"), ([[1, 2]], "1-D"), ([1.5], "integers")]
)
def test_decode_rejects_bad_ids_naming_the_argument(ids, match):
    with pytest.raises(ValueError, match=rf"`ids`.*{match}|{match}.*`ids`"):
        data.decode(ids)


def test_encode_rejects_non_strings():
    with pytest.raises(TypeError, match="`text`"):
        data.encode(b"bytes")


# --------------------------------------------------------------------------- token files


def test_token_file_round_trip(tmp_path):
    ids = np.array([0, 1, 255, 256, 65535], dtype=np.int64)
    path = data.write_tokens(tmp_path / "sub" / "t.bin", ids)
    assert path.stat().st_size == 2 * len(ids)
    loaded = data.load_tokens(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, ids)
    assert not loaded.flags.writeable
    # nanoGPT's reader sees the same array.
    np.testing.assert_array_equal(np.memmap(path, dtype=np.uint16, mode="r"), ids)


def test_token_file_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "t.bin"
    data.write_tokens(path, [1, 2, 3])
    data.write_tokens(path, [4, 5])
    np.testing.assert_array_equal(data.load_tokens(path), [4, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.bin"
    data.write_tokens(path, [1, 2, 3])

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        data.write_tokens(path, [9, 9, 9, 9])
    monkeypatch.undo()
    np.testing.assert_array_equal(data.load_tokens(path), [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


@pytest.mark.parametrize(
    "ids, match",
    [([], "empty"), ([70000], "uint16"), ([-1], "uint16"), ([[1]], "1-D"), ([0.5], "integers")],
)
def test_write_tokens_rejects_bad_ids(tmp_path, ids, match):
    with pytest.raises(ValueError, match=match):
        data.write_tokens(tmp_path / "t.bin", ids)
    assert not (tmp_path / "t.bin").exists()


def test_load_tokens_rejects_empty_odd_and_missing_files(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="empty"):
        data.load_tokens(tmp_path / "empty.bin")
    with pytest.raises(ValueError, match="whole number"):
        data.load_tokens(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="`path`"):
        data.load_tokens(tmp_path / "missing.bin")


# --------------------------------------------------------------------------- corpora


def _corpus(root: Path, n: int = 10) -> dict[str, str]:
    texts = {}
    for i in range(n):
        sub = root / ("pkg" if i % 2 else "") / f"mod{i}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        texts[str(sub)] = f"# module {i}\n" + "x = 'é'\n" * (i + 1)
        sub.write_text(texts[str(sub)], encoding="utf-8")
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    (root / "empty.py").write_text("")  # empty: skipped
    (root / "notes.txt").write_text("not matched by *.py")
    return texts


def test_build_token_files_splits_whole_shuffled_files(tmp_path):
    texts = _corpus(tmp_path / "src")
    meta = data.build_token_files([tmp_path / "src"], tmp_path / "out", val_fraction=0.2, seed=3)

    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped_files"] == 2
    assert meta["num_files"]["train"] + meta["num_files"]["val"] == len(texts)
    assert meta["num_files"]["val"] >= 1
    for split in ("train", "val"):
        tokens = data.load_tokens(tmp_path / "out" / f"{split}.bin")
        assert len(tokens) == meta["num_tokens"][split]
        expected = "".join(texts[f] + "\n\n" for f in meta["files"][split])
        assert data.decode(tokens) == expected
    assert set(meta["files"]["train"]).isdisjoint(meta["files"]["val"])
    total = sum(meta["num_tokens"].values())
    # Whole files move to val until it holds val_fraction of the tokens, and no more.
    val_sizes = [len((t + "\n\n").encode()) for t in (texts[f] for f in meta["files"]["val"])]
    assert sum(val_sizes) >= 0.2 * total
    assert sum(val_sizes[:-1]) < 0.2 * total


def test_build_token_files_is_deterministic_by_seed(tmp_path):
    _corpus(tmp_path / "src")
    a = data.build_token_files([tmp_path / "src"], tmp_path / "a", seed=1)
    b = data.build_token_files([tmp_path / "src"], tmp_path / "b", seed=1)
    c = data.build_token_files([tmp_path / "src"], tmp_path / "c", seed=2)
    assert a["files"] == b["files"]
    train_a, train_b = (tmp_path / d / "train.bin" for d in "ab")
    assert train_a.read_bytes() == train_b.read_bytes()
    assert a["files"]["train"] + a["files"]["val"] != c["files"]["train"] + c["files"]["val"]


def test_build_token_files_rejects_bad_inputs(tmp_path):
    (tmp_path / "one.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="`val_fraction`"):
        data.build_token_files([tmp_path], tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ValueError, match="`sources`.*at least 2"):
        data.build_token_files([tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="`sources`.*neither"):
        data.build_token_files([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(TypeError, match="`sources`"):
        data.build_token_files(tmp_path, tmp_path / "out")


def test_default_corpus_is_capped_sorted_stdlib_without_tests():
    files = data.default_corpus_files(max_bytes=3_000_000)
    assert files == data.default_corpus_files(max_bytes=3_000_000)
    assert files and sum(f.stat().st_size for f in files) <= 3_000_000
    assert all(f.suffix == ".py" for f in files)
    for f in files:
        assert not {"test", "tests", "idlelib", "site-packages"} & set(f.parts[:-1])
    assert "os.py" in {f.name for f in data.default_corpus_files()}
    with pytest.raises(ValueError, match="`max_bytes`"):
        data.default_corpus_files(max_bytes=0)


def test_build_tokens_cli(tmp_path, capsys):
    _corpus(tmp_path / "src")
    meta = build_tokens.main(["--out", str(tmp_path / "out"), "--src", str(tmp_path / "src")])
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    assert f"{meta['num_tokens']['train']:,}" in out
    assert (tmp_path / "out" / "train.bin").exists()


def test_build_tokens_cli_on_a_small_stdlib_corpus(tmp_path, capsys):
    meta = build_tokens.main(["--out", str(tmp_path / "out"), "--max-mb", "0.3"])
    assert "stdlib" in capsys.readouterr().out
    assert 0 < sum(meta["num_tokens"].values()) <= 300_000 + 2 * sum(meta["num_files"].values())


# --------------------------------------------------------------------------- pipeline


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


TOKENS = np.arange(2001, dtype=np.uint16)  # token value == its position


def test_batches_are_windows_of_the_token_array():
    seq_len, batch = 16, 8
    batches = _take(data.make_train_iter(TOKENS, seq_len=seq_len, global_batch=batch, seed=0), 3)
    for b in batches:
        assert b.shape == (batch, seq_len + 1) and b.dtype == np.int32
        starts = b[:, 0]
        assert np.all(starts % seq_len == 0)
        np.testing.assert_array_equal(b, starts[:, None] + np.arange(seq_len + 1))


def test_one_epoch_visits_every_window_once():
    seq_len = 10
    num_windows = (len(TOKENS) - 1) // seq_len  # 200
    it = data.make_train_iter(TOKENS, seq_len=seq_len, global_batch=20, seed=5)
    starts = np.concatenate([b[:, 0] for b in _take(it, num_windows // 20)])
    np.testing.assert_array_equal(np.sort(starts), np.arange(num_windows) * seq_len)
    assert not np.array_equal(starts, np.sort(starts))  # shuffled


def test_pipeline_is_deterministic_by_seed():
    kw = dict(seq_len=16, global_batch=4)
    a = _take(data.make_train_iter(TOKENS, seed=1, **kw), 5)
    b = _take(data.make_train_iter(TOKENS, seed=1, **kw), 5)
    c = _take(data.make_train_iter(TOKENS, seed=2, **kw), 5)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("skip", [0, 3, 30])
def test_get_state_set_state_reproduce_the_next_batches(skip):
    kw = dict(seq_len=16, global_batch=8, seed=0)
    it = data.make_train_iter(TOKENS, **kw)
    _take(it, skip)  # 30 steps cross the epoch boundary (125 windows / 8 per batch)
    state = it.get_state()
    json.dumps(state)  # small and JSON-able: it goes into checkpoints
    expected = _take(it, 6)

    it.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(it, 6)), np.stack(expected))
    fresh = data.make_train_iter(TOKENS, **kw)  # as after a restart
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(fresh, 6)), np.stack(expected))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(process_count):
    kw = dict(seq_len=8, global_batch=8, seed=7)
    global_batches = _take(data.make_train_iter(TOKENS, **kw), 40)  # > one epoch
    shards = [
        _take(
            data.make_train_iter(TOKENS, process_index=p, process_count=process_count, **kw),
            40,
        )
        for p in range(process_count)
    ]
    for step, expected in enumerate(global_batches):
        local = [shards[p][step] for p in range(process_count)]
        assert all(x.shape == (8 // process_count, 9) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), expected)


def test_pipeline_reads_a_token_file_memmap(tmp_path):
    data.write_tokens(tmp_path / "t.bin", TOKENS)
    tokens = data.load_tokens(tmp_path / "t.bin")
    it = data.make_train_iter(tokens, seq_len=16, global_batch=2, seed=0)
    ref = data.make_train_iter(TOKENS, seq_len=16, global_batch=2, seed=0)
    np.testing.assert_array_equal(np.stack(_take(it, 3)), np.stack(_take(ref, 3)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch=6, process_count=4), "`global_batch`.*divisible.*`process_count`"),
        (dict(process_index=2, process_count=2), "`process_index`"),
        (dict(process_index=-1), "`process_index`"),
        (dict(seq_len=0), "`seq_len`"),
        (dict(global_batch=0), "`global_batch`"),
        (dict(process_count=0), "`process_count`"),
        (dict(seq_len=2001), "`tokens`.*shorter than one window"),
        (dict(seed=1.5), "`seed`"),
        (dict(tokens=np.zeros((4, 4), np.uint16)), "`tokens`.*1-D"),
    ],
)
def test_make_train_iter_rejects_bad_inputs(kwargs, match):
    args = dict(tokens=TOKENS, seq_len=16, global_batch=8, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        data.make_train_iter(args.pop("tokens"), **args)


def test_eval_batches_are_the_first_windows_in_order():
    batches = data.make_eval_batches(TOKENS, seq_len=16, batch=4, num_batches=3)
    assert len(batches) == 3
    rows = np.concatenate(batches)
    assert rows.dtype == np.int32 and rows.shape == (12, 17)
    np.testing.assert_array_equal(rows, np.arange(12)[:, None] * 16 + np.arange(17))
    again = data.make_eval_batches(TOKENS, seq_len=16, batch=4, num_batches=3)
    np.testing.assert_array_equal(np.stack(again), np.stack(batches))
    with pytest.raises(ValueError, match="`num_batches`.*at most 31"):
        data.make_eval_batches(TOKENS, seq_len=16, batch=4, num_batches=32)
    with pytest.raises(ValueError, match="`batch`"):
        data.make_eval_batches(TOKENS, seq_len=16, batch=0, num_batches=1)
    with pytest.raises(ValueError, match="`tokens`"):
        data.make_eval_batches(TOKENS[:10], seq_len=16, batch=1, num_batches=1)


def test_docstring_examples_run():
    result = doctest.testmod(data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
