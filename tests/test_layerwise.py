"""Layer-by-layer calibration (dha.layerwise) against the whole-model pass written here.

The reference is one forward pass of the whole model with hooks on every query, key and value
projection, the summed next-token loss, and torch.autograd.grad at the key and value outputs: what
calibration did before it went layer by layer. Tiny random models of several families (learned
positions, partial rotary, parallel residual, a sliding window, biases, untied heads), fp32 on the
CPU; the output matrix is cut into chunks of 10 rows so the chunked loss gradient is exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import dha.layerwise
from dha.analyze import collect_heads
from dha.calibration import Calibration, calibrate, layer_stats
from dha.merge import aligned_merge, closed_form_merges
from dha.options import TrainConfig
from dha.search import SearchOptions, search
from dha.train import train
from tests.conftest import ours_from_hf, random_ids
from tests.test_families import CASES

FAMILY_CASES = ["llama", "gpt2-untied-gelu", "phi-gqa", "qwen2-sliding"]
ATOL = 1e-5


def whole_model_reference(model, blocks: torch.Tensor, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Per layer the heads' outputs {"queries", "keys", "values"} (N, n, hd) and the gradients of the
    summed next-token loss at the key and value outputs, from whole-model passes."""
    hd, L = model.config.head_dim, model.config.num_layers
    acts = [{"queries": [], "keys": [], "values": []} for _ in range(L)]
    grads = [{"keys": [], "values": []} for _ in range(L)]
    live = []
    handles = [
        getattr(b.attn, proj).register_forward_hook(lambda m, a, out, l=l, name=name: live.append((l, name, out)))
        for l, b in enumerate(model.layers)
        for proj, name in (("q_proj", "queries"), ("k_proj", "keys"), ("v_proj", "values"))
    ]
    try:
        for start in range(0, blocks.shape[0], batch_size):
            x = blocks[start : start + batch_size]
            live.clear()
            with torch.enable_grad():
                logits = model(x)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
                outs = iter(torch.autograd.grad(loss, [t for _, name, t in live if name != "queries"]))
            for l, name, t in live:
                flat = t.detach().reshape(-1, t.shape[-1] // hd, hd).float()
                acts[l][name].append(flat)
                if name != "queries":
                    grads[l][name].append(next(outs).reshape(flat.shape).float())
    finally:
        for h in handles:
            h.remove()
    cat = lambda parts: [{k: torch.cat(v) for k, v in d.items()} for d in parts]  # noqa: E731
    return cat(acts), cat(grads)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 10 vocabulary rows a chunk (fp32; hidden 48 > the <= 30 predicted tokens of a batch of 2 x 16)
    monkeypatch.setattr(dha.layerwise, "LM_HEAD_CHUNK_BYTES", 10 * 48 * 4)


def assert_scaled_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| <= ATOL * max|want| everywhere (the tensors here range from 1e-4 to 1e2)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel():
        assert_close(got, want, atol=ATOL * max(float(want.abs().max()), 1e-30), rtol=0)


STAT_FIELDS = ("key_pair_gram", "key_scale", "key_pass_gram", "key_pass_metric", "value_gram", "value_metric")


def assert_calibration_matches(cal, model, acts, grads, metric="weighted"):
    for l in range(model.config.num_layers):
        want = layer_stats(model, l, acts[l], metric)
        for field in STAT_FIELDS:
            assert_scaled_close(getattr(cal.stats[l], field), getattr(want, field))
        for kind in ("keys", "values"):
            assert_scaled_close(cal.acts[l][kind], acts[l][kind])
            if grads is not None:
                assert_scaled_close(cal.grads[l][kind], grads[l][kind])


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_layerwise_calibration_search_and_merge_equal_the_whole_model_pass(name):
    """Statistics, gradients, the searched plan and the merged model's weights (fp32, atol 1e-5)."""
    model = ours_from_hf(CASES[name]())
    blocks = random_ids(5, 16)
    acts, grads = whole_model_reference(model, blocks, batch_size=2)
    cal = calibrate(model, blocks, batch_size=2, gradients=True, device="cpu")
    assert_calibration_matches(cal, model, acts, grads)

    stats = [layer_stats(model, l, a, "weighted") for l, a in enumerate(acts)]
    reference = Calibration([{k: a[k] for k in ("keys", "values")} for a in acts], grads, stats, "weighted", 0)
    plan = search(model, 0.5, blocks, SearchOptions(), calibration=cal)
    want_plan = search(model, 0.5, blocks, SearchOptions(), calibration=reference)
    assert plan.layers == want_plan.layers
    for got, want in zip(plan.notes["loss_increase"]["value"], want_plan.notes["loss_increase"]["value"]):
        assert_close(torch.tensor(got), torch.tensor(want), atol=ATOL * max(map(abs, want)), rtol=0)
    merged = aligned_merge(model, plan.layers, closed_form_merges(cal.stats, plan.layers)).state_dict()
    want_merged = aligned_merge(model, plan.layers, closed_form_merges(stats, plan.layers)).state_dict()
    assert merged.keys() == want_merged.keys()
    for k in merged:
        assert_close(merged[k], want_merged[k], atol=ATOL, rtol=0)


def test_collect_heads_equals_the_whole_model_pass_and_subsamples_its_tokens():
    model = ours_from_hf(CASES["llama"]())
    blocks = random_ids(3, 16, seed=2)
    acts, _ = whole_model_reference(model, blocks, batch_size=2)
    got = collect_heads(model, blocks, batch_size=2, device="cpu")
    sub = collect_heads(model, blocks, batch_size=2, max_tokens=11, seed=3, device="cpu")
    keep = torch.randperm(48, generator=torch.Generator().manual_seed(3))[:11].sort().values
    for l in range(2):
        for name in ("queries", "keys", "values"):
            assert_scaled_close(got[l][name], acts[l][name])
            assert_scaled_close(sub[l][name], acts[l][name][keep])


def test_bf16_weights_are_calibrated_in_fp32():
    """A bf16 model stays bf16 (nothing copied or changed) and its layers run in fp32: the statistics
    are the fp32 whole-model pass of the same (bf16-rounded) weights, not a bf16 pass."""
    model = ours_from_hf(CASES["llama"]()).to(torch.bfloat16)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    blocks = random_ids(4, 16, seed=1)
    cal = calibrate(model, blocks, batch_size=2, gradients=True, device="cpu")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])
    assert all(p.grad is None for p in model.parameters())
    fp32 = ours_from_hf(CASES["llama"]()).to(torch.bfloat16).float()
    acts, grads = whole_model_reference(fp32, blocks, batch_size=2)
    assert_calibration_matches(cal, fp32, acts, grads)


def test_aligned_merge_shares_all_but_attention_and_training_leaves_the_source_alone():
    """No second copy of the model: the merge holds new q/k/v/o tensors only. Training the merged
    model (here with the source as its teacher) gives it its own copies first."""
    source = ours_from_hf(CASES["llama"]())
    blocks = random_ids(4, 16)
    cal = calibrate(source, blocks, device="cpu")
    plan = search(source, 0.5, blocks, SearchOptions(sensitivity=False), calibration=cal)
    merged = aligned_merge(source, plan.layers, closed_form_merges(cal.stats, plan.layers))
    ours, theirs = merged.state_dict(), source.state_dict()
    for k in theirs:
        attention = any(f".attn.{p}_proj." in k for p in "qkv") or k.endswith("o_proj.weight")  # o_proj's bias stays
        assert (ours[k].data_ptr() == theirs[k].data_ptr()) != attention, k
    frozen = {k: v.clone() for k, v in theirs.items()}
    cfg = TrainConfig(
        tokens=2 * 4 * 16,
        block_size=16,
        batch_tokens=64,
        micro_batch=4,
        lr=1e-2,
        warmup_steps=0,
        eval_every=0,
        distill=True,
        device="cpu",
        dtype="float32",
    )
    result = train(merged, random_ids(8, 17, seed=5).flatten(), None, cfg, teacher=source, progress=False)
    for k, v in source.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(result.model.layers[0].mlp.up_proj.weight, frozen["layers.0.mlp.up_proj.weight"])


def test_convert_without_training_keeps_a_bf16_source_in_bf16(tmp_path, capsys):
    """`dha convert --method dha --tokens 0` and `--method svd` load a bf16 checkpoint as bf16 (no
    float32 copy of the model) and write a bf16 checkpoint at the budget."""
    from dha.checkpoint import load
    from dha.cli import main
    from tests.conftest import save_tiny_source, text_file, tiny_llama_hf

    src = save_tiny_source(str(tmp_path / "src"), ours_from_hf(tiny_llama_hf(vocab_size=40)).to(torch.bfloat16))
    data = text_file(str(tmp_path / "d.txt"))
    for method in ("dha", "svd"):
        out = tmp_path / method
        assert (
            main(
                [
                    "convert",
                    src,
                    "--method",
                    method,
                    "--kv-budget",
                    "0.5",
                    "--data",
                    data,
                    "--tokens",
                    "0",
                    "--calib-tokens",
                    "256",
                    "--calib-block-size",
                    "32",
                    "--out",
                    str(out),
                    "--json",
                ]
            )
            == 0
        )
        model = load(str(out), tokenizer=False).model
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        cfg = model.config
        assert sum(cfg.key_heads(l) + cfg.value_heads(l) for l in range(cfg.num_layers)) == 12
    capsys.readouterr()


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_layerwise_perplexity_equals_the_whole_model_pass(name):
    """`nll_sum` (a forward sweep, then the output matrix in chunks of 10 rows) against the summed
    next-token loss of a whole-model pass written here: F.cross_entropy on the model's logits (fp32,
    relative 1e-6). (`dha.evaluate.perplexity` takes this path for a device other than the model's
    own: on a GPU, tests/test_cuda.py.)"""
    model = ours_from_hf(CASES[name]())
    windows = random_ids(5, 16, seed=4)
    with torch.no_grad():
        logits = model(windows)
        want = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
    assert dha.layerwise.nll_sum(model, windows, batch_size=2, device="cpu") == pytest.approx(want, rel=1e-6)


def test_aligned_merge_on_a_named_device_equals_the_default():
    """aligned_merge(..., device=) runs each layer's arithmetic there and puts the results beside the
    old tensors (on the CPU here: the same numbers, the same dtypes and devices)."""
    source = ours_from_hf(CASES["llama"]()).to(torch.bfloat16)
    blocks = random_ids(4, 16)
    cal = calibrate(source, blocks, device="cpu")
    plan = search(source, 0.5, blocks, SearchOptions(sensitivity=False), calibration=cal)
    merges = closed_form_merges(cal.stats, plan.layers)
    a, b = (aligned_merge(source, plan.layers, merges, **kw).state_dict() for kw in ({}, {"device": "cpu"}))
    for k in a:
        assert b[k].dtype == a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
