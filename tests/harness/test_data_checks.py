"""Token files are verified before a run trains on them: dtype, length, content hash and the
largest id against the vocabulary; a resume on other data is refused."""

import json
import shutil

import numpy as np
import pytest
from harness_support import reference_run, smoke, token_dir

from stackops_harness import data
from stackops_harness.checkpoint import CheckpointMismatchError
from stackops_harness.data import TokenDataError
from stackops_harness.trainer import train


def _dir(tmp_path, train_ids, val_ids=None, meta=True, vocab=256):
    d = tmp_path / "tokens"
    d.mkdir(exist_ok=True)
    val_ids = np.arange(300) % 200 if val_ids is None else val_ids
    data.write_tokens(d / "train.bin", train_ids)
    data.write_tokens(d / "val.bin", val_ids)
    if meta:
        data.write_token_meta(d, vocab_size=vocab)
    return d


def test_meta_json_records_and_open_token_dir_checks_every_file(tmp_path):
    ids = np.random.default_rng(0).integers(0, 256, 1000)
    d = _dir(tmp_path, ids)
    meta = json.loads((d / "meta.json").read_text())
    info = meta["token_files"]["train.bin"]
    assert (meta["dtype"], meta["vocab_size"]) == ("uint16", 256)
    assert (info["length"], info["max_id"]) == (1000, int(ids.max()))
    train_toks, _, described = data.open_token_dir(d, vocab_size=256)
    np.testing.assert_array_equal(train_toks, ids)
    assert described["train"] == {"length": 1000, "sha256": info["sha256"]}
    # The same length, one token changed: the hash catches it.
    changed = ids.copy()
    changed[500] = (changed[500] + 1) % 256
    data.write_tokens(d / "train.bin", changed)
    with pytest.raises(TokenDataError, match=r"train.bin does not match .*sha256.*write_token"):
        data.open_token_dir(d, vocab_size=256)
    data.write_tokens(d / "train.bin", ids[:900])
    with pytest.raises(TokenDataError, match="length is 900, meta.json records 1000"):
        data.open_token_dir(d, vocab_size=256)


def test_files_written_with_the_wrong_dtype_get_the_right_advice(tmp_path):
    ids = np.random.default_rng(1).integers(1, 256, 1000)
    d = tmp_path / "t"
    d.mkdir()
    # int32 ids: every second uint16 is 0 (and every id is "valid"): it trained silently.
    ids.astype(np.int32).tofile(d / "train.bin")
    data.write_tokens(d / "val.bin", ids)
    with pytest.raises(TokenDataError, match=r"int32.*np.fromfile\(path, np.int32\)"):
        data.open_token_dir(d, vocab_size=256)
    # uint8 ids: the uint16 view holds ids up to 65535; the advice is not "raise vocab_size".
    ids.astype(np.uint8).tofile(d / "train.bin")
    with pytest.raises(TokenDataError, match=r"uint8 ids.*np.fromfile\(path, np.uint8\)"):
        data.open_token_dir(d, vocab_size=256)
    # A meta.json that says another dtype.
    data.write_tokens(d / "train.bin", ids)
    (d / "meta.json").write_text(json.dumps({"dtype": "int32", "vocab_size": 256}))
    with pytest.raises(TokenDataError, match="hold int32 ids"):
        data.open_token_dir(d, vocab_size=256)


def test_ids_beyond_the_vocabulary_are_refused_whatever_meta_json_says(tmp_path):
    d = _dir(tmp_path, np.arange(1000) % 300, meta=False)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 256}))
    with pytest.raises(TokenDataError, match="token id 299, but TrainConfig.vocab_size=256"):
        data.open_token_dir(d, vocab_size=256)
    with pytest.raises(TokenDataError, match="token id 299, not below `vocab_size`=256"):
        data.write_token_meta(d, vocab_size=256)
    meta = data.write_token_meta(d, vocab_size=300)
    assert meta["vocab_size"] == 300
    with pytest.raises(TokenDataError, match="vocabulary of 300 .*set vocab_size=300"):
        data.open_token_dir(d, vocab_size=256)


def test_a_resume_on_other_token_files_of_the_same_size_is_refused(tmp_path):
    result, _ = reference_run()
    run_dir = tmp_path / "copy"
    shutil.copytree(result.run_dir, run_dir, ignore=shutil.ignore_patterns("lock"))
    other = tmp_path / "other"
    shutil.copytree(token_dir(), other)
    ids = np.array(data.load_tokens(other / "train.bin"))
    ids[:2] = ids[1::-1]  # the same tokens, two swapped: same length, same ids
    data.write_tokens(other / "train.bin", ids)
    data.write_token_meta(other, vocab_size=256)
    with pytest.raises(CheckpointMismatchError, match=r"other token files: train differ.*data_dir"):
        train(smoke(data_dir=str(other)), run_dir)
    # The same files in another place: data_dir may change.
    moved = tmp_path / "moved"
    shutil.copytree(token_dir(), moved)
    train(smoke(data_dir=str(moved)), run_dir)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--max-mb", "0"], "--max-mb"),
        (["--src", "/nonexistent/dir"], "--src"),
    ],
)
def test_build_tokens_flags_are_one_line_errors(tmp_path, capsys, extra, flag):
    from stackops_harness.cli import build_tokens

    with pytest.raises(SystemExit) as exit_info:
        build_tokens.main(["--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        build_tokens.main(["--out", str(a_file)])
    assert "--out" in capsys.readouterr().err
