"""dha.lm_eval_adapter against references computed here from the model's own logits (fp32 model,
fp64 references): loglikelihood (and a task through `dha eval --tasks`), loglikelihood_rolling over
lm-eval's rolling windows, generate_until (left truncation, `until` strings, EOS), and that scoring
never builds a float32 log-softmax of a whole batch. Tiny models (hidden 48, 2 layers, vocab 300)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dha.checkpoint import save
from dha.cli import main
from tests.test_evaluate import CLI_FAST, loaded_tiny, write_text_data

pytest.importorskip("lm_eval")
from dha.lm_eval_adapter import DHALM, target_logprobs  # noqa: E402  (needs lm_eval)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))


# ---- loglikelihood ----------------------------------------------------------------------------

MC_ROWS = [
    {"question": "The cat sat on the", "choices": [" mat", " dog", " world"], "label": 0},
    {"question": "Hello", "choices": [" world", " cat"], "label": 1},
    {"question": "Document number 3 talks", "choices": [" about", " the", " second line"], "label": 2},
    {"question": "It has a second", "choices": [" line", " cat"], "label": 0},
]


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's rule, written out: encode context+continuation, the continuation is the tokens after
    the context's; sum log-softmax over those positions, one position at a time, fp64."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0].double()  # (T-1, V)
    return sum(torch.log_softmax(logits[t - 1], -1)[whole[t]].item() for t in range(n_context, len(whole)))


def test_lm_eval_task_matches_hand_computation(tmp_path, capsys):
    loaded = loaded_tiny()
    lm = DHALM(loaded, batch_size=3, progress=False)
    requests, expected = [], []
    for row in MC_ROWS:
        for choice in row["choices"]:
            ctx, cont = lm._encode_pair(row["question"], choice)
            requests.append(((row["question"], choice), ctx, cont))
            expected.append(hand_loglikelihood(loaded.model, loaded.tokenizer, row["question"], choice))
    got = [lp for lp, _ in lm._loglikelihood_tokens(requests)]  # batches of 3 mixed lengths, right-padded
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )  # fp32 model vs fp64 sum

    # The same through a local task YAML and the CLI.
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MC_ROWS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    it = iter(expected)
    scores = [[next(it) for _ in row["choices"]] for row in MC_ROWS]
    acc = sum(max(range(len(s)), key=s.__getitem__) == row["label"] for s, row in zip(scores, MC_ROWS)) / len(MC_ROWS)
    path = str(tmp_path / "ckpt")
    save(path, loaded)
    text = write_text_data(tmp_path)
    assert (
        main(["eval", path, "--data", text, "--json", "--tasks", "tiny_mc", "--include-path", str(tasks), *CLI_FAST])
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tasks"]["tiny_mc"]["acc"] == pytest.approx(acc)


def test_target_logprobs_equal_log_softmax_at_the_targets():
    """logit[target] - chunked logsumexp == log_softmax(...)[target] (fp64 reference, rtol 1e-6),
    also for bf16 logits (computed in float32) and a chunk that does not divide the rows."""
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 50, generator=g) * 5, torch.randint(0, 50, (7,), generator=g)
    for x in (logits, logits.bfloat16()):
        reference = torch.log_softmax(x.double(), -1).gather(-1, targets[:, None])[:, 0]
        got = target_logprobs(x, targets, rows=3)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-6)


class LargestNewTensor(TorchFunctionMode):
    """The most elements of any tensor a torch call creates (views of an input excluded), outside `paused`."""

    def __init__(self):
        super().__init__()
        self.largest, self.paused = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.numel())
        return out


def test_scoring_never_builds_a_log_softmax_of_the_batch():
    """Besides the model's own logits, scoring 3 requests of up to 14 tokens (vocab 300) in one
    batch creates no tensor larger than logit_rows x V (2 x 300): the old adapter's float32
    log-softmax of the whole (3, 13, 300) batch would be 11,700."""
    lm = DHALM(loaded_tiny(), batch_size=3, progress=False, logit_rows=2)
    mode = LargestNewTensor()
    forward = lm.model.forward

    def unwatched(*args, **kwargs):  # the model's logits are not the adapter's to save
        mode.paused = True
        try:
            return forward(*args, **kwargs)
        finally:
            mode.paused = False

    lm.model.forward = unwatched
    pairs = [
        (list(range(5, 10)), list(range(20, 26))),
        (list(range(30, 38)), [40, 41, 42, 43, 44, 45]),
        ([7], [8, 9, 10]),
    ]
    with mode:
        got = lm.score(pairs)
    del lm.model.forward
    assert 0 < mode.largest <= 2 * 300
    expected = [hand_tokens_loglikelihood(lm.model, c, x) for c, x in pairs]
    torch.testing.assert_close(
        torch.tensor([lp for lp, _ in got], dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def hand_tokens_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    whole = context + continuation
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole)))


# ---- loglikelihood_rolling ----------------------------------------------------------------------


def rolling_reference(model, tokens: list[int], prefix: int, L: int) -> float:
    """Every token scored once, in blocks of L: block [a, b) is predicted by the L inputs that end just
    before its last token, in y = [prefix] + tokens: y[max(0, b - L) : b] (fp64 log-softmax)."""
    y, total = [prefix] + tokens, 0.0
    for a in range(0, len(tokens), L):
        b = min(a + L, len(tokens))
        inputs = y[max(0, b - L) : b]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), -1)
        for k, t in enumerate(range(a, b)):
            total += logp[len(inputs) - (b - a) + k, tokens[t]].item()
    return total


def test_loglikelihood_rolling_against_windows_written_here():
    """A document of 3+ windows of 8 tokens (max_length 8) and a short one (one window): sums of
    log p over every token, conditioned on the prefix token (BOS, else EOS) and at most 8 inputs."""
    loaded = loaded_tiny()
    lm = DHALM(loaded, batch_size=2, max_length=8, progress=False)
    docs = ["Document number 3 talks about the cat 21 times. It has a second line 3. Document number 5.", "Hello cat"]
    tokens = [loaded.tokenizer.encode(d, add_special_tokens=False) for d in docs]
    assert len(tokens[0]) > 3 * 8 and len(tokens[0]) % 8 and len(tokens[1]) < 8  # a last, partial window
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(d,)) for d in docs])
    prefix = loaded.tokenizer.eos_token_id  # tiny_tokenizer has no BOS
    for g, t in zip(got, tokens):
        assert g == pytest.approx(rolling_reference(loaded.model, t, prefix, 8), rel=1e-5, abs=1e-5)  # fp32 model


# ---- generate_until ---------------------------------------------------------------------------


def greedy_reference(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy tokens by full recompute (no cache), stopping before EOS."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return new


def counted_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    return calls


def test_generate_until_keeps_the_last_tokens_of_a_long_context():
    """max_length 16, 6 new tokens: a 30-token context keeps its last 10 tokens (left truncation)."""
    loaded = loaded_tiny()
    lm = DHALM(loaded, max_length=16, progress=False)
    context = "Document number 7 talks about the cat 49 times. It has a second line"
    ids = loaded.tokenizer.encode(context, add_special_tokens=False)
    assert len(ids) > 16
    eos, tok = loaded.tokenizer.eos_token_id, loaded.tokenizer
    last, first = greedy_reference(loaded.model, ids[-10:], 6, eos), greedy_reference(loaded.model, ids[:10], 6, eos)
    assert tok.decode(last) != tok.decode(first)  # keeping the wrong end would be seen
    got = lm.generate_until([SimpleNamespace(args=(context, {"until": [], "max_gen_toks": 6}))])
    assert got == [tok.decode(last, skip_special_tokens=True)]


def test_generate_until_stops_at_the_until_string_and_at_eos():
    loaded = loaded_tiny()
    tok, model = loaded.tokenizer, loaded.model
    context = "The cat sat on the"
    ids = tok.encode(context, add_special_tokens=False)
    free = greedy_reference(model, ids, 12, tok.eos_token_id)
    assert len(free) == 12 and len(set(free[:4])) > 1
    text = tok.decode(free)
    # `until`: a piece of the free-running text; decoding stops once the text holds it, cut before it.
    k = next(
        k
        for k in range(2, 8)
        if tok.decode(free[:k]) != tok.decode(free[: k - 1]) and tok.decode(free[k - 1 : k]).strip()
    )
    stop = tok.decode(free[k - 1 : k])
    cut = text[: text.index(stop)]
    calls = counted_forwards(model)
    got = DHALM(loaded, progress=False).generate_until(
        [SimpleNamespace(args=(context, {"until": [stop], "max_gen_toks": 12}))]
    )
    assert got == [cut] and stop not in got[0]
    assert len(calls) <= k  # the prefill and at most k - 1 decode steps, not 12
    # EOS: make the 4th free-running token the tokenizer's EOS; the text ends before it.
    assert free[3] not in free[:3]
    tok.eos_token = tok.convert_ids_to_tokens(free[3])
    assert tok.eos_token_id == free[3]
    got = DHALM(loaded, progress=False).generate_until(
        [SimpleNamespace(args=(context, {"until": ["@@"], "max_gen_toks": 12}))]
    )
    assert got == [tok.decode(free[:3], skip_special_tokens=True)]


# ---- RULER (lm-eval's synthetic long-context tasks), offline ------------------------------------


def test_ruler_niah_single_1_runs_offline_through_the_adapter(monkeypatch):
    """niah_single_1 at 768 tokens (max_length 16, raised to fit them), 2 samples, with no network
    (sockets and nltk.download refuse): the prompts are built with the model's own tokenizer (each
    fits 768 tokens of it with the 128 to generate, and reaches the model uncut), generated from the
    KV cache, and scored by lm-eval's string match on what the adapter returned: sample 0's answer is
    made right by appending its needle's value, so the score is (1 + hit of sample 1) / 2."""
    pytest.importorskip("wonderwords", reason='RULER needs lm-eval[ruler]: pip install "lm-eval[ruler]"')
    nltk = pytest.importorskip("nltk", reason='RULER needs lm-eval[ruler]: pip install "lm-eval[ruler]"')
    import re
    import socket

    from dha.lm_eval_adapter import run_tasks

    def no_network(*args, **kwargs):
        raise AssertionError("RULER offline tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(nltk, "download", no_network)
    loaded, seen, env = loaded_tiny(), [], dict(os.environ)
    real = DHALM.greedy_until

    def spy(self, ids, max_new, until):
        text = real(self, ids, max_new, until)  # the real greedy decoding, from the KV cache
        value = re.search(r"for (\S+) is: (\d+)\.", self.tokenizer.decode(ids)).group(2)
        text = text + " " + value if not seen else text
        seen.append((ids, max_new, value, text))
        return text

    monkeypatch.setattr(DHALM, "greedy_until", spy)
    got = run_tasks(
        loaded, ["niah_single_1"], limit=2, max_length=16, progress=False, task_metadata='{"max_seq_lengths": [768]}'
    )
    assert len(seen) == 2 and [m for _, m, _, _ in seen] == [128, 128]
    for ids, _, value, _ in seen:
        prompt = loaded.tokenizer.decode(ids)
        assert prompt.startswith("A special magic number is hidden") and value in prompt  # uncut: the whole prompt
        question = prompt[: prompt.index("What is the special magic number")]
        assert len(loaded.tokenizer.encode(question)) + 128 <= 768  # sized with this tokenizer
    hits = [value in text for _, _, value, text in seen]
    assert got == {"niah_single_1": {"sample_len": 2, "768": pytest.approx(sum(hits) / 2)}} and hits[0]
    assert dict(os.environ) == env  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE only for the run


def test_ruler_missing_pieces_are_one_line_user_errors(monkeypatch):
    """What RULER cannot do offline is refused before lm-eval runs, each with what to do."""
    import sys

    from dha.errors import UserError
    from dha.lm_eval_adapter import RULER_OFFLINE, run_tasks

    loaded = loaded_tiny()
    monkeypatch.setitem(sys.modules, "wonderwords", None)  # as if lm-eval[ruler] were not installed
    with pytest.raises(UserError, match=r'wonderwords: pip install "lm-eval\[ruler\]"'):
        run_tasks(loaded, ["niah_single_1"], limit=1)
    monkeypatch.delitem(sys.modules, "wonderwords")
    for task in ("niah_single_2", "ruler_qa_squad", "ruler"):
        with pytest.raises(UserError, match="needs a download .* does not run offline") as e:
            run_tasks(loaded, [task], limit=1)
        assert ", ".join(RULER_OFFLINE) in str(e.value) and "\n" not in str(e.value)
    for metadata, message in [
        ('{"max_seq_lengths": 768}', "list of positive"),
        ('{"max_seq_lengths": [true]}', "list of positive"),
        ('{"tokenizer": "gpt2"}', "own tokenizer"),
        ("{max_seq_lengths: [768]}", "not JSON"),
        ("[768]", "JSON object"),
    ]:
        with pytest.raises(UserError, match=message):
            run_tasks(loaded, ["niah_single_1"], limit=1, task_metadata=metadata)
