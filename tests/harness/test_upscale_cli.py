"""The upscale program: operators from text (and nothing else), mergekit configs, outputs."""

from __future__ import annotations

import json

import jax
import pytest

import stackops as so
from stackops.models import DecoderLM, LMConfig, from_hf, to_hf
from stackops_harness.cli import bench_upscale, upscale


@pytest.fixture
def src(tmp_path):
    cfg = LMConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=4, d_ff=32, mlp="swiglu")
    to_hf(DecoderLM(cfg, key=jax.random.key(0)), tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    return tmp_path / "src"


def test_parse_op_builds_operators_and_evaluates_nothing_else():
    assert upscale.parse_op("so.llama_pro(every=4)") == so.llama_pro(every=4)
    assert upscale.parse_op("layer_map([0, 0, 1])").plan(2).sources() == (0, 0, 1)
    for bad, match in [
        ("__import__('os').system('true')", "unknown operator"),
        ("solar(drop=open('x'))", "unknown operator"),
        ("solar(drop=2 if True else 1)", "literals"),
        ("solar", "operator call"),
        ("solar(", "not an expression"),
    ]:
        with pytest.raises(ValueError, match=match):
            upscale.parse_op(bad)


def test_upscale_writes_the_grown_checkpoint_provenance_and_mergekit_config(src, tmp_path, capsys):
    out = tmp_path / "out"
    rc = upscale.main([str(src), str(out), "--op", "solar(drop=1)", "--no-progress",
                       "--write-mergekit", str(tmp_path / "mk.json")])
    assert rc == 0
    assert from_hf(out).depth == 6
    assert (out / "tokenizer.json").is_file()
    rec = json.loads((out / "stackops_provenance.json").read_text())
    assert rec["operator"] == "solar(drop=1)" and rec["inserted"] == [3, 4]
    mk = json.loads((tmp_path / "mk.json").read_text())
    assert so.from_mergekit(mk).plan(4).sources() == so.solar(drop=1).plan(4).sources()
    assert "4 -> 6 layers" in capsys.readouterr().out
    # The mergekit config it wrote rebuilds the same plan through --mergekit.
    pytest.importorskip("yaml")
    import yaml

    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    rc = upscale.main([str(src), str(tmp_path / "out2"), "--mergekit", str(tmp_path / "mk.yml"),
                       "--no-progress"])
    assert rc == 0 and from_hf(tmp_path / "out2").depth == 6


def test_upscale_reports_bad_input_without_writing(src, tmp_path, capsys):
    assert upscale.main([str(tmp_path / "nope"), str(tmp_path / "o"), "--op", "gstack(2)"]) == 2
    assert "not a local directory" in capsys.readouterr().err
    assert upscale.main([str(src), str(tmp_path / "o"), "--op", "solar(drop=9)"]) == 2
    assert "drop=9" in capsys.readouterr().err
    assert upscale.main([str(src), str(tmp_path / "o"), "--op", "interpolate(block=1)",
                         "--write-mergekit", str(tmp_path / "m.yml")]) == 2
    assert "mix" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert upscale.main([str(src), str(tmp_path / "o"), "--op", "gstack(2)", "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()


def test_bench_checkpoint_has_the_requested_size_and_loads(tmp_path):
    shape = bench_upscale.llama_shape(2_000_000)
    n = bench_upscale.write_checkpoint(tmp_path / "ck", shape, "bfloat16", seed=0)
    model = from_hf(tmp_path / "ck")
    count = sum(x.size for x in jax.tree.leaves(model))
    assert count == bench_upscale.count_params(shape) and n == 2 * count
