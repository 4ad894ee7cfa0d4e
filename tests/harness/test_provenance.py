"""Provenance: the source commit and dirty flag, package versions, host and devices, and
the `config.json` that records them still loading as a config."""

import json
import shutil
import subprocess

import jax
import pytest

from stackops_harness.config import config_from_dict, config_to_dict, preset
from stackops_harness.provenance import git_state, package_versions, provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@needs_git
def test_git_state_gives_the_commit_and_whether_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked files do not make it dirty\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


@needs_git
def test_git_state_is_none_outside_the_top_of_a_checkout(tmp_path):
    assert git_state(tmp_path) is None  # not a repository
    _git(tmp_path, "init", "-q")
    assert git_state(tmp_path) is None  # a repository without commits
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "sub/a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    assert git_state(tmp_path) is not None
    # Inside some other repository (an install in a project's .venv): not our commit.
    assert git_state(tmp_path / "sub") is None


def test_git_state_never_fails_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert git_state() is None
    assert provenance(devices=False)["git"] is None


def test_package_versions_and_provenance_are_json_ready():
    assert package_versions(("jax", "no-such-distribution-xyz")) == {
        "jax": jax.__version__,
        "no-such-distribution-xyz": None,
    }
    info = json.loads(json.dumps(provenance()))
    assert set(info["packages"]) == {"stackops", "jax", "jaxlib", "equinox", "optax"}
    assert info["device_kind"] == jax.devices()[0].device_kind
    assert info["backend"] == jax.default_backend()
    assert info["python"].count(".") == 2 and info["hostname"]
    assert "device_kind" not in provenance(devices=False)


def test_a_config_json_with_provenance_loads_as_its_config():
    cfg = preset("smoke")
    saved = json.loads(json.dumps({**config_to_dict(cfg), "provenance": provenance()}))
    assert config_from_dict(saved) == cfg
    with pytest.raises(ValueError, match="provenanse"):  # other unknown keys still raise
        config_from_dict({**config_to_dict(cfg), "provenanse": {}})
