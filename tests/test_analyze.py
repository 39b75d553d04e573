"""Head similarity, clustering and the `analyze` verb, against independent references (fp32/fp64, CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dha.analyze import analyze, cluster, collect_heads, cosine_similarity, linear_cka, write_report
from dha.cli import main
from tests.conftest import ours_from_hf, random_ids, save_tiny_source, text_file, tiny_llama_hf  # noqa: F401


def tiny_source(path: str, hf=None) -> str:
    """A native checkpoint of a tiny LLaMA with a word-level tokenizer built here (no hub)."""
    return save_tiny_source(path, ours_from_hf(hf if hf is not None else tiny_llama_hf()))


def duplicated_heads_hf():
    """Tiny 6-head MHA whose key and value head 3 are copies of head 0 (layer 0 and 1)."""
    hf = tiny_llama_hf()
    hd = 8
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[3 * hd : 4 * hd] = proj.weight[0:hd]
    return hf


# ---- similarity measures against references ------------------------------------------------------


def test_cosine_matches_torch_reference():
    x = torch.randn(50, 4, 8, dtype=torch.float64)
    ref = torch.tensor(
        [
            [
                float(torch.nn.functional.cosine_similarity(x[:, i].flatten(), x[:, j].flatten(), dim=0))
                for j in range(4)
            ]
            for i in range(4)
        ]
    )
    assert_close(cosine_similarity(x), ref.float(), atol=1e-6, rtol=0)  # fp32 output


def _cka_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Kornblith et al. 2019 linear CKA through Gram matrices and the centring matrix H (HSIC form)."""
    n = a.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = a @ a.T, b @ b.T

    def hsic(P, Q):
        return np.trace(P @ H @ Q @ H)

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_linear_cka_matches_gram_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, generator=g, dtype=torch.float64)
    x[:, 2] = (
        x[:, 0] @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0] * 3 + 1
    )  # rotated, scaled, shifted copy
    a = x.numpy()
    ref = torch.tensor([[_cka_reference(a[:, i], a[:, j]) for j in range(3)] for i in range(3)])
    got = linear_cka(x)
    assert_close(got, ref.float(), atol=1e-6, rtol=0)
    assert got[0, 2] == pytest.approx(1.0, abs=1e-6)  # CKA is invariant to orthogonal maps, scale and shifts


def test_collect_heads_match_hf_projections():
    """Our pre-RoPE heads equal the outputs of HF's own q/k/v projections (GQA source, biases)."""
    hf = tiny_llama_hf(num_kv_heads=3, bias=True)
    ours = ours_from_hf(hf)
    ids = random_ids(5, 12)
    captured = {}
    hooks = [
        getattr(hf.model.layers[1].self_attn, f"{n}_proj").register_forward_hook(
            lambda m, i, o, n=n: captured.setdefault(n, []).append(o)
        )
        for n in "qkv"
    ]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    got = collect_heads(ours, ids, batch_size=2)[1]
    for n, name, heads in (("q", "queries", 6), ("k", "keys", 3), ("v", "values", 3)):
        ref = captured[n][0].reshape(-1, heads, 8)  # (B*T, n, hd): HF's projection output, per head
        assert_close(got[name], ref, atol=1e-6, rtol=0)
    sub = collect_heads(ours, ids, batch_size=2, max_tokens=17, seed=3)[1]["keys"]
    assert sub.shape == (17, 3, 8)
    rows = [(got["keys"] == row).all(dim=(1, 2)).nonzero().flatten().tolist() for row in sub]
    assert all(len(r) >= 1 for r in rows)  # a subset of the tokens, not something else


def test_cluster_groups_blocks_deterministically():
    sim = torch.full((6, 6), 0.1)
    for group in ([0, 4], [1, 2, 5], [3]):
        for i in group:
            for j in group:
                sim[i, j] = 0.9
    sim.fill_diagonal_(1.0)
    assert cluster(sim, 3) == [[0, 4], [1, 2, 5], [3]]
    assert cluster(sim, 6) == [[h] for h in range(6)]
    assert cluster(sim, 1) == [list(range(6))]
    with pytest.raises(ValueError):
        cluster(sim, 7)


# ---- the whole analysis --------------------------------------------------------------------------


def test_analyze_finds_identical_heads_and_writes_report(tmp_path):
    hf = duplicated_heads_hf()
    model = ours_from_hf(hf)
    ids = random_ids(6, 16)
    result = analyze(model, ids, metric="cka", threshold=0.99)
    # Reference: every layer's key and value heads as transformers' own k_proj / v_proj emit them
    # in HF's forward (fp32), and their similarities computed here pair by pair in fp64: torch's
    # cosine of the flattened heads, and CKA in the Gram/HSIC form (_cka_reference).
    captured = {}
    hooks = [
        getattr(layer.self_attn, f"{kind[0]}_proj").register_forward_hook(
            lambda m, i, o, key=(l, kind): captured.__setitem__(key, o.reshape(-1, 6, 8).double())
        )
        for l, layer in enumerate(hf.model.layers)
        for kind in ("keys", "values")
    ]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    files = write_report(result, str(tmp_path))
    for name in files:
        assert os.path.getsize(tmp_path / name) > 0
    assert (tmp_path / "heatmaps" / "layer_01.png").exists() and (tmp_path / "redundancy.png").exists()
    with open(tmp_path / "analysis.json") as f:
        saved = json.load(f)
    for entry in saved["layers"]:
        for kind in ("keys", "values"):
            for metric in ("cosine", "cka"):
                m = torch.tensor(entry[kind][metric], dtype=torch.float64)
                x = captured[(entry["layer"], kind)]  # (B*T, 6, 8)
                if metric == "cosine":
                    ref = [
                        [
                            torch.nn.functional.cosine_similarity(x[:, i].flatten(), x[:, j].flatten(), dim=0).item()
                            for j in range(6)
                        ]
                        for i in range(6)
                    ]
                else:
                    ref = [[_cka_reference(x[:, i].numpy(), x[:, j].numpy()) for j in range(6)] for i in range(6)]
                # fp32 activations (ours vs HF's), fp64 reference, JSON rounded to 6 decimals: atol 1e-5
                assert_close(
                    m,
                    torch.tensor(ref, dtype=torch.float64),
                    atol=1e-5,
                    rtol=0,
                    msg=lambda e, l=entry["layer"], k=kind, mt=metric: f"layer {l} {k} {mt}: {e}",
                )
                assert m[0, 3] == pytest.approx(1.0, abs=1e-5)
            assert [0, 3] in entry[kind]["clusters"]["5"]
            assert entry[kind]["groups_needed"] == 5  # only the copies are that similar


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_analyze(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    src = tiny_source(str(tmp_path / "src"), duplicated_heads_hf())
    data = text_file(str(tmp_path / "d.txt"))
    out = tmp_path / "an"
    assert (
        main(["analyze", src, "--data", data, "--out", str(out), "--calib-tokens", "256", "--calib-block-size", "32"])
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["calibration_tokens"] == 256 and last["key_groups_needed"] == [5, 5]
    assert (out / "analysis.json").stat().st_size > 0 and (out / "heatmaps" / "layer_00.png").stat().st_size > 0


@pytest.mark.parametrize("extra", [["--metric", "euclid"], ["--calib-tokens", "0"], ["--data", "missing.txt"]])
def test_cli_analyze_bad_input_writes_nothing(tmp_path, monkeypatch, extra):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    src = tiny_source(str(tmp_path / "src"))
    data = text_file(str(tmp_path / "d.txt"))
    out = tmp_path / "an"
    argv = ["analyze", src, "--data", data, "--out", str(out), *extra]
    if extra[0] == "--metric":  # an enum flag: argparse's choices (usage line, exit 2)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == 2
    assert not out.exists()
