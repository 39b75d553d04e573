"""The model core against independent references: Hugging Face's LlamaForCausalLM and an einsum
attention written here. All fp32 on CPU; tolerances are stated per assertion."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dha.model import ModelConfig, Transformer, next_token_nll
from dha.transforms import build, expand_to_mha, permute_query_heads, state_dict_of, with_maps
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf

ATOL = 1e-5  # fp32 logits: the tolerance every family is checked to


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_kv_heads=6),  # MHA
        dict(num_kv_heads=2),  # GQA
        dict(num_kv_heads=3, bias=True),  # q/k/v (and o) bias
        dict(num_kv_heads=6, tie=True),  # tied embeddings
        dict(num_kv_heads=1, tie=True, bias=True),  # MQA
    ],
    ids=["mha", "gqa", "bias", "tied", "mqa-bias-tied"],
)
def test_logits_equal_hf_llama(kwargs):
    hf = tiny_llama_hf(**kwargs)
    ours = ours_from_hf(hf)
    ids = random_ids(batch=2, length=20)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_logits_equal_hf_llama3_rope_scaling():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_parameters=rope,
    )
    hf = LlamaForCausalLM(config).eval()
    ours = ours_from_hf(hf)
    ids = random_ids(batch=1, length=100)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def reference_attention(x, wq, wk, wv, wo, key_index, value_index, H, hd, rope_theta):
    """Decoupled-head attention written directly from the DHA equation with einsum (no cache):
    every position attends causally to all earlier ones, one query head at a time."""
    T = x.shape[1]
    q = torch.einsum("btd,hed->bhte", x, wq.view(H, hd, -1))
    k = torch.einsum("btd,ged->bgte", x, wk.view(-1, hd, wk.shape[1]))
    v = torch.einsum("btd,ged->bgte", x, wv.view(-1, hd, wv.shape[1]))
    # RoPE, rotate-half convention, applied to q and to every key head.
    inv = 1.0 / (rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    out = torch.zeros(x.shape[0], H, T, hd)
    causal = torch.ones(T, T).tril().bool()
    for h in range(H):
        scores = torch.einsum("bte,bse->bts", q[:, h], k[:, key_index[h]]) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, h] = torch.einsum("bts,bse->bte", scores.softmax(-1), v[:, value_index[h]])
    return torch.einsum("bhte,dhe->btd", out, wo.view(wo.shape[0], H, hd))


def index_of(groups: list[list[int]], H: int = 6) -> list[int]:
    return [next(g for g, members in enumerate(groups) if h in members) for h in range(H)]


# Maps of 6 query heads (head dim 8) for every attention path: (key groups, value groups, path).
LAYOUTS = {
    # uneven (sizes 2, 3, 1 / 2, 4), scattered, K apart from V: three runs of key groups
    "decoupled-uneven": ([[0, 3], [1, 2, 5], [4]], [[0, 4], [1, 2, 3, 5]], "decoupled"),
    # equal key groups, scattered (one run of three), value groups contiguous
    "decoupled-equal": ([[0, 5], [1, 4], [2, 3]], [[0, 1, 2], [3, 4, 5]], "decoupled"),
    "coupled-uneven": ([[0, 3], [1, 2, 5], [4]], [[0, 3], [1, 2, 5], [4]], "coupled"),
    "coupled-scattered": ([[0, 5], [1, 4], [2, 3]], [[0, 5], [1, 4], [2, 3]], "coupled"),
    "gqa": ([[0, 1, 2], [3, 4, 5]], [[0, 1, 2], [3, 4, 5]], "gqa"),
}


def one_layer_model(layout: str, dtype=torch.float32) -> Transformer:
    key_groups, value_groups, _ = LAYOUTS[layout]
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=48,
        num_layers=1,
        num_heads=6,
        head_dim=8,
        intermediate_size=32,
        key_index=[index_of(key_groups)],
        value_index=[index_of(value_groups)],
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval().to(dtype)


def test_runs_and_orders_of_a_decoupled_layer():
    from dha.model import head_order, runs_of_equal_groups

    key_index = index_of([[0, 3], [1, 2, 5], [4]])  # [0, 1, 1, 0, 2, 1]
    assert head_order(key_index) == [0, 3, 1, 2, 5, 4]
    assert runs_of_equal_groups(key_index) == [(0, 1, 2, 0), (1, 2, 3, 2), (2, 3, 1, 5)]  # uneven: per kv head
    assert runs_of_equal_groups(index_of([[0, 5], [1, 4], [2, 3]])) == [(0, 3, 2, 0)]  # equal: one run


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "prefix, T",
    [(0, 1), (0, 11), (7, 1), (7, 2), (7, 4), (6, 12)],
    ids=["decode-1", "prefill-11", "cached-1", "cached-2", "cached-4", "cached-12"],
)
def test_attention_paths_equal_einsum_reference(layout, prefix, T):
    """Every path, for prefill, one token, 2-4 tokens and many tokens after a cached prefix:
    the new tokens' attention outputs equal the einsum reference over the whole sequence
    (fp32, atol 1e-5). With head dim 8, decoupled layers score up to 4 new tokens per group
    against the cache and gather the cache for more (both run here)."""
    model = one_layer_model(layout)
    attn = model.layers[0].attn
    assert attn.path == LAYOUTS[layout][2]
    assert attn.k_proj.weight.shape[0] == 8 * len(LAYOUTS[layout][0]) and attn.v_proj.weight.shape[0] == 8 * len(
        LAYOUTS[layout][1]
    )
    x = torch.randn(2, prefix + T, 48, generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, prefix + T)
    with torch.no_grad():
        if prefix:
            attn(x[:, :prefix], model.rope(torch.arange(prefix)), model.causal_mask(0, prefix, prefix, "cpu"), cache)
            cache.length = prefix
        positions = torch.arange(prefix, prefix + T)
        ours = attn(x[:, prefix:], model.rope(positions), model.causal_mask(prefix, T, prefix + T, "cpu"), cache)
        ref = reference_attention(
            x,
            attn.q_proj.weight,
            attn.k_proj.weight,
            attn.v_proj.weight,
            attn.o_proj.weight,
            model.config.key_index[0],
            model.config.value_index[0],
            6,
            8,
            10000.0,
        )
    assert_close(ours, ref[:, prefix:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["decoupled-uneven", "coupled-uneven"])
def test_bfloat16_decode_close_to_float32_reference(layout):
    """bf16 weights and cache, one token after a cached prefix of 9: within 2e-2 of the fp32
    einsum reference on the same (bf16-rounded) weights (bf16 has 8 significant bits)."""
    model = one_layer_model(layout, torch.bfloat16)
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(1)).bfloat16()
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        attn(x[:, :9], model.rope(torch.arange(9)), None, cache)
        cache.length = 9
        ours = attn(x[:, 9:], model.rope(torch.arange(9, 10)), None, cache)
        w = [p.float() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)]
        ref = reference_attention(x.float(), *w, model.config.key_index[0], model.config.value_index[0], 6, 8, 10000.0)
    assert ours.dtype == torch.bfloat16
    assert_close(ours.float(), ref[:, 9:], atol=2e-2, rtol=0)


def decoded_logits(model, ids, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time from the cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache))
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("maps", ["mha", "gqa", "uneven"])
def test_cached_decode_equals_full_forward(maps):
    hf = tiny_llama_hf(num_kv_heads=2 if maps == "gqa" else 6, bias=True)
    model = ours_from_hf(hf)
    if maps == "uneven":
        # Keep the weights of the first heads of each kind; maps decoupled and uneven.
        sd = state_dict_of(model)
        for l in range(2):
            sd[f"layers.{l}.attn.k_proj.weight"] = sd[f"layers.{l}.attn.k_proj.weight"][: 3 * 8]
            sd[f"layers.{l}.attn.k_proj.bias"] = sd[f"layers.{l}.attn.k_proj.bias"][: 3 * 8]
            sd[f"layers.{l}.attn.v_proj.weight"] = sd[f"layers.{l}.attn.v_proj.weight"][: 2 * 8]
            sd[f"layers.{l}.attn.v_proj.bias"] = sd[f"layers.{l}.attn.v_proj.bias"][: 2 * 8]
        cfg = with_maps(model.config, [[0, 1, 1, 0, 2, 1]] * 2, [[0, 0, 1, 1, 1, 1]] * 2)
        model = build(cfg, sd).eval()
    ids = random_ids(batch=2, length=16)
    with torch.no_grad():
        full = model(ids)
        stepped, cache = decoded_logits(model, ids, prefill=8)
    assert_close(stepped, full, atol=ATOL, rtol=0)
    for l in range(model.config.num_layers):
        assert cache.keys[l].shape[1] == model.config.key_heads(l)
        assert cache.values[l].shape[1] == model.config.value_heads(l)
    expected_heads = {"mha": (6, 6), "gqa": (2, 2), "uneven": (3, 2)}[maps]
    assert (cache.keys[0].shape[1], cache.values[0].shape[1]) == expected_heads
    assert cache.nbytes() == model.config.kv_bytes_per_token(torch.float32) * 2 * 16


def test_expand_and_permute_leave_logits_unchanged():
    hf = tiny_llama_hf(num_kv_heads=2, bias=True, tie=True)
    model = ours_from_hf(hf)
    ids = random_ids()
    mha = expand_to_mha(model)
    assert [mha.config.key_heads(l) for l in range(2)] == [6, 6]
    perm = permute_query_heads(mha, [[4, 0, 5, 2, 1, 3], [1, 5, 0, 3, 4, 2]])
    assert perm.config.key_index[0] == [4, 0, 5, 2, 1, 3]
    with torch.no_grad():
        reference = hf(ids).logits  # independent: HF's own GQA model
        assert_close(mha(ids), reference, atol=ATOL, rtol=0)
        assert_close(perm(ids), reference, atol=ATOL, rtol=0)
        # Permuting a GQA model directly (maps become non-contiguous: the gather path) is exact too.
        assert_close(permute_query_heads(model, [[5, 4, 3, 2, 1, 0]] * 2)(ids), reference, atol=ATOL, rtol=0)


def test_generate_greedy_matches_hf():
    hf = tiny_llama_hf(num_kv_heads=3)
    model = ours_from_hf(hf)
    from dha.model import generate

    ids = random_ids(batch=1, length=5)
    ours = generate(model, ids, max_new_tokens=6)
    theirs = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_sliding_window_mask():
    cfg = ModelConfig(
        vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, head_dim=8, intermediate_size=16, sliding_window=3
    )
    mask = Transformer(cfg).causal_mask(start=2, T=2, S=4, device="cpu")
    # Query at position 2 sees keys 0..2; at position 3 sees 1..3 (window of 3, HF/Mistral convention).
    assert mask.tolist() == [[True, True, True, False], [False, True, True, True]]


def duplicated_heads_pair(key_index, value_index, bias=True):
    """(HF MHA LlamaForCausalLM whose key head h is a copy of source head key_index[h] and value head
    h of value_index[h], our model holding only the distinct heads with those maps): the same function."""
    hf = tiny_llama_hf(bias=bias)
    compact = state_dict_of(ours_from_hf(hf))
    with torch.no_grad():
        for l, layer in enumerate(hf.model.layers):
            for proj, index, name in (
                (layer.self_attn.k_proj, key_index, "k_proj"),
                (layer.self_attn.v_proj, value_index, "v_proj"),
            ):
                n = max(index) + 1
                for suffix in ("weight", "bias"):
                    w = getattr(proj, suffix)
                    rows = w.detach().clone().view(6, 8, *w.shape[1:])
                    w.copy_(rows[index].reshape(w.shape))
                    compact[f"layers.{l}.attn.{name}.{suffix}"] = rows[:n].reshape(n * 8, *w.shape[1:]).clone()
    ours = build(with_maps(ours_from_hf(hf).config, [key_index] * 2, [value_index] * 2), compact).eval()
    return hf, ours


CHUNKED = {  # name -> (HF reference, our model)
    "gqa": lambda: (lambda hf: (hf, ours_from_hf(hf)))(tiny_llama_hf(num_kv_heads=2, bias=True)),
    "coupled-uneven": lambda: duplicated_heads_pair([0, 1, 1, 0, 2, 1], [0, 1, 1, 0, 2, 1]),
    "decoupled-uneven": lambda: duplicated_heads_pair([0, 1, 1, 0, 2, 1], [0, 0, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunks_of_2_to_4_tokens_after_a_cached_prefix_equal_transformers(name, monkeypatch):
    """Prefill 7 tokens, then feed chunks of 2, 3 and 4 tokens from the cache: every chunk takes the
    grouped path (batched matmuls on the cache, a causal mask inside the chunk), and the logits of
    all 16 positions equal transformers' full forward of an MHA model holding each head's copy
    (fp32, atol 1e-5). Decoupled layers take it up to hd / 2 = 4 new tokens."""
    from dha.model import Attention

    hf, ours = CHUNKED[name]()
    calls = []
    grouped = Attention.attend_grouped
    monkeypatch.setattr(
        Attention, "attend_grouped", lambda self, q, *a: calls.append(q.shape[2]) or grouped(self, q, *a)
    )
    ids = random_ids(batch=2, length=16, seed=4)
    with torch.no_grad():
        reference = hf(ids).logits
        cache = ours.new_cache(2, 16)
        out, start = [ours(ids[:, :7], cache)], 7
        for T in (2, 3, 4):
            out.append(ours(ids[:, start : start + T], cache))
            start += T
    assert calls == [2, 2, 3, 3, 4, 4]  # two layers per chunk; the prefill took SDPA
    assert_close(torch.cat(out, 1), reference, atol=ATOL, rtol=0)


def test_chunks_after_a_cached_prefix_with_a_sliding_window_equal_transformers():
    """Mistral, window 5: chunks of 4 tokens after 4 cached ones mask keys both before the window
    and after each query (grouped path); logits equal transformers' full forward (fp32, atol 1e-5)."""
    from tests.test_families import CASES

    hf = CASES["mistral"]()
    ours = ours_from_hf(hf)
    assert ours.config.sliding_window == 5
    ids = random_ids(batch=2, length=16, seed=5)
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        out = [ours(ids[:, :4], cache)] + [ours(ids[:, s : s + 4], cache) for s in (4, 8, 12)]
        assert_close(torch.cat(out, 1), hf(ids).logits, atol=ATOL, rtol=0)


def test_cli_generate_greedy_equals_transformers_generate(tmp_path, capsys, monkeypatch):
    """`dha generate` on a saved HF directory (GQA, biases; character tokenizer): its greedy
    completion is the text of transformers' own greedy generate of the same 12 new tokens."""
    import json

    from dha.cli import main
    from tests.test_family_workflows import char_tokenizer

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    hf, tok = tiny_llama_hf(num_kv_heads=3, bias=True), char_tokenizer()
    hf.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    prompt = "def f(x): return"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    hf.generation_config.eos_token_id = None  # dha generate decodes exactly --max-new-tokens tokens
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert theirs.numel() == 12 and len(set(theirs.tolist())) > 1  # a completion that can differ
    assert main(["generate", str(tmp_path / "src"), "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt"] == prompt
    assert out["completion"] == tok.decode(theirs, skip_special_tokens=True)


def test_next_token_nll_per_row_equals_transformers_loss():
    """Each row's summed NLL equals transformers' own shifted LM loss on that row times its W - 1
    predictions (fp32 models, rtol 1e-5): the loss perplexity and the held-out evaluation share."""
    hf = tiny_llama_hf(num_kv_heads=2)
    ours = ours_from_hf(hf)
    rows = random_ids(batch=3, length=12, vocab=hf.config.vocab_size, seed=4)
    with torch.no_grad():
        got = next_token_nll(ours, rows)
        want = torch.stack([hf(row[None], labels=row[None]).loss * (rows.shape[1] - 1) for row in rows])
    assert got.shape == (3,) and got.dtype == torch.float32
    assert_close(got, want, rtol=1e-5, atol=0)


def test_next_token_nll_in_chunks_equals_the_full_logits(monkeypatch):
    """Our model's logits are made a few positions at a time (dha.model.NLL_CHUNK_BYTES): the per-row
    NLL equals cross-entropy over the full (b, W-1, V) logits, computed here (fp32, rtol 1e-6)."""
    import torch.nn.functional as F

    import dha.model

    hf = tiny_llama_hf(num_kv_heads=2)
    ours = ours_from_hf(hf)
    rows = random_ids(batch=3, length=12, vocab=hf.config.vocab_size, seed=5)
    monkeypatch.setattr(dha.model, "NLL_CHUNK_BYTES", 4 * hf.config.vocab_size * 5)  # 5 positions a chunk
    calls = []
    real_head = ours.lm_head.forward
    monkeypatch.setattr(ours.lm_head, "forward", lambda x: calls.append(x.shape[0]) or real_head(x))
    with torch.no_grad():
        got = next_token_nll(ours, rows)
        logits = real_head(ours.features(rows[:, :-1]))
        want = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(3, -1).sum(1)
    assert max(calls) == 5 and sum(calls) == 3 * 11  # chunks of 5 positions, every position once
    assert_close(got, want, rtol=1e-6, atol=0)
