"""Baselines (gqa, gqa-similar, svd, prune), the budget rule and the `convert` verb (fp32, CPU).

References: stock HF LlamaForCausalLM models whose weights the tests build by hand.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from dha.baselines import ConvertOptions, convert_gqa, convert_gqa_similar, convert_prune, convert_svd
from dha.budget import heads_for_budget, source_heads
from dha.checkpoint import load
from dha.cli import main
from dha.convert import METHODS, apply_plan, convert
from dha.errors import UserError
from dha.plan import Plan
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf
from tests.helpers import identity_plan
from tests.test_analyze import duplicated_heads_hf, text_file, tiny_source

HD = 8  # head dim of the tiny models


# ---- budget ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, source, expected",
    [
        (1.0, [6, 6], [6, 6]),
        (0.5, [6, 6], [3, 3]),
        (0.34, [3, 3], [1, 1]),
        (0.67, [3, 3], [2, 2]),
        (0.66, [3, 3], [1, 1]),
        (1 / 3, [6, 6], [2, 2]),
        (0.99, [6], [5]),
    ],
)
def test_heads_for_budget_rounds_down(budget, source, expected):
    keys, values = heads_for_budget(source, source, budget)
    assert keys == expected and values == expected
    assert sum(keys) + sum(values) <= budget * 2 * sum(source) + 1e-9


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan"), 0.3])
def test_heads_for_budget_refuses(budget):
    with pytest.raises(UserError):
        heads_for_budget([3] * 30, [3] * 30, budget)  # 0.3 < 1/3: less than one K and one V head per layer


# ---- gqa against a stock HF GQA model ---------------------------------------------------------------


def hf_gqa_by_hand(mha, groups: int, kv_weights=None):
    """A stock HF LlamaForCausalLM with `groups` KV heads: every weight copied from the MHA model,
    k/v projections (and biases) mean-pooled over contiguous groups here, in the test."""
    from transformers import LlamaForCausalLM

    config = mha.config.__class__(**{**mha.config.to_dict(), "num_key_value_heads": groups})
    ref = LlamaForCausalLM(config).eval()
    sd = {}
    for name, t in mha.state_dict().items():
        if any(f"self_attn.{p}_proj" in name for p in "kv"):
            per_head = t.reshape(6, HD, *t.shape[1:])  # (H, hd, ...)
            t = per_head.reshape(groups, 6 // groups, HD, *t.shape[1:]).mean(1).reshape(groups * HD, *t.shape[1:])
        sd[name] = t
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.mark.parametrize("groups, budget", [(2, 1 / 3), (3, 0.5)])
@pytest.mark.parametrize("bias", [False, True])
def test_gqa_equals_hf_mean_pooled(groups, budget, bias):
    mha = tiny_llama_hf(bias=bias)
    plan, model = convert_gqa(ours_from_hf(mha), budget, None, ConvertOptions())
    assert plan.key_heads() == [groups, groups] and plan.method == "gqa"
    ids = random_ids()
    with torch.no_grad():
        ref = hf_gqa_by_hand(mha, groups)(ids).logits
    assert_close(model(ids), ref, atol=1e-5, rtol=0)


def test_gqa_rounds_to_a_divisor():
    plan, model = convert_gqa(
        ours_from_hf(tiny_llama_hf()), 0.67, None, ConvertOptions()
    )  # 4 heads wanted; 4 does not divide 6
    assert plan.key_heads() == [3, 3] and plan.notes["rounded_down_to_divisor_layers"] == [0, 1]
    assert model.config.key_heads(0) == 3


# ---- similarity grouping ---------------------------------------------------------------------------


def test_gqa_similar_groups_identical_heads_exactly():
    """Heads 0 and 3 are copies: at 5 heads they share a group and the model is unchanged (HF reference)."""
    hf = duplicated_heads_hf()
    plan, model = convert_gqa_similar(ours_from_hf(hf), 5 / 6, random_ids(4, 16, seed=1), ConvertOptions())
    assert all([0, 3] in layer.key_groups and layer.key_groups == layer.value_groups for layer in plan.layers)
    ids = random_ids()
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


# ---- svd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads, bias", [(6, False), (3, True)])
def test_svd_full_rank_reproduces_model(kv_heads, bias):
    """Groups of one head at full rank: an orthogonal change of basis, folded into W_Q and W_O."""
    hf = tiny_llama_hf(num_kv_heads=kv_heads, bias=bias)
    plan, model = convert_svd(ours_from_hf(hf), 1.0, random_ids(4, 16, seed=1), ConvertOptions())
    assert plan.key_heads() == [kv_heads] * 2
    ids = random_ids()
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_svd_is_exact_on_rope_commuting_copies():
    """Head 3's key is 2x head 0's rotated by a fixed per-pair phase (a map that commutes with RoPE),
    and its value is an orthogonal rotation of head 0's. The group {0, 3} then has rank hd, so svd
    at 5 heads reproduces the model (HF reference), while mean pooling cannot."""
    hf = tiny_llama_hf()
    g = torch.Generator().manual_seed(5)
    phase = torch.rand(HD // 2, generator=g) * 2 * math.pi
    a, b = 2 * phase.cos()[:, None], 2 * phase.sin()[:, None]
    with torch.no_grad():
        for layer in hf.model.layers:
            wk, wv = layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
            k1, k2 = wk[: HD // 2], wk[HD // 2 : HD]  # rotate-half pairs (i, i + hd/2) of head 0
            wk[3 * HD : 4 * HD] = torch.cat([a * k1 - b * k2, b * k1 + a * k2])
            Q = torch.linalg.qr(torch.randn(HD, HD, generator=g))[0]
            wv[3 * HD : 4 * HD] = Q @ wv[:HD]
    ids, calib = random_ids(), random_ids(6, 16, seed=1)
    options = ConvertOptions(grouping="similar", metric="cka")
    plan, model = convert_svd(ours_from_hf(hf), 5 / 6, calib, options)
    assert all([0, 3] in layer.key_groups and [0, 3] in layer.value_groups for layer in plan.layers)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_close(model(ids), ref, atol=1e-4, rtol=0)
    _, pooled = convert_gqa_similar(ours_from_hf(hf), 5 / 6, calib, options)
    assert (pooled(ids) - ref).abs().max() > 1e-2


# ---- prune -------------------------------------------------------------------------------------------


def test_prune_keeps_budget_and_drops_unused_heads():
    """Query head 2's W_O columns are zero, so key and value head 2 cannot matter: prune drops them
    at 5 of 6 heads. The result keeps the other heads' weights as they were (HF reference)."""
    hf = tiny_llama_hf()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[:, 2 * HD : 3 * HD] = 0
    source = ours_from_hf(hf)
    plan, model = convert_prune(source, 5 / 6, random_ids(4, 16, seed=1), ConvertOptions())
    assert plan.kv_fraction() <= 5 / 6 + 1e-9 and plan.key_heads() == [5, 5]
    for l, kept in enumerate(plan.notes["kept_heads"]):
        assert 2 not in kept["keys"] and 2 not in kept["values"]
        k_ref = hf.model.layers[l].self_attn.k_proj.weight.reshape(6, HD, -1)[kept["keys"]].reshape(-1, 48)
        assert_close(model.layers[l].attn.k_proj.weight, k_ref, atol=0, rtol=0)
    ids = random_ids()
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)  # head 2 never reached the output

    plan, _ = convert_prune(source, 1 / 3, random_ids(4, 16, seed=1), ConvertOptions())
    assert plan.key_heads() == [2, 2] and plan.value_heads() == [2, 2] and plan.kv_fraction() <= 1 / 3 + 1e-9


def test_attention_output_through_other_maps_equals_transformers():
    """prune's what-if attention (query h reads key head ki[h], value head vi[h] of the layer's own
    projections; head 2 read by none) against transformers' attention of an MHA model whose K/V
    rows of head h are those of ki[h] / vi[h] (fp32, atol 1e-5)."""
    import copy

    from dha.baselines import attention_inputs, attention_output

    hf = tiny_llama_hf(bias=True)
    ours = ours_from_hf(hf)
    ki, vi = [0, 1, 0, 3, 4, 5], [1, 1, 5, 3, 4, 5]
    ids = random_ids(2, 12, seed=3)
    ref_model = copy.deepcopy(hf)
    attn = ref_model.model.layers[1].self_attn
    with torch.no_grad():
        for proj, index in ((attn.k_proj, ki), (attn.v_proj, vi)):
            rows = torch.cat([torch.arange(j * HD, (j + 1) * HD) for j in index])
            proj.weight.copy_(proj.weight[rows].clone())
            proj.bias.copy_(proj.bias[rows].clone())
    seen = []
    handle = attn.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        ref_model(ids)
    handle.remove()
    x = attention_inputs(ours, ids)[1]  # layer 1's normed input (layer 0 is unchanged in the reference)
    assert_close(attention_output(ours, 1, x, ki, vi), seen[0], atol=1e-5, rtol=0)
    assert not torch.allclose(attention_output(ours, 1, x, list(range(6)), list(range(6))), seen[0], atol=1e-3)


def test_methods_registry_and_convert_carry_everything():
    assert {"gqa", "gqa-similar", "svd", "prune"} <= set(METHODS)
    from dha.checkpoint import Loaded

    loaded = Loaded(ours_from_hf(tiny_llama_hf()), "TOK", "src", "native", {"model_type": "llama"}, None, {"a": 1})
    out = convert(loaded, "svd", 0.5, random_ids(4, 16, seed=1), ConvertOptions(seed=3))
    assert out.tokenizer == "TOK" and out.hf_config == {"model_type": "llama"} and out.plan.method == "svd"
    assert (
        out.plan.kv_budget == 0.5
        and out.provenance["converted_from"] == "src"
        and out.provenance["options"]["seed"] == 3
    )
    with pytest.raises(UserError):
        convert(loaded, "nope", 0.5, None)
    with pytest.raises(UserError):
        convert(loaded, "svd", 0.5, None)  # needs calibration


def test_apply_plan_mean_pools_like_gqa():
    source = ours_from_hf(tiny_llama_hf())
    from dha.checkpoint import Loaded

    plan, gqa = convert_gqa(source, 0.5, None, ConvertOptions())
    replayed = apply_plan(Loaded(source, None, "s", "native"), Plan.from_dict(plan.to_dict())).model
    ids = random_ids()
    assert_close(replayed(ids), gqa(ids), atol=0, rtol=0)


# ---- the CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    return tmp_path, tiny_source(str(tmp_path / "src")), text_file(str(tmp_path / "d.txt"))


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "gqa", "--kv-budget", "0.1"],  # below one K and one V head per layer (1/6)
        ["--method", "gqa", "--kv-budget", "1.5"],
        ["--method", "gqa", "--kv-budget", "0"],
        ["--method", "gqa"],
        ["--method", "magic", "--kv-budget", "0.5"],
        ["--method", "svd", "--kv-budget", "0.5", "--data", "EMPTY"],
        ["--method", "svd", "--kv-budget", "0.5", "--data", "missing.txt"],
        ["--plan", "BADPLAN"],
        [],
    ],
)
def test_cli_convert_bad_input_exits_2_and_writes_nothing(workspace, args, capsys):
    tmp, src, data = workspace
    empty = tmp / "empty.txt"
    empty.write_text("")
    bad_plan = identity_plan([6, 6, 6], [6, 6, 6])  # made for a 3-layer model
    bad_plan.save(str(tmp / "bad.json"))
    args = [str(empty) if a == "EMPTY" else str(tmp / "bad.json") if a == "BADPLAN" else a for a in args]
    out = tmp / "out"
    assert main(["convert", src, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dha: error:")
    if "magic" in args:  # the method registry's names (dha.convert.METHODS)
        assert "unknown method 'magic'; choose from gqa, gqa-similar, svd, prune, dha" in err
    assert not out.exists()


def test_cli_convert_identity_plan_leaves_logits_unchanged(workspace, capsys):
    tmp, src, _ = workspace
    identity_plan([6, 6], [6, 6]).save(str(tmp / "id.json"))
    assert main(["convert", src, "--plan", str(tmp / "id.json"), "--out", str(tmp / "out")]) == 0
    ids = random_ids()
    assert_close(
        load(str(tmp / "out"), tokenizer=False).model(ids), load(src, tokenizer=False).model(ids), atol=0, rtol=0
    )


def test_cli_convert_svd_writes_checkpoint_with_plan(workspace, capsys):
    tmp, src, data = workspace
    out = tmp / "out"
    assert (
        main(
            [
                "convert",
                src,
                "--method",
                "svd",
                "--kv-budget",
                "0.34",
                "--data",
                data,
                "--calib-tokens",
                "128",
                "--calib-block-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["key_heads"] == [2, 2] and last["kv_bytes_per_token_fp32_before"] == 2 * 2 * 6 * HD * 4
    assert last["kv_bytes_per_token_fp32_after"] == 2 * 2 * 2 * HD * 4
    loaded = load(str(out))
    assert loaded.plan.method == "svd" and loaded.tokenizer is not None and loaded.model.config.value_heads(1) == 2
    assert (out / "plan.json").exists()


# ---- the real default checkpoint ---------------------------------------------------------------------


@pytest.mark.slow
def test_svd_full_rank_on_smollm2_reproduces_logits():
    """SmolLM2-135M (3 KV heads): svd at budget 1.0 is an orthogonal change of basis per head, folded
    into W_Q and W_O; logits match the source within fp32 error. At 0.34 every layer keeps 1 K and 1 V."""
    source = load(None, tokenizer=False).model
    calib = random_ids(2, 64, vocab=source.config.vocab_size, seed=1)
    ids = random_ids(1, 24, vocab=source.config.vocab_size)
    _, full = convert_svd(source, 1.0, calib, ConvertOptions())
    with torch.no_grad():
        assert_close(full(ids), source(ids), atol=2e-4, rtol=0)  # fp32; logits up to ~30, measured max error 5e-5
        plan, small = convert_gqa(source, 0.34, None, ConvertOptions())
    assert plan.key_heads() == [1] * 30 and small.config.kv_bytes_per_token() * 3 == source.config.kv_bytes_per_token()


def test_cli_convert_baseline_with_tokens_trains_and_saves(tmp_path, monkeypatch, capsys):
    """`dha convert --method gqa --tokens N` continues training with the shared loop."""
    import json
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from tests.test_train import text_file, tiny_source

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = tiny_source(str(tmp_path / "tiny"))
    data = text_file(str(tmp_path / "data.txt"))
    out = str(tmp_path / "gqa")
    code = main(
        [
            "convert",
            source,
            "--method",
            "gqa",
            "--kv-budget",
            "0.5",
            "--data",
            data,
            "--block-size",
            "16",
            "--batch-tokens",
            "64",
            "--tokens",
            "256",
            "--eval-every",
            "2",
            "--no-progress",
            "--json",
            "--out",
            out,
        ]
    )
    assert code == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert len(steps) >= 4 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    trained = load(out)
    before = load(source)
    assert trained.plan is not None and trained.plan.method == "gqa"
    cfg = trained.model.config
    expected_k, expected_v = heads_for_budget(*source_heads(before.model), 0.5)
    assert [cfg.key_heads(l) for l in range(cfg.num_layers)] == list(expected_k)
    assert [cfg.value_heads(l) for l in range(cfg.num_layers)] == list(expected_v)
    assert trained.model.state_dict()["embed.weight"].ne(before.model.state_dict()["embed.weight"]).any()  # it trained


# ---- convert --tokens: the training options --------------------------------------------------------


def _state(path):
    return {k: v.clone() for k, v in load(path).model.state_dict().items()}


def test_cli_convert_training_resumes_after_a_crash_like_an_uninterrupted_run(workspace, monkeypatch):
    """A baseline conversion with --tokens and --save-every, stopped at step 4, continues from its
    step-2 checkpoint with --resume and ends where the uninterrupted run ends (fp32, atol 1e-6)."""
    import dha.continued

    tmp, src, data = workspace
    common = [
        "convert",
        src,
        "--method",
        "gqa",
        "--kv-budget",
        "0.5",
        "--data",
        data,
        "--tokens",
        "384",
        "--block-size",
        "16",
        "--batch-tokens",
        "64",
        "--eval-every",
        "0",
        "--no-progress",
        "--json",
    ]
    full, crashed = str(tmp / "full"), str(tmp / "crashed")
    assert main([*common, "--out", full]) == 0

    real = dha.train.lr_factor

    def crash_at_step_4(step, *args):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(step, *args)

    monkeypatch.setattr(dha.train, "lr_factor", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*common, "--save-every", "2", "--out", crashed])
    monkeypatch.setattr(dha.train, "lr_factor", real)
    assert os.path.exists(os.path.join(crashed, "checkpoints", "step_00000002.pt"))
    assert main([*common, "--save-every", "2", "--out", crashed, "--resume", crashed]) == 0
    want, got = _state(full), _state(crashed)
    assert want.keys() == got.keys()
    for k in want:
        assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", "somewhere"], "give --tokens"),
        (["--save-every", "2"], "give --tokens"),
        (["--tokens", "128", "--dtype", "bfloat16"], "--train-dtype"),
        (["--tokens", "128", "--teacher", "x"], "only used with --distill"),
        (["--tokens", "128", "--resume", "elsewhere"], "resumes in its own directory"),
    ],
)
def test_cli_convert_training_options_refused_before_loading(workspace, extra, message, capsys):
    tmp, src, data = workspace
    out = tmp / "out"
    assert (
        main(["convert", src, "--method", "gqa", "--kv-budget", "0.5", "--data", data, *extra, "--out", str(out)]) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_convert_training_holds_out_what_calibration_held_out(workspace, monkeypatch):
    """--heldout-fraction splits the text for training as it did for calibration."""
    import dha.continued
    import dha.data

    tmp, src, data = workspace
    seen, real = [], dha.data.load_tokens

    def spy(*args, **kwargs):
        seen.append(kwargs.get("heldout_fraction", 0.1))
        return real(*args, **kwargs)

    monkeypatch.setattr(dha.data, "load_tokens", spy)  # calibration (the CLI)
    monkeypatch.setattr(dha.continued, "load_tokens", spy)  # training
    assert (
        main(
            [
                "convert",
                src,
                "--method",
                "gqa",
                "--kv-budget",
                "0.5",
                "--data",
                data,
                "--heldout-fraction",
                "0.3",
                "--tokens",
                "64",
                "--block-size",
                "16",
                "--batch-tokens",
                "64",
                "--eval-every",
                "0",
                "--no-progress",
                "--out",
                str(tmp / "o"),
            ]
        )
        == 0
    )
    assert seen and all(f == 0.3 for f in seen)


def test_cli_out_that_cannot_be_created_exits_2_before_any_work(workspace, capsys):
    tmp, src, data = workspace
    blocker = tmp / "a_file"
    blocker.write_text("x")
    for verb in (
        ["convert", src, "--method", "gqa", "--kv-budget", "0.5"],
        ["convert", src, "--method", "dha", "--kv-budget", "0.5"],
        ["analyze", src, "--data", data],
        ["export", src],
    ):
        assert main([*verb, "--out", str(blocker / "sub" / "out")]) == 2, verb
        assert "is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_cli_plan_that_is_a_directory_exits_2(workspace, capsys):
    tmp, src, data = workspace
    assert main(["convert", src, "--plan", str(tmp), "--out", str(tmp / "out")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_cli_plan_with_notes_that_are_not_an_object_exits_2(workspace, capsys):
    tmp, src, data = workspace
    assert main(["convert", src, "--method", "gqa", "--kv-budget", "0.5", "--out", str(tmp / "p")]) == 0
    plan = json.loads((tmp / "p" / "plan.json").read_text())
    plan["notes"] = "hand-made"
    (tmp / "bad.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["convert", src, "--method", "dha", "--plan", str(tmp / "bad.json"), "--out", str(tmp / "out")]) == 2
    assert '"notes" must be a JSON object' in capsys.readouterr().err
    assert not (tmp / "out").exists()


class _Stop(Exception):
    pass


def test_cli_metric_default_is_each_consumers_own(workspace, monkeypatch):
    """--metric unset: the baselines cluster by CKA; the dha search uses its own merge metric (weighted)."""
    import dha.convert
    import dha.pipeline

    tmp, src, data = workspace
    seen = {}

    def stop_convert(loaded, method, budget, calib, options):
        seen["gqa-similar"] = options.metric
        raise _Stop

    def stop_search(model, budget, calib, options, calibration=None):
        seen["dha"] = options.metric
        raise _Stop

    monkeypatch.setattr(dha.convert, "convert", stop_convert)
    monkeypatch.setattr(dha.pipeline, "search", stop_search)
    for method in ("gqa-similar", "dha"):
        with pytest.raises(_Stop):
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
                    "--calib-tokens",
                    "64",
                    "--calib-block-size",
                    "16",
                    "--no-progress",
                    "--out",
                    str(tmp / method),
                ]
            )
    assert seen == {"gqa-similar": "cka", "dha": "weighted"}


def test_cli_convert_training_gets_train_dtype_and_teacher(workspace, monkeypatch):
    import dha.continued

    tmp, src, data = workspace
    seen = {}

    def stop(loaded, data, cfg, **kwargs):
        seen.update(dtype=cfg.dtype, teacher=kwargs["teacher"], weights=next(loaded.model.parameters()).dtype)
        raise _Stop

    monkeypatch.setattr(dha.continued, "continue_training", stop)
    other = tiny_source(str(tmp / "teacher"), tiny_llama_hf(seed=7, layers=3))  # a teacher unlike the source
    with pytest.raises(_Stop):
        main(
            [
                "convert",
                src,
                "--method",
                "gqa",
                "--kv-budget",
                "0.5",
                "--data",
                data,
                "--tokens",
                "64",
                "--train-dtype",
                "bfloat16",
                "--distill",
                "--teacher",
                other,
                "--block-size",
                "16",
                "--batch-tokens",
                "64",
                "--no-progress",
                "--out",
                str(tmp / "o"),
            ]
        )
    assert seen["dtype"] == "bfloat16" and seen["weights"] == torch.float32
    assert seen["teacher"].config.num_layers == 3  # --teacher, not the source (2 layers)


def test_cli_out_holding_a_training_run_points_to_resume(workspace, capsys):
    tmp, src, data = workspace
    run = tmp / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert main(["convert", src, "--method", "gqa", "--kv-budget", "0.5", "--out", str(run)]) == 2
    assert f"--resume {run}" in capsys.readouterr().err
