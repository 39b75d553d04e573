"""The command line: one meaning per flag, old spellings kept, options a run would ignore refused."""

from __future__ import annotations

import json
import os

import pytest

from dha.cli import build_parser, main
from tests.test_train import text_file, tiny_source

REPORTING_VERBS = ("inspect", "analyze", "convert", "train", "eval", "export", "generate", "bench")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    return tmp_path, tiny_source(str(tmp_path / "src")), text_file(str(tmp_path / "data.txt"))


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_reporting_verb_has_json_and_device():
    for verb in REPORTING_VERBS:
        sub = build_parser()._subparsers._group_actions[0].choices[verb]
        flags = {o for a in sub._actions for o in a.option_strings}
        assert {"--json", "--device"} <= flags, verb


def test_block_size_flags_mean_one_thing_and_old_spellings_still_work(capsys):
    assert parse("analyze", "--out", "x", "--calib-block-size", "32").calib_block_size == 32
    assert parse("analyze", "--out", "x", "--block-size", "32").calib_block_size == 32  # the old spelling
    assert "--calib-block-size" in capsys.readouterr().err  # ... says what it is called now
    assert parse("eval", "--block-size", "64").eval_block_size == 64
    assert parse("eval").eval_block_size == 512
    args = parse("convert", "--out", "x", "--block-size", "16", "--calib-block-size", "8")
    assert (args.block_size, args.calib_block_size) == (16, 8)  # training rows, calibration blocks


def test_dtype_is_the_load_dtype_and_train_dtype_the_autocast_one(capsys):
    assert parse("train", "--tokens", "64", "--train-dtype", "bfloat16").train_dtype == "bfloat16"
    assert parse("train", "--tokens", "64", "--dtype", "float32").train_dtype == "float32"  # the old spelling
    assert "--train-dtype" in capsys.readouterr().err
    args = parse("convert", "--out", "x", "--dtype", "bfloat16", "--train-dtype", "float32")
    assert (args.dtype, args.train_dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--out", "x", "--dtype", "fp64"],
        ["convert", "--out", "x", "--grouping", "random"],
        ["eval", "--dtype", "int8"],
        ["train", "--tokens", "1", "--train-dtype", "fp8"],
        ["analyze", "--out", "x", "--metric", "l2"],
    ],
)
def test_enum_flags_have_choices(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--method", "gqa", "--calib-tokens", "64"],
            "--calib-tokens is about calibration text, which gqa does not read",
        ),
        (["--method", "svd", "--search", "learned"], "--search is a --method dha option"),
        (["--method", "gqa-similar", "--grouping", "similar"], "--grouping is an svd option"),
        (["--method", "svd", "--metric", "cosine"], "--metric is used by gqa-similar and svd --grouping similar only"),
        (["--method", "prune", "--lr", "1e-3"], "--lr is about training: give --tokens N as well"),
        (["--method", "dha", "--batch-tokens", "64", "--tokens", "0"], "--batch-tokens is about training"),
        (["--method", "svd", "--free-pairs", "2"], "--free-pairs is a --method dha option"),
        (
            [
                "--method",
                "dha",
                "--free-pairs",
                "2",
                "--tokens",
                "64",
                "--fusion-fraction",
                "0.5",
                "--batch-tokens",
                "16",
                "--block-size",
                "8",
            ],
            "--free-pairs needs the merge at once (--fusion-fraction 0)",
        ),
        (["--method", "dha", "--free-pairs", "-1"], "--free-pairs must be >= 0"),
        (["--method", "mean"], "unknown method 'mean'; choose from gqa, gqa-similar, svd, prune, dha"),
        (["--method", "svd", "--block-size", "16"], "--block-size is the training row length: give --tokens N as well"),
        (["--method", "dha", "--metric", "cka"], "--metric (cka | cosine) is a baselines option"),
        (
            ["--method", "dha", "--plan", "p.json", "--layout", "serving"],
            "--layout shapes the search, which --plan replaces",
        ),
        (
            ["--method", "dha", "--plan", "p.json", "--search", "learned"],
            "--search shapes the search, which --plan replaces",
        ),
        (
            ["--method", "dha", "--plan", "p.json", "--retrieval-heads", "3"],
            "--retrieval-heads shapes the search, which --plan",
        ),
        (["--method", "dha", "--free-pairs", "99"], "position-free pairs must be between 0 and"),
    ],
)
def test_options_a_conversion_would_ignore_are_refused(workspace, capsys, extra, message):
    tmp_path, src, data = workspace
    out = tmp_path / "o"
    argv = ["convert", src, "--kv-budget", "0.5", *extra, "--out", str(out)]
    if "--method" in extra and extra[1] != "gqa":
        argv += ["--data", data]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_options_a_conversion_uses_are_accepted(workspace, capsys):
    tmp_path, src, data = workspace
    assert (
        main(["convert", src, "--method", "gqa", "--kv-budget", "0.5", "--out", str(tmp_path / "gqa"), "--json"]) == 0
    )
    plan = str(tmp_path / "gqa" / "plan.json")
    for name, extra in {
        "svd": [
            "--method",
            "svd",
            "--grouping",
            "similar",
            "--metric",
            "cosine",
            "--data",
            data,
            "--calib-tokens",
            "64",
            "--calib-block-size",
            "16",
        ],
        "plan": [
            "--method",
            "dha",
            "--plan",
            plan,
            "--data",
            data,
            "--calib-tokens",
            "64",
            "--calib-block-size",
            "16",
            "--merge-metric",
            "plain",
            "--free-pairs",
            "0",
        ],
    }.items():
        assert main(["convert", src, "--kv-budget", "0.5", *extra, "--out", str(tmp_path / name), "--json"]) == 0
    capsys.readouterr()


def test_train_heldout_fraction_and_its_report(workspace, capsys):
    tmp_path, src, data = workspace
    out = tmp_path / "t"
    assert (
        main(
            [
                "train",
                src,
                "--data",
                data,
                "--tokens",
                "64",
                "--block-size",
                "16",
                "--batch-tokens",
                "32",
                "--heldout-fraction",
                "0.3",
                "--eval-every",
                "0",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("trained 2 steps") and json.loads(lines[-1])["steps"] == 2
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["run"]["heldout_fraction"] == 0.3
    assert (
        main(
            [
                "train",
                src,
                "--data",
                data,
                "--tokens",
                "64",
                "--heldout-fraction",
                "1.5",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "--heldout-fraction must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--out", "x", "--calib-tok", "100"],
        ["eval", "--long-ctx", "4096"],
        ["train", "--tokens", "64", "--batch-tok", "32"],
    ],
)
def test_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_help_imports_no_torch():
    """`dha --help` and a verb's --help build every parser without torch (measured: about 0.15 s)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\nfrom dha.cli import main\n"
        "for argv in (['--help'], ['convert', '--help'], ['train', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n        main(argv)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
