"""Fusion toward the aligned merge and the merge itself (dha.fuse), on tiny random LLaMA models, fp32 on CPU.

References are independent: Hugging Face's LlamaForCausalLM (source logits, and a GQA model built
in the test from hand-computed merged weights), the merged model of dha.merge, and distances
computed here from the reconstruction written out by einsum.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dha.calibration import calibrate
from dha.fuse import FusedModel, merge
from dha.merge import closed_form_merges
from dha.options import FusionOptions
from dha.plan import LayerPlan, Plan
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf

HD = 8  # tiny_llama_hf head dim


def hand_plan(key_groups, value_groups, layers=2, heads=6) -> Plan:
    """The same key and value groups in every layer."""
    return Plan(
        [LayerPlan([list(g) for g in key_groups], [list(g) for g in value_groups]) for _ in range(layers)],
        [heads] * layers,
        [heads] * layers,
        method="hand",
    )


DECOUPLED = hand_plan([[0, 3, 5], [1], [2, 4]], [[0, 1], [2, 3, 4, 5]])


def aligned(model, plan=DECOUPLED):
    return closed_form_merges(calibrate(model, random_ids(4, 16, seed=7)).stats, plan.layers)


def perturb_maps(fused: FusedModel, scale=0.2, seed=0) -> None:
    """Move every map away from its closed form, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if ".maps." in name:
                p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("bias", [False, True])
def test_step_zero_of_fusion_is_the_source_model(bias):
    hf = tiny_llama_hf(bias=bias)
    model = ours_from_hf(hf)
    fused = FusedModel(model, DECOUPLED, aligned(model)).eval()
    perturb_maps(fused)  # whatever the maps, anneal 0 is the source
    ids = random_ids()
    with torch.no_grad():
        assert_close(fused(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)  # fp32


def test_source_model_is_not_changed():
    model = ours_from_hf(tiny_llama_hf())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = FusedModel(model, DECOUPLED, aligned(model))
    perturb_maps(fused)
    fused.set_anneal(1.0)
    merge(fused)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert fused.model.layers[0].attn.k_proj.weight is not model.layers[0].attn.k_proj.weight


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("merge_kind", ["aligned", "mean"])
def test_fused_model_at_the_end_of_the_stage_equals_the_merged_model(bias, merge_kind):
    """anneal 1: the fused model (source head count) and merge(fused) (one head per group) agree
    (fp32, atol 1e-5), also with maps moved off their closed form and base weights changed."""
    model = ours_from_hf(tiny_llama_hf(bias=bias))
    fused = FusedModel(model, DECOUPLED, aligned(model) if merge_kind == "aligned" else None).eval()
    perturb_maps(fused, seed=1)
    with torch.no_grad():
        fused.model.layers[1].attn.k_proj.weight.add_(0.05)
    fused.set_anneal(1.0)
    _, merged = merge(fused)
    ids = random_ids()
    with torch.no_grad():
        assert_close(merged(ids), fused(ids), atol=1e-5, rtol=0)
    assert [merged.config.key_heads(l) for l in range(2)] == [3, 3]
    assert [merged.config.value_heads(l) for l in range(2)] == [2, 2]
    assert merged.config.kv_values_per_token() == 2 * (3 + 2) * HD


def test_halfway_is_the_interpolation_of_the_weights():
    """anneal a: each fused k_proj equals (1 - a) W + a * (the merged model's heads read back), here
    rebuilt from the merged model's own k_proj and q_proj (pre-RoPE logits agree: fp32, atol 1e-5)."""
    model = ours_from_hf(tiny_llama_hf())
    fused = FusedModel(model, DECOUPLED, aligned(model)).eval()
    proj = fused.model.layers[0].attn.k_proj
    w = proj.weight.detach().clone()
    fused.set_anneal(1.0)
    full = proj.fused_weight()[0].detach()
    fused.set_anneal(0.3)
    assert_close(proj.fused_weight()[0].detach(), 0.7 * w + 0.3 * full, atol=1e-6, rtol=0)
    # at a = 1 the query . key logits of the fused copies equal the merged model's
    _, merged = merge(fused)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    q = (x @ model.layers[0].attn.q_proj.weight.T).view(5, 6, HD)
    k = (x @ full.T).view(5, 6, HD)
    q2 = (x @ merged.layers[0].attn.q_proj.weight.T).view(5, 6, HD)
    k2 = (x @ merged.layers[0].attn.k_proj.weight.T).view(5, 3, HD)
    key_index = merged.config.key_index[0]
    # no RoPE here: per-pair complex scalars are not orthogonal maps, but the logit q . k is kept
    logits = torch.einsum("shd,thd->hst", q, k)
    logits2 = torch.einsum("shd,thd->hst", q2, k2[:, key_index])
    assert_close(logits2, logits, atol=1e-5, rtol=0)


def identical_heads_hf(bias=True):
    """A tiny MHA model whose key heads 0,3,5 and 2,4 are copies, value heads 0,1 and 2..5 too."""
    hf = tiny_llama_hf(bias=bias)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, groups in (
                (layer.self_attn.k_proj, DECOUPLED.layers[0].key_groups),
                (layer.self_attn.v_proj, DECOUPLED.layers[0].value_groups),
            ):
                for g in groups:
                    for h in g[1:]:
                        proj.weight[h * HD : (h + 1) * HD] = proj.weight[g[0] * HD : (g[0] + 1) * HD]
                        if bias:
                            proj.bias[h * HD : (h + 1) * HD] = proj.bias[g[0] * HD : (g[0] + 1) * HD]
    return hf


def test_identical_heads_fuse_and_merge_without_change():
    hf = identical_heads_hf()
    model = ours_from_hf(hf)
    ids = random_ids()
    ref = hf_logits(hf, ids)
    fused = FusedModel(model, DECOUPLED, aligned(model)).eval()
    fused.set_anneal(1.0)
    _, merged = merge(fused)
    with torch.no_grad():
        assert_close(fused(ids), ref, atol=1e-5, rtol=0)
        assert_close(merged(ids), ref, atol=1e-5, rtol=0)


def test_mean_target_on_a_contiguous_plan_matches_hf_gqa_model_built_by_hand():
    """target mean, contiguous groups: the merged model is GQA with mean-pooled K/V heads (HF, atol 1e-5)."""
    from transformers import LlamaForCausalLM

    plan = hand_plan([[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]])
    hf = tiny_llama_hf(bias=True)
    fused = FusedModel(ours_from_hf(hf), plan).eval()
    fused.set_anneal(1.0)
    _, merged = merge(fused)
    gqa = LlamaForCausalLM(hf.config.__class__(**{**hf.config.to_dict(), "num_key_value_heads": 3})).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    for l in range(2):
        for name in ("k_proj", "v_proj"):
            for suffix in ("weight", "bias"):
                w = sd[f"model.layers.{l}.self_attn.{name}.{suffix}"]
                sd[f"model.layers.{l}.self_attn.{name}.{suffix}"] = torch.cat(
                    [(w[2 * g * HD : (2 * g + 1) * HD] + w[(2 * g + 1) * HD : (2 * g + 2) * HD]) / 2 for g in range(3)]
                )
    gqa.load_state_dict(sd, strict=True)
    ids = random_ids()
    with torch.no_grad():
        assert_close(merged(ids), gqa(ids).logits, atol=1e-5, rtol=0)


def test_distance_is_the_relative_error_of_the_members_read_back():
    """d(S) against the group written out here: mean-target members read back = the group mean."""
    model = ours_from_hf(tiny_llama_hf(bias=True))
    fused = FusedModel(model, DECOUPLED)  # target mean: B_j A W_S = mean of the members
    for l, kind, proj in fused.projections():
        W, b = proj.weight.detach().double(), proj.bias.detach().double()
        d = proj.distances()
        for g, members in enumerate(proj.groups):
            rows = torch.stack(
                [torch.cat([W[j * HD : (j + 1) * HD].flatten(), b[j * HD : (j + 1) * HD]]) for j in members]
            )
            ref = float(((rows - rows.mean(0)) ** 2).sum() / (rows**2).sum())
            assert d[g].item() == pytest.approx(ref, rel=1e-4, abs=1e-7), (l, kind, members)
    loss, logs = fused.fusion_loss()
    assert loss.item() > 1e-3 and "fusion/key/0" in logs


def test_train_base_and_maps_off_keep_them_as_buffers():
    model = ours_from_hf(tiny_llama_hf())
    fused = FusedModel(model, DECOUPLED, aligned(model), FusionOptions(train_base=False, learn_maps=False))
    names = {n for n, _ in fused.named_parameters()}
    assert "model.layers.0.attn.k_proj.weight" not in names and not any(".maps." in n for n in names)
    assert "model.layers.0.attn.k_proj.weight" in fused.state_dict()
    learned = FusedModel(model, DECOUPLED, aligned(model))
    assert any(".maps." in n for n, _ in learned.named_parameters())


@pytest.mark.parametrize("schedule", ["ramp", "lagrangian"])
def test_short_fusion_run_drives_distance_down(schedule):
    """30 steps of dha.train with the fusion hooks: distance down > 5x, LM loss finite."""
    from dha.fuse import FusionSchedule
    from dha.options import TrainConfig
    from dha.train import train

    torch.manual_seed(0)
    options = FusionOptions(schedule=schedule, ramp_end=0.5, weight=30.0, multiplier_lr=0.5)
    model = ours_from_hf(tiny_llama_hf(bias=True))
    fused = FusedModel(model, DECOUPLED, aligned(model), options)
    stream = random_ids(batch=1, length=31 * 64, seed=5)[0]
    before = fused.fusion_loss()[0].item()
    schedule_hooks = FusionSchedule(fused, steps=30, options=options).hooks()
    cfg = TrainConfig(
        tokens=30 * 64, block_size=16, batch_tokens=64, micro_batch=4, dtype="float32", eval_every=0, lr=1e-2
    )
    result = train(fused, stream, None, cfg, hooks=schedule_hooks, progress=False)
    assert result.steps == 30
    after = fused.fusion_loss()[0].item()
    assert after < before / 5, (before, after)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert "fusion/key/0" in result.history[-1]


def mean_target_distances(fused: FusedModel) -> torch.Tensor:
    """(L, 2) [key, value]: mean over each layer-kind's multi-head groups of d(S) written out for
    the mean target (members read back = the group mean), from the weights alone (float64)."""
    out = torch.zeros(2, 2, dtype=torch.float64)
    for l, kind, proj in fused.projections():
        W = proj.weight.detach().double().view(6, HD, -1)
        ds = [((W[g] - W[g].mean(0)) ** 2).sum() / (W[g] ** 2).sum() for g in proj.groups if len(g) > 1]
        out[l, ["key", "value"].index(kind)] = torch.stack(ds).mean()
    return out


def test_lagrangian_penalty_in_parameter_space():
    """The lagrangian schedule's penalty, against the formula written here on distances measured
    from the weights: sum over (layer, kind) of l1 g + l2 g^2 with g = max(d - t, 0) and the target
    t = (1 - f) d_initial + f eps. A group AHEAD of its schedule (d < t, layer 0's keys here, pulled
    toward their group means) adds nothing and gets no gradient: the squared term of an inequality
    constraint takes the violation's positive part only (g = d - t would push it back up)."""
    from dha.fuse import FusionSchedule

    options = FusionOptions(schedule="lagrangian", ramp_end=0.5, eps=1e-3)
    fused = FusedModel(ours_from_hf(tiny_llama_hf()), DECOUPLED, None, options)  # merges None: toward the group means
    initial = mean_target_distances(fused)
    schedule = FusionSchedule(fused, steps=10, options=options)  # the ramp runs over steps 0..5
    schedule.param_groups(fused)
    l1 = torch.tensor([[0.5, 0.7], [1.1, 0.3]], dtype=torch.float64)
    l2 = torch.tensor([[2.0, 3.0], [0.4, 1.5]], dtype=torch.float64)
    with torch.no_grad():
        schedule.multipliers.copy_(torch.stack([l1, l2]))
        key0 = fused.model.layers[0].attn.k_proj
        W = key0.weight.view(6, HD, -1)
        for g in key0.groups:  # layer 0's keys fused ahead: 0.3x their deviation from the group mean
            W[g] = W[g].mean(0) + 0.3 * (W[g] - W[g].mean(0))
    d = mean_target_distances(fused)
    frac = 3 / 5
    target = (1 - frac) * initial + frac * 1e-3
    gap = (d - target).clamp_min(0.0)
    assert gap[0, 0] == 0 and (gap[1] > 0).all(), (d, target)  # one ahead, the others behind
    reference = float((l1 * gap + l2 * gap**2).sum())
    term, logs = schedule.extra_loss(fused, 3)
    assert term.item() == pytest.approx(reference, rel=1e-4)  # fp32 distances, fp64 reference
    assert logs["fusion/key/0"] == pytest.approx(float(d[0, 0]), rel=1e-4)
    term.backward()
    assert key0.weight.grad is None or key0.weight.grad.abs().max() == 0  # ahead: not pushed back
    assert fused.model.layers[1].attn.v_proj.weight.grad.abs().max() > 0  # behind: pulled toward the merge


# ---- the pipeline: `dha convert --method dha` ------------------------------------------------------

TRAIN = [
    "--block-size",
    "16",
    "--batch-tokens",
    "64",
    "--fusion-fraction",
    "0.3",
]  # training rows and steps of the runs with --tokens


@pytest.fixture
def convert_setup(tmp_path, monkeypatch):
    from tests.test_train import text_file, tiny_source

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = tiny_source(str(tmp_path / "tiny"))
    data = text_file(str(tmp_path / "data.txt"))
    common = [
        "--method",
        "dha",
        "--kv-budget",
        "0.5",
        "--data",
        data,
        "--calib-block-size",
        "16",
        "--calib-tokens",
        "256",
        "--dtype",
        "float32",
        "--no-progress",
        "--json",
    ]
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
    import math
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from dha.data import load_tokens
    from dha.plan import Plan

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "dha")
    assert (
        main(["convert", source, *common, *TRAIN, "--tokens", "640", "--eval-every", "3", "--lr", "3e-3", "--out", out])
        == 0
    )
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
    # Fusion and training beat the untrained merge: the saved model's held-out loss, computed here
    # (fp32 model, fp64 sum) on the whole held-out stream as one window, is below 0.98x that of the
    # same plan merged without training (`--tokens 0`). Measured: 4.14 against 4.57 nats (0.91x).
    untrained = str(tmp_path / "dha-untrained")
    assert main(["convert", source, *common, "--tokens", "0", "--out", untrained]) == 0
    assert Plan.load(os.path.join(untrained, "plan.json")).to_dict()["layers"] == plan.to_dict()["layers"]
    heldout = load_tokens(common[common.index("--data") + 1], converted.tokenizer).heldout[None]  # (1, N)
    trained_nll, untrained_nll = heldout_nll(converted.model, heldout), heldout_nll(load(untrained).model, heldout)
    assert trained_nll < 0.98 * untrained_nll, (trained_nll, untrained_nll)
    assert summary["ppl"] == pytest.approx(math.exp(trained_nll), rel=1e-4)


def heldout_nll(model, window: torch.Tensor) -> float:
    """Mean NLL of every token of `window` (1, N) but the first, written out (fp64)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(window)[0, :-1].double(), -1)
    return float(-logp.gather(-1, window[0, 1:, None]).mean())


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
    assert (
        main(["convert", source, *common, *TRAIN, "--tokens", "640", "--eval-every", "0", "--out", str(tmp_path / "o")])
        == 0
    )
    assert len(reads) == 10  # 3 fusion + 7 continued steps of 4 rows
    num_rows = reads[0][0]
    rows = [i for _, idx in reads for i in idx]
    assert len(rows) == 40
    first_epoch = rows[:num_rows]
    assert len(set(first_epoch)) == len(first_epoch), "a row was read twice before the train split was used up"


PAIRS = [[0, 3], [1, 4], [2, 5]]  # the scattered pairs of rotated_pairs_source, in every layer


def rotated_pairs_source(path: str) -> str:
    """A native tiny source (hidden 48, 6 heads, head dim 8, 2 layers, RoPE on all dims) in which,
    in every layer, key head j of each pair (i, j) of PAIRS is key head i turned by a per-frequency-pair
    rotation (query head j's W_Q turned the same way) and value head j is an orthogonal map of value
    head i (its W_O columns mapped alike): the aligned merge of the pairs is exact, the mean is not."""
    from dha.model import ModelConfig, Transformer
    from dha.transforms import build, heads, state_dict_of, unheads
    from tests.conftest import save_tiny_source
    from tests.helpers import scaled_init_
    from tests.test_merge import pair_rotation

    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=2,
        num_heads=6,
        head_dim=HD,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    model = scaled_init_(Transformer(cfg), std=0.2, seed=0)
    sd, g = state_dict_of(model), torch.Generator().manual_seed(3)
    for l in range(2):
        pre = f"layers.{l}.attn"
        k, q = heads(sd[f"{pre}.k_proj.weight"], HD).double(), heads(sd[f"{pre}.q_proj.weight"], HD).double()
        v, o = heads(sd[f"{pre}.v_proj.weight"], HD).double(), heads(sd[f"{pre}.o_proj.weight"].double().T, HD)
        for i, j in PAIRS:
            rot = pair_rotation(torch.rand(HD // 2, generator=g, dtype=torch.float64) * 2 * torch.pi)
            k[j], q[j] = rot @ k[i], rot @ q[j]
            orth, _ = torch.linalg.qr(torch.randn(HD, HD, generator=g, dtype=torch.float64))
            v[j], o[j] = orth @ v[i], orth @ o[j]
        sd[f"{pre}.k_proj.weight"], sd[f"{pre}.q_proj.weight"] = unheads(k).float(), unheads(q).float()
        sd[f"{pre}.v_proj.weight"] = unheads(v).float()
        sd[f"{pre}.o_proj.weight"] = unheads(o).T.contiguous().float()
    return save_tiny_source(path, build(cfg, sd).eval())


def test_cli_convert_dha_tokens_zero_aligned_merges(convert_setup, capsys):
    """--tokens 0 on a source whose pairs of heads merge exactly only by the aligned merge: the
    search must find the pairs, and the saved model (3 K + 3 V heads per layer) must give the
    source's logits back (fp32, atol 1e-4); the mean merge of the same plan does not (> 1e-2)."""
    import json
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from dha.plan import Plan
    from dha.transforms import merge_groups

    tmp_path, _, common = convert_setup
    source = rotated_pairs_source(str(tmp_path / "pairs"))
    out = str(tmp_path / "dha0")
    assert main(["convert", source, *common, "--tokens", "0", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fusion_tokens"] == 0 and summary["continued_tokens"] == 0
    assert os.path.exists(os.path.join(out, "allocation.png")) and os.path.exists(os.path.join(out, "report.md"))
    plan = Plan.load(os.path.join(out, "plan.json"))
    truth = {frozenset(p) for p in PAIRS}
    for layer in plan.layers:
        assert {frozenset(g) for g in layer.key_groups} == truth and {frozenset(g) for g in layer.value_groups} == truth
    src = load(source).model
    ids = random_ids(length=12, vocab=30)
    with torch.no_grad():
        reference = src(ids)
        assert_close(load(out).model(ids), reference, atol=1e-4, rtol=0)
        assert (merge_groups(src, plan)(ids) - reference).abs().max() > 1e-2
    # The search's costs are estimated loss increases unless told not to.
    assert plan.notes["options"]["sensitivity"] and len(plan.notes["loss_increase"]["key"]) == 2
    plain = str(tmp_path / "dha0-plain")
    assert main(["convert", source, *common, "--tokens", "0", "--no-sensitivity", "--out", plain]) == 0
    plain_plan = Plan.load(os.path.join(plain, "plan.json"))
    assert not plain_plan.notes["options"]["sensitivity"] and "loss_increase" not in plain_plan.notes


def test_cli_convert_dha_too_few_tokens_exits_2_and_writes_nothing(convert_setup, capsys):
    import os

    from dha.cli import main

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "small")
    assert main(["convert", source, *common, *TRAIN, "--tokens", "100", "--out", out]) == 2
    assert "no step" in capsys.readouterr().err
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: usage line, exit 2
        main(["convert", source, *common, *TRAIN, "--tokens", "640", "--fusion-schedule", "weights", "--out", out])
    assert exit_info.value.code == 2 and not os.path.exists(out)
    no_fusion = [a for a in TRAIN if a not in ("--fusion-fraction", "0.3")]  # the default: no fusion stage
    assert (
        main(
            [
                "convert",
                source,
                *common,
                *no_fusion,
                "--tokens",
                "640",
                "--fusion-schedule",
                "ramp",
                "--freeze-maps",
                "--out",
                out,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--fusion-schedule, --freeze-maps only shape(s) the fusion stage" in err and "--fusion-fraction" in err
    assert not os.path.exists(out)


def test_anneal_reaches_the_merged_model_exactly():
    """The "anneal" schedule interpolates the heads to their merge: from ramp_end on, fused == merged."""
    from dha.fuse import FusionSchedule

    model = ours_from_hf(tiny_llama_hf(bias=True))
    fused = FusedModel(model, DECOUPLED, aligned(model), FusionOptions(schedule="anneal", ramp_end=0.5)).eval()
    schedule = FusionSchedule(fused, steps=10)
    _, merged = merge(fused)
    ids = random_ids()
    with torch.no_grad():
        schedule.set_anneal(2)  # part way: not merged yet
        assert (fused(ids) - merged(ids)).abs().max() > 1e-3
        schedule.set_anneal(5)
        assert_close(fused(ids), merged(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ramp_start, ramp_end, steps", [(0.0, 1.0, 4), (0.0, 0.5, 1), (1.0, 1.0, 4), (0.9, 0.9, 3), (0.6, 1.0, 1)]
)
def test_anneal_schedule_starts_at_the_unchanged_model_and_ends_merged(ramp_start, ramp_end, steps):
    """Step 0 (and its evaluation) is the source; after the last step the copies sit at their mean."""
    from dha.fuse import FusionSchedule

    hf = tiny_llama_hf()
    model = ours_from_hf(hf)
    options = FusionOptions(schedule="anneal", ramp_start=ramp_start, ramp_end=ramp_end)
    fused = FusedModel(model, DECOUPLED, aligned(model), options).eval()
    schedule = FusionSchedule(fused, steps=steps)
    ids = random_ids()
    with torch.no_grad():
        assert_close(fused(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)  # fp32
        for step in range(1, steps + 1):
            schedule.on_step_end(fused, step, {})
        assert fused.projections()[0][2].anneal == 1.0
        assert_close(fused(ids), merge(fused)[1](ids), atol=1e-5, rtol=0)


def test_methods_registry_dha_searches_and_merges():
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
    from dha.errors import UserError

    with pytest.raises(UserError, match="needs calibration text"):  # no data: refused before any work
        METHODS["dha"](loaded.model, 5 / 12, None, ConvertOptions())


def test_cli_convert_dha_pca_merge(convert_setup, capsys):
    import json
    import os

    from dha.cli import main

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "pca")
    assert main(["convert", source, *common, "--tokens", "0", "--merge", "pca", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["merge"] == "aligned" and summary["fusion_tokens"] == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["search"]["metric"] == "plain"
    bad = str(tmp_path / "bad")
    assert (
        main(
            ["convert", source, *common, "--tokens", "0", "--merge", "pca", "--merge-metric", "weighted", "--out", bad]
        )
        == 2
    )
    assert "--merge pca" in capsys.readouterr().err and not os.path.exists(bad)


def test_cli_convert_dha_mean_merge_is_what_summary_and_provenance_record(convert_setup, capsys):
    """--merge mean: summary.json and the checkpoint's provenance say "mean", and the fusion
    options they keep name no target of their own (there is none: the merge is what fusion moves toward)."""
    import json
    import os

    from dha.checkpoint import load
    from dha.cli import main

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "mean")
    assert main(["convert", source, *common, "--tokens", "0", "--merge", "mean", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["merge"] == "mean"
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["merge"] == "mean" and "target" not in summary["fusion"]
    provenance = load(out, tokenizer=False).provenance
    assert provenance["merge"] == "mean" and "target" not in provenance["fusion"]


def test_distillation_lowers_the_converted_models_kl_to_the_source():
    """A mean-merged tiny model trained 20 steps with distillation only (weight 1): its KL to the
    source on held-out rows, computed here from both models' logits, falls (and by a real margin)."""
    from dha.options import TrainConfig
    from dha.train import train
    from dha.transforms import merge_groups

    torch.manual_seed(0)
    source = ours_from_hf(tiny_llama_hf()).eval()
    with torch.no_grad():
        source.lm_head.weight.mul_(30.0)  # a random tiny model is near-uniform: sharpen it so the KL is real
    student = merge_groups(source, hand_plan([[0, 1, 2], [3, 4, 5]], [[0, 1, 2, 3], [4, 5]]))
    stream = random_ids(batch=1, length=21 * 64, seed=8)[0]
    heldout = random_ids(4, 16, seed=9)

    def kl(model):
        with torch.no_grad():
            p = source(heldout).log_softmax(-1)
            q = model(heldout).log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    before = kl(student)
    cfg = TrainConfig(
        tokens=20 * 64,
        block_size=16,
        batch_tokens=64,
        micro_batch=4,
        dtype="float32",
        eval_every=0,
        lr=3e-4,
        distill=True,
        distill_weight=1.0,
    )
    trained = train(student, stream, None, cfg, teacher=source, progress=False).model.eval()
    after = kl(trained)
    assert after < 0.7 * before, (before, after)


def test_cli_convert_dha_serving_layout_exports_without_padding(convert_setup, capsys):
    """--layout serving through the CLI: the written model is held by serving engines as it is."""
    import os

    from dha.checkpoint import load
    from dha.cli import main
    from dha.serving import serving_layout_problem

    tmp_path, source, common = convert_setup
    out = str(tmp_path / "serving")
    assert main(["convert", source, *common, "--tokens", "0", "--layout", "serving", "--out", out]) == 0
    assert serving_layout_problem(load(out).model.config) is None
    assert (
        main(
            [
                "convert",
                source,
                *common,
                "--tokens",
                "0",
                "--layout",
                "serving",
                "--search",
                "learned",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert not os.path.exists(tmp_path / "bad")
