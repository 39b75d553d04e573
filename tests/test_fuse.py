"""Fusion operators, fusion loss and merge (dha.fuse), on tiny random LLaMA models, fp32 on CPU.

References are independent: Hugging Face's LlamaForCausalLM (source logits, and a GQA model built
in the test from hand-computed merged weights), and distances computed here from materialised copies.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dha.fuse import FusedModel, FusionOptions, merge
from dha.plan import LayerPlan, Plan
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf

HD = 8  # tiny_llama_hf head dim


def hand_plan(key_groups, value_groups, layers=2, heads=6) -> Plan:
    """The same key and value groups in every layer."""
    return Plan([LayerPlan([list(g) for g in key_groups], [list(g) for g in value_groups]) for _ in range(layers)],
                [heads] * layers, [heads] * layers, method="hand")


DECOUPLED = hand_plan([[0, 3, 5], [1], [2, 4]], [[0, 1], [2, 3, 4, 5]])


def randomize_coefficients(fused: FusedModel, scale=0.3, seed=0, row_sums_one=False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, proj in fused.projections():
            C = torch.eye(proj.num_heads) + scale * torch.randn(proj.num_heads, proj.num_heads, generator=g)
            C = C * proj.mask
            if row_sums_one:
                C = C / C.sum(1, keepdim=True)
            proj.coefficients.copy_(C)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("space", ["param", "output"])
@pytest.mark.parametrize("bias", [False, True])
def test_identity_fusion_is_the_source_model(space, bias):
    hf = tiny_llama_hf(bias=bias)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, FusionOptions(space=space)).eval()
    ids = random_ids()
    with torch.no_grad():
        assert_close(fused(ids), hf_logits(hf, ids), atol=1e-6, rtol=0)  # fp32


def test_source_model_is_not_changed():
    hf = tiny_llama_hf()
    model = ours_from_hf(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = FusedModel(model, DECOUPLED)
    randomize_coefficients(fused)
    with torch.no_grad():
        fused.project_to_mean()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert fused.model.layers[0].attn.k_proj.weight is not model.layers[0].attn.k_proj.weight


def identical_heads_hf(bias=True):
    """A tiny MHA model whose key heads 0,3,5 and 2,4 are copies, value heads 0,1 and 2..5 too."""
    hf = tiny_llama_hf(bias=bias)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, groups in ((layer.self_attn.k_proj, DECOUPLED.layers[0].key_groups),
                                 (layer.self_attn.v_proj, DECOUPLED.layers[0].value_groups)):
                for g in groups:
                    for h in g[1:]:
                        proj.weight[h * HD:(h + 1) * HD] = proj.weight[g[0] * HD:(g[0] + 1) * HD]
                        if bias:
                            proj.bias[h * HD:(h + 1) * HD] = proj.bias[g[0] * HD:(g[0] + 1) * HD]
    return hf


@pytest.mark.parametrize("space", ["param", "output"])
def test_identical_heads_fuse_and_merge_without_change(space):
    hf = identical_heads_hf()
    ids = random_ids()
    ref = hf_logits(hf, ids)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, FusionOptions(space=space)).eval()
    # Any coefficients whose rows sum to 1 reproduce a group of identical heads.
    randomize_coefficients(fused, row_sums_one=True)
    _, merged = merge(fused)
    with torch.no_grad():
        assert_close(fused(ids), ref, atol=1e-5, rtol=0)
        assert_close(merged(ids), ref, atol=1e-5, rtol=0)
    assert [merged.config.key_heads(l) for l in range(2)] == [3, 3]
    assert [merged.config.value_heads(l) for l in range(2)] == [2, 2]
    assert merged.config.kv_values_per_token() == 2 * (3 + 2) * HD


@pytest.mark.parametrize("space", ["param", "output"])
def test_projected_fused_model_equals_merged_model(space):
    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, FusionOptions(space=space)).eval()
    randomize_coefficients(fused, seed=1)
    fused.project_to_mean()
    _, merged = merge(fused)
    ids = random_ids()
    with torch.no_grad():
        assert_close(merged(ids), fused(ids), atol=1e-5, rtol=0)


def test_merged_contiguous_plan_matches_hf_gqa_model_built_by_hand():
    """Contiguous groups: the merged model is a GQA model; build it in HF from C's column means."""
    from transformers import LlamaForCausalLM

    plan = hand_plan([[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]])
    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), plan).eval()
    randomize_coefficients(fused, seed=2)
    _, merged = merge(fused)

    gqa_config = hf.config.__class__(**{**hf.config.to_dict(), "num_key_value_heads": 3})
    gqa = LlamaForCausalLM(gqa_config).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    for l in range(2):
        for name, kind in (("k_proj", 0), ("v_proj", 1)):
            proj = fused.projections()[2 * l + kind][2]
            C = proj.coefficients.detach()
            for suffix in ("weight", "bias"):
                w = sd[f"model.layers.{l}.self_attn.{name}.{suffix}"]
                rows = []
                for g in range(3):
                    members = [2 * g, 2 * g + 1]
                    # mean over the copies i of sum_j C_ij W_j, written as a plain loop
                    acc = torch.zeros_like(w[:HD])
                    for i in members:
                        for j in members:
                            acc += C[i, j] * w[j * HD:(j + 1) * HD] / len(members)
                    rows.append(acc)
                sd[f"model.layers.{l}.self_attn.{name}.{suffix}"] = torch.cat(rows)
    gqa.load_state_dict(sd, strict=True)
    ids = random_ids()
    with torch.no_grad():
        assert_close(merged(ids), gqa(ids).logits, atol=1e-5, rtol=0)


def reference_distance(C, W, b, members, hd):
    """sum_i ||W~_i - mean W~||^2 / sum_i ||W~_i||^2, copies materialised one by one."""
    copies = []
    for i in members:
        w = sum(C[i, j] * W[j * hd:(j + 1) * hd] for j in members)
        v = sum(C[i, j] * b[j * hd:(j + 1) * hd] for j in members)
        copies.append(torch.cat([w.flatten(), v]))
    copies = torch.stack(copies).double()
    return float(((copies - copies.mean(0)) ** 2).sum() / (copies ** 2).sum())


def test_parameter_distance_matches_materialised_copies_and_is_zero_iff_copies_agree():
    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED)
    randomize_coefficients(fused, seed=3)
    for l, kind, proj in fused.projections():
        C, W, b = proj.mixing().detach(), proj.weight.detach(), proj.bias.detach()
        d = proj.distances()
        for g, members in enumerate(proj.groups):
            ref = reference_distance(C, W, b, members, HD) if len(members) > 1 else 0.0
            assert d[g].item() == pytest.approx(ref, rel=1e-4, abs=1e-7), (l, kind, members)
            if len(members) > 1:
                assert ref > 1e-3
    loss, logs = fused.fusion_loss()
    assert loss.item() > 1e-3 and "fusion/key/0" in logs
    fused.project_to_mean()
    loss, _ = fused.fusion_loss()
    assert loss.item() < 1e-10
    assert fused.layer_distances().abs().max().item() < 1e-10


def test_output_distance_matches_reference_on_the_batch():
    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, FusionOptions(space="output")).train()
    randomize_coefficients(fused, seed=4)
    inputs = {}
    attn = fused.model.layers[1].attn
    handle = attn.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0].detach()))
    fused(random_ids())
    handle.remove()
    x = inputs["x"].reshape(-1, 48)  # (B*T, D)
    proj = attn.v_proj
    C = proj.mixing().detach()
    y = x @ proj.weight.detach().T + proj.bias.detach()  # (B*T, n*hd) source value heads
    d = proj.distances()
    for g, members in enumerate(proj.groups):
        copies = torch.stack([sum(C[i, j] * y[:, j * HD:(j + 1) * HD] for j in members).flatten() for i in members]).double()
        ref = float(((copies - copies.mean(0)) ** 2).sum() / (copies ** 2).sum())
        assert d[g].item() == pytest.approx(ref, rel=1e-4)
    proj.project_to_mean()
    assert proj.distances().max().item() < 1e-10


def test_train_base_off_keeps_source_weights_as_buffers():
    fused = FusedModel(ours_from_hf(tiny_llama_hf()), DECOUPLED, FusionOptions(train_base=False))
    names = {n for n, _ in fused.named_parameters()}
    assert "model.layers.0.attn.k_proj.weight" not in names
    assert "model.layers.0.attn.k_proj.coefficients" in names
    assert "model.layers.0.attn.k_proj.weight" in fused.state_dict()
    assert len(fused.coefficient_parameters()) == 4


@pytest.mark.parametrize("schedule,space", [("ramp", "param"), ("lagrangian", "output")])
def test_short_fusion_run_drives_distance_down(schedule, space):
    """30 steps of dha.train with the fusion hooks: distance down > 10x, LM loss finite."""
    from dha.fuse import FusionSchedule
    from dha.train import TrainConfig, train

    torch.manual_seed(0)
    options = FusionOptions(space=space, schedule=schedule, coefficient_lr=0.05, ramp_end=0.5)
    fused = FusedModel(ours_from_hf(tiny_llama_hf(bias=True)), DECOUPLED, options)
    stream = random_ids(batch=1, length=31 * 64, seed=5)[0]
    probe = stream[:64].view(4, 16)
    fused.train()
    fused(probe)  # output space measures distances on a batch
    before = fused.fusion_loss()[0].item()
    schedule_hooks = FusionSchedule(fused, steps=30, options=options).hooks()
    cfg = TrainConfig(tokens=30 * 64, block_size=16, batch_tokens=64, micro_batch=4, dtype="float32", eval_every=0, lr=1e-3)
    result = train(fused, stream, None, cfg, hooks=schedule_hooks, progress=False)
    assert result.steps == 30
    fused(probe)
    after = fused.fusion_loss()[0].item()
    assert after < before / 10, (before, after)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert "fusion/key/0" in result.history[-1]


# ---- the pipeline: `dha convert --method dha` ------------------------------------------------------

@pytest.fixture
def convert_setup(tmp_path, monkeypatch):
    from tests.test_train import text_file, tiny_source

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = tiny_source(str(tmp_path / "tiny"))
    data = text_file(str(tmp_path / "data.txt"))
    common = ["--method", "dha", "--kv-budget", "0.5", "--data", data, "--block-size", "16", "--batch-tokens", "64",
              "--calib-tokens", "256", "--dtype", "float32", "--no-progress", "--json"]
    return tmp_path, source, common


def test_split_tokens_in_whole_steps():
    from dha.errors import UserError
    from dha.pipeline import split_tokens

    s = split_tokens(1000, 0.3, batch_tokens=64, block_size=16)  # 15 steps of 64
    assert (s.fusion, s.continued, s.step_tokens) == (4 * 64, 11 * 64, 64)
    assert split_tokens(0, 0.3, 64, 16).fusion == 0
    assert split_tokens(128, 0.01, 64, 16).fusion == 64  # both stages asked for: one step each
    assert split_tokens(640, 0.0, 64, 16).fusion == 0 and split_tokens(640, 1.0, 64, 16).continued == 0
    with pytest.raises(UserError, match="no step"):
        split_tokens(100, 0.3, 64, 16)


def test_cli_convert_dha_end_to_end(convert_setup, capsys):
    import json
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from dha.plan import Plan

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "dha")
    assert main(["convert", source, *common, "--tokens", "640", "--eval-every", "3", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fusion_tokens"] == 3 * 64 and summary["continued_tokens"] == 7 * 64
    for name in ("plan.json", "report.md", "summary.json", "log.jsonl", "allocation.png", "loss.png", "perplexity.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    plan = Plan.load(os.path.join(out, "plan.json"))
    assert plan.method == "dha" and plan.kv_fraction() <= 0.5 + 1e-9
    converted = load(out)
    cfg = converted.model.config
    assert [cfg.key_heads(l) for l in range(2)] == plan.key_heads()
    assert [cfg.value_heads(l) for l in range(2)] == plan.value_heads()
    assert cfg.kv_values_per_token() == summary["kv_bytes_per_token_bf16_after"] // 2
    with open(os.path.join(out, "log.jsonl")) as f:
        stages = {json.loads(line)["stage"] for line in f}
    assert stages == {"fusion", "continued"}
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert "![allocation.png](allocation.png)" in report and "| source |" in report


def test_continued_training_reads_on_from_where_fusion_stopped(convert_setup, capsys, monkeypatch):
    """The token budget is N distinct tokens: the two stages must not both read the first rows."""
    import dha.train
    from dha.cli import main

    real_rows_at, reads = dha.train.rows_at, []

    def spy(num_rows, seed, start, count):
        idx = real_rows_at(num_rows, seed, start, count)
        reads.append((num_rows, idx.tolist()))
        return idx

    monkeypatch.setattr(dha.train, "rows_at", spy)
    tmp_path, source, common = convert_setup
    assert main(["convert", source, *common, "--tokens", "640", "--eval-every", "0", "--out", str(tmp_path / "o")]) == 0
    assert len(reads) == 10  # 3 fusion + 7 continued steps of 4 rows
    num_rows = reads[0][0]
    rows = [i for _, idx in reads for i in idx]
    assert len(rows) == 40
    first_epoch = rows[:num_rows]
    assert len(set(first_epoch)) == len(first_epoch), "a row was read twice before the train split was used up"


def test_cli_convert_dha_tokens_zero_mean_merges(convert_setup, capsys):
    import json
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from dha.plan import Plan
    from dha.transforms import merge_groups

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "dha0")
    assert main(["convert", source, *common, "--tokens", "0", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fusion_tokens"] == 0 and summary["continued_tokens"] == 0
    assert os.path.exists(os.path.join(out, "allocation.png")) and os.path.exists(os.path.join(out, "report.md"))
    # The saved model is the plan mean-merged: rebuild it independently from the source and the plan.
    plan = Plan.load(os.path.join(out, "plan.json"))
    expected = merge_groups(load(source).model, plan)
    ids = random_ids(length=8, vocab=30)
    with torch.no_grad():
        assert_close(load(out).model(ids), expected(ids), atol=1e-6, rtol=0)
    # The search weights its costs by measured sensitivities unless told not to.
    assert plan.notes["options"]["sensitivity"] and len(plan.notes["sensitivity"]["key"]) == 2
    plain = str(tmp_path / "dha0-plain")
    assert main(["convert", source, *common, "--tokens", "0", "--no-sensitivity", "--out", plain]) == 0
    plain_plan = Plan.load(os.path.join(plain, "plan.json"))
    assert not plain_plan.notes["options"]["sensitivity"] and "sensitivity" not in plain_plan.notes


def test_cli_convert_dha_too_few_tokens_exits_2_and_writes_nothing(convert_setup, capsys):
    import os

    from dha.cli import main

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "small")
    assert main(["convert", source, *common, "--tokens", "100", "--out", out]) == 2
    assert "no step" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["convert", source, *common, "--tokens", "640", "--fusion-space", "weights", "--out", out]) == 2
    assert not os.path.exists(out)


def test_anneal_reaches_the_merged_model_exactly():
    """The "anneal" schedule interpolates copies to their group mean: at a = 1 fused == merged."""
    from dha.fuse import FusionSchedule

    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, FusionOptions(schedule="anneal", ramp_end=0.5)).eval()
    randomize_coefficients(fused, seed=6)
    schedule = FusionSchedule(fused, steps=10)
    _, merged_before = merge(fused)
    ids = random_ids()
    with torch.no_grad():
        schedule.set_anneal(2)  # half way: not merged yet
        assert fused.fusion_loss()[0].item() > 1e-4
        schedule.set_anneal(5)
        assert fused.fusion_loss()[0].item() < 1e-10
        assert_close(fused(ids), merged_before(ids), atol=1e-5, rtol=0)
    _, merged_after = merge(fused)  # the merge weights do not depend on the annealing
    with torch.no_grad():
        assert_close(merged_after(ids), merged_before(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ramp_start, ramp_end, steps", [(0.0, 1.0, 4), (0.0, 0.5, 1), (1.0, 1.0, 4), (0.9, 0.9, 3), (0.6, 1.0, 1)])
def test_anneal_schedule_starts_at_the_unchanged_model_and_ends_merged(ramp_start, ramp_end, steps):
    """Step 0 (and its evaluation) is the source; after the last step the copies sit at their mean."""
    from dha.fuse import FusionSchedule

    hf = tiny_llama_hf()
    options = FusionOptions(schedule="anneal", ramp_start=ramp_start, ramp_end=ramp_end)
    fused = FusedModel(ours_from_hf(hf), DECOUPLED, options).eval()
    schedule = FusionSchedule(fused, steps=steps)
    ids = random_ids()
    with torch.no_grad():
        assert_close(fused(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)  # fp32
        for step in range(1, steps + 1):
            schedule.on_step_end(fused, step, {})
        assert fused.fusion_loss()[0].item() < 1e-10


def test_methods_registry_dha_searches_and_mean_merges():
    from dha.baselines import ConvertOptions
    from dha.checkpoint import Loaded
    from dha.convert import METHODS, convert

    hf = identical_heads_hf()
    loaded = Loaded(ours_from_hf(hf), None, "src", "native", None, None, {})
    # Budget 5/12: exactly the identical-head groups (3 key + 2 value heads of 12 per layer).
    out = convert(loaded, "dha", 5 / 12, random_ids(4, 16, seed=1), ConvertOptions())
    assert "dha" in METHODS and out.plan.method == "dha"
    assert sorted(map(sorted, out.plan.layers[0].key_groups)) == [[0, 3, 5], [1], [2, 4]]
    assert sorted(map(sorted, out.plan.layers[0].value_groups)) == [[0, 1], [2, 3, 4, 5]]
    ids = random_ids()
    with torch.no_grad():
        assert_close(out.model(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_pca_merge_of_identical_heads_is_exact():
    """`dha --merge pca` (the svd baseline's compression on the searched groups): a group of copies
    is compressed without loss, RoPE and biases included (fp32 against HF's model, atol 1e-4)."""
    from dha.analyze import collect_heads
    from dha.baselines import pca_merge

    hf = identical_heads_hf()
    ids = random_ids()
    model = ours_from_hf(hf)
    merged = pca_merge(model, DECOUPLED.layers, collect_heads(model, random_ids(4, 32, seed=5), 4))
    assert [merged.config.key_heads(l) for l in range(2)] == [3, 3]
    assert [merged.config.value_heads(l) for l in range(2)] == [2, 2]
    with torch.no_grad():
        assert_close(merged(ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_cli_convert_dha_pca_merge(convert_setup, capsys):
    import json
    import os

    from dha.cli import main

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "pca")
    assert main(["convert", source, *common, "--tokens", "0", "--merge", "pca", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["merge"] == "pca" and summary["fusion_tokens"] == 0
    bad = str(tmp_path / "bad")
    assert main(["convert", source, *common, "--tokens", "640", "--merge", "pca", "--out", bad]) == 2
    assert "--fusion-fraction 0" in capsys.readouterr().err and not os.path.exists(bad)
