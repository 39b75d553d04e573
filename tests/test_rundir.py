"""The run directory's one set of rules (dha.rundir), and the verbs that train keeping to them."""

from __future__ import annotations

import json
import os

import pytest

from dha import rundir
from dha.atomic import check_out, is_empty
from dha.cli import main
from dha.errors import UserError
from tests.test_train import text_file, tiny_source

IDENTITY = {"format": "test-run/1", "run": {"source": "/m", "data": "/d"}, "config": {"lr": 1e-3, "eval_every": 5}}


def write_run(out, identity=IDENTITY, extra=()):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(identity, f)
    for name in extra:
        open(os.path.join(out, name), "w").close()


def test_differences_name_each_setting_skip_resumable_ones_and_read_added_ones_as_their_old_value():
    moved = {**IDENTITY, "config": {"lr": 2e-3, "eval_every": 9}, "run": {"source": "/m", "data": "/other"}}
    assert rundir.differences(IDENTITY, moved) == ["config.eval_every", "config.lr", "run.data"]
    assert rundir.differences(IDENTITY, moved, resumable={"config.eval_every"}) == ["config.lr", "run.data"]
    newer = {**IDENTITY, "config": {**IDENTITY["config"], "rows": 256}}  # a setting added since IDENTITY was written
    assert rundir.differences(IDENTITY, newer) == ["config.rows"]
    assert rundir.differences(IDENTITY, newer, added={"config.rows": 256}) == []
    assert rundir.differences(IDENTITY, {**IDENTITY, "format": "other/1"}) == ["format"]


def test_check_starts_in_a_missing_or_empty_dir_and_resumes_only_the_same_unfinished_run(tmp_path):
    out = str(tmp_path / "o")
    assert rundir.check(out, IDENTITY, resume=False) is False  # missing
    os.makedirs(out)
    open(os.path.join(out, ".lock"), "w").close()
    assert rundir.check(out, IDENTITY, resume=False) is False  # a lock alone: empty
    assert rundir.check(out, IDENTITY, resume=True) is False  # killed before run.json: starts anew
    write_run(out)
    assert rundir.check(out, IDENTITY, resume=True) is True
    refusals = {
        "already holds this run: pass --resume": dict(identity=IDENTITY, resume=False),
        "holds a different run (differs in config.lr)": dict(
            identity={**IDENTITY, "config": {"lr": 1, "eval_every": 5}}, resume=True
        ),
        "holds a run of another kind (test-run/1, not other/1)": dict(
            identity={**IDENTITY, "format": "other/1"}, resume=True
        ),
    }
    for message, kw in refusals.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            rundir.check(out, **kw)
    open(os.path.join(out, "model.safetensors"), "w").close()
    with pytest.raises(UserError, match="holds a finished run"):
        rundir.check(out, IDENTITY, resume=True, finished="model.safetensors")


def test_check_refuses_a_stranger_dir_a_file_and_a_missing_resume(tmp_path):
    stranger = tmp_path / "s"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no dha run"):
        rundir.check(str(stranger), IDENTITY, resume=True)
    with pytest.raises(UserError, match="exists and is not a directory"):
        rundir.check(str(stranger / "notes.txt"), IDENTITY, resume=False)
    with pytest.raises(UserError, match="no such run directory"):
        rundir.check(str(tmp_path / "none"), IDENTITY, resume=True)
    assert not is_empty(str(stranger / "notes.txt"))  # a file is no empty output directory
    with pytest.raises(UserError, match="already exists and is not empty"):
        check_out(str(stranger / "notes.txt"))
    with pytest.raises(UserError, match="not empty and holds no dha run"):
        with rundir.hold(str(stranger / "notes.txt"), main=True):
            pass


def test_a_users_file_that_looks_like_a_leftover_is_not_one(tmp_path):
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "notes.tmp-2024").write_text("keep")  # not hidden: no writer of dha names a file so
    assert not is_empty(str(mine))
    with pytest.raises(UserError, match="not empty and holds no dha run"):
        with rundir.hold(str(mine), main=True):
            pass
    assert (mine / "notes.tmp-2024").read_text() == "keep"
    (mine / "notes.tmp-2024").unlink()
    (mine / ".model.safetensors.tmp-x1y2").write_text("")  # what a killed atomic writer leaves
    assert is_empty(str(mine))


def test_resume_path_is_out_or_inside_it(tmp_path):
    out = str(tmp_path / "o")
    assert rundir.resume_path(out, None) == out
    assert rundir.resume_path(None, out) == out
    assert rundir.resume_path(out, os.path.join(out, "checkpoints", "step_00000002.pt")) == out
    with pytest.raises(UserError, match="a run resumes in its own directory"):
        rundir.resume_path(out, str(tmp_path / "elsewhere"))
    checkpoint = tmp_path / "o" / "checkpoints" / "step_00000002.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    for inside in (checkpoint, checkpoint.parent):  # without --out, the run's directory must be named
        with pytest.raises(UserError, match="give the run's directory, or --out DIR"):
            rundir.resume_path(None, str(inside))


def test_hold_is_one_run_at_a_time_and_a_failed_new_run_leaves_nothing(tmp_path):
    out = str(tmp_path / "o")
    with rundir.hold(out, main=True):
        with pytest.raises(UserError, match="in use by another dha run"):
            with rundir.hold(out, main=True):
                pass
    with pytest.raises(UserError, match="bad"):
        with rundir.hold(out, main=True):
            write_run(out)
            raise UserError("bad")
    assert os.listdir(out) == [".lock"]  # it found the directory empty: emptied
    new = str(tmp_path / "n")
    with pytest.raises(UserError, match="bad"):
        with rundir.hold(new, main=True):
            write_run(new)
            raise UserError("bad")
    assert not os.path.exists(new)  # it made the directory: gone
    kept = tmp_path / "k"
    write_run(str(kept), extra=["model.safetensors"])
    with pytest.raises(UserError):
        with rundir.hold(str(kept), main=True):
            raise UserError("bad")
    assert sorted(os.listdir(kept)) == [".lock", "model.safetensors", "run.json"]  # a run it did not start: untouched


def test_dha_train_takes_the_lock_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source, data = tiny_source(str(tmp_path / "src")), text_file(str(tmp_path / "data.txt"))
    out = str(tmp_path / "run")
    argv = [
        "train",
        source,
        "--data",
        data,
        "--tokens",
        "64",
        "--block-size",
        "16",
        "--batch-tokens",
        "32",
        "--eval-every",
        "0",
        "--no-progress",
        "--out",
        out,
    ]
    with rundir.hold(out, main=True):  # another run holds --out
        assert main(argv) == 2
    assert "in use by another dha run" in capsys.readouterr().err
    assert main(argv) == 0
