"""Long-context quality: perplexity by position in long windows, and passkey retrieval through the KV cache.

A smaller KV cache pays at long contexts, so what a conversion keeps must be measured there too:

- Perplexity by position (`position_nll`, `by_position`): windows of `window` tokens cut from a
  token stream (non-overlapping, `dha.data.blocks`); the token at index t of a window (t >= 1) is
  predicted from the t tokens before it in the same window. The mean NLL at each index over the
  windows, then per bucket of indices (POSITION_EDGES: 0-256, 256-1k, 1k-2k, 2k-4k, 4k-8k, ...).
  A model that reads its context well gets lower loss further in; a merge that breaks long-range
  attention shows as a ratio to the source that grows with position.
- Passkey retrieval (`passkey_prompts`, `retrieval`): a needle naming a five-digit key (NEEDLE)
  inside a long haystack at a depth (share of the haystack before it), then "What is the pass
  key? The pass key is". The model continues greedily through its KV cache (`dha.model.generate`:
  a prefill, then one token at a time); a prompt is found when the continuation contains the key.
  The haystack is either synthetic filler (the sentences of Mohtashami & Jaggi 2023, repeated) or
  a token stream of the user's own text (a different slice for every prompt). Prompts are built in
  token ids: with its answer a prompt fills exactly its length, and the same ids go to every model
  (and to llama.cpp, `benchmarks/long_context_llama_cpp.py`).
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field

import torch

from .data import blocks
from .errors import UserError
from .model import generate, token_nll

POSITION_EDGES = (0, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
HAYSTACKS = ("synthetic", "text")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


# ---- perplexity by position ---------------------------------------------------------------------


def position_edges(window: int) -> list[int]:
    """Bucket edges of target indices 1..window-1: POSITION_EDGES below `window`, then `window`."""
    return [e for e in POSITION_EDGES if e < window] + [window]


@torch.no_grad()
def position_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> torch.Tensor:
    """(W-1,) float64: the mean NLL (nats) of the token at index t = 1..W-1 over `windows` (n, W),
    each predicted from the t tokens before it in its own window (`dha.model.token_nll`)."""
    from tqdm.auto import tqdm

    here = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(
        starts,
        desc=f"perplexity by position ({windows.shape[1]} tokens)",
        unit="batch",
        disable=not progress,
        file=sys.stderr,
    ):
        total += token_nll(model, windows[s : s + batch_size].to(here)).double().sum(0).cpu()
    return total / windows.shape[0]


def by_position(nll: torch.Tensor, windows: int) -> list[dict]:
    """Per bucket of target indices [start, end): mean NLL, perplexity and tokens scored.

    `nll` is `position_nll`'s (W-1,) (index t at nll[t - 1]); `windows` how many it averages."""
    edges = position_edges(nll.numel() + 1)
    out = []
    for start, end in zip(edges, edges[1:]):
        part = nll[max(start, 1) - 1 : end - 1]
        mean = part.mean().item()
        out.append({"start": start, "end": end, "nll": mean, "ppl": math.exp(mean), "tokens": part.numel() * windows})
    return out


def long_windows(stream: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """`count` non-overlapping windows of `window` tokens from the start of `stream` (fewer when it
    ends first); UserError when it holds not even one."""
    if stream.numel() < window:
        raise UserError(
            f"the held-out text has {stream.numel()} tokens, fewer than one long-context window of {window}: "
            "use a longer text (--data) or a shorter --long-context"
        )
    return blocks(stream, window, max_blocks=count)


def position_report(model, stream: torch.Tensor, window: int, count: int, progress: bool = True) -> dict:
    """Perplexity by position of `model` over `count` windows of `window` tokens of `stream`."""
    windows = long_windows(stream, window, count)
    nll = position_nll(model, windows, progress=progress)
    return {
        "window": window,
        "windows": windows.shape[0],
        "buckets": by_position(nll, windows.shape[0]),
        "nll_by_index": [round(v, 5) for v in nll.tolist()],
    }


def position_ratios(result: dict, base: dict) -> list[float]:
    """Perplexity ratio to `base`, bucket by bucket (same window and buckets)."""
    return [r["ppl"] / b["ppl"] for r, b in zip(result["buckets"], base["buckets"])]


# ---- passkey retrieval ---------------------------------------------------------------------------


@dataclass
class RetrievalOptions:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])  # prompt tokens
    depths: int = 5  # needle depths, evenly from `first_depth` to 1 - `first_depth` of the haystack
    per_depth: int = 4  # prompts (keys) per depth and length: depths * per_depth prompts per length
    first_depth: float = 0.08
    haystack: str = "synthetic"  # "synthetic" (repeated filler) | "text" (slices of a token stream)
    new_tokens: int = 16  # greedy tokens generated after the question
    batch_size: int = 4  # prompts per prefill
    seed: int = 0  # the keys

    def validate(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise UserError(f"--haystack must be one of {', '.join(HAYSTACKS)}, got {self.haystack!r}")
        if not self.lengths or min(self.lengths) < 64:
            raise UserError(f"retrieval prompt lengths must be at least 64 tokens, got {self.lengths}")
        if self.depths < 1 or self.per_depth < 1 or self.new_tokens < 1 or self.batch_size < 1:
            raise UserError("retrieval depths, prompts per depth, new tokens and batch size must be at least 1")
        if not 0.0 <= self.first_depth <= 0.5:
            raise UserError(f"the first needle depth must be in [0, 0.5], got {self.first_depth}")

    def depth_values(self) -> list[float]:
        if self.depths == 1:
            return [0.5]
        step = (1 - 2 * self.first_depth) / (self.depths - 1)
        return [round(self.first_depth + i * step, 4) for i in range(self.depths)]


@dataclass
class Prompt:
    ids: list[int]  # exactly `length - new_tokens` token ids: with the answer, the context holds `length`
    key: str  # the five digits the answer must contain
    length: int
    depth: float  # share of the haystack before the needle


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _haystack(tokenizer, n: int, stream: torch.Tensor | None, offset: int) -> list[int]:
    """n filler token ids: the synthetic filler repeated, or `stream` read from `offset` (cyclically)."""
    if stream is None:
        unit = _ids(tokenizer, FILLER)
        return (unit * (n // len(unit) + 1))[:n]
    ids = stream.tolist() if stream.numel() >= n else (stream.tolist() * (n // stream.numel() + 1))
    start = offset % max(1, len(ids) - n + 1)
    return ids[start : start + n]


def passkey_prompts(tokenizer, options: RetrievalOptions, stream: torch.Tensor | None = None) -> list[Prompt]:
    """depths * per_depth prompts per length: intro, haystack with the needle at its depth, question,
    in exactly `length - new_tokens` tokens, so that with its answer the context is `length` tokens
    (a model of 8,192 positions is asked at 8,192). `stream` is the text haystack (haystack "text")."""
    if options.haystack == "text" and (stream is None or stream.numel() == 0):
        raise UserError("a text haystack needs held-out text")
    rng = random.Random(options.seed)
    intro, question = _ids(tokenizer, INTRO), _ids(tokenizer, QUESTION)
    prompts = []
    for length in options.lengths:
        for depth in options.depth_values():
            for i in range(options.per_depth):
                key = str(rng.randint(10000, 99999))
                needle = _ids(tokenizer, NEEDLE.format(key=key))
                fill = length - options.new_tokens - len(intro) - len(needle) - len(question)
                if fill < 1:
                    raise UserError(f"a retrieval prompt of {length} tokens has no room for a haystack")
                hay = _haystack(
                    tokenizer, fill, stream if options.haystack == "text" else None, offset=rng.randrange(1 << 30)
                )
                before = round(depth * fill)
                prompts.append(Prompt(intro + hay[:before] + needle + hay[before:] + question, key, length, depth))
    return prompts


@torch.no_grad()
def answers(model, tokenizer, prompts: list[Prompt], options: RetrievalOptions, progress: bool = True) -> list[str]:
    """The greedy continuation of every prompt (`options.new_tokens` tokens through the KV cache)."""
    from tqdm.auto import tqdm

    here = next(model.parameters()).device
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="passkey retrieval", unit="prompt", disable=not progress, file=sys.stderr)
    i = 0
    while i < len(prompts):
        same = [p for p in prompts[i : i + options.batch_size] if p.length == prompts[i].length]
        ids = torch.tensor([p.ids for p in same], device=here)
        new = generate(model, ids, options.new_tokens)[:, ids.shape[1] :]
        out += [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new]
        i += len(same)
        bar.update(len(same))
    bar.close()
    return out


def score(prompts: list[Prompt], replies: list[str], options: RetrievalOptions) -> dict:
    """Found counts per length and depth: found[length][depth index] of `per_depth`."""
    depths = options.depth_values()
    found = {str(n): [0] * len(depths) for n in options.lengths}
    for p, reply in zip(prompts, replies):
        found[str(p.length)][depths.index(p.depth)] += p.key in reply
    per_length = {n: sum(v) for n, v in found.items()}
    return {
        "lengths": options.lengths,
        "depths": depths,
        "per_cell": options.per_depth,
        "haystack": options.haystack,
        "found": found,
        "found_per_length": per_length,
        "prompts_per_length": len(depths) * options.per_depth,
        "examples": [
            {"length": p.length, "depth": p.depth, "key": p.key, "reply": r} for p, r in zip(prompts, replies)
        ],
    }


# ---- which heads retrieve -------------------------------------------------------------------------


def needle_span(tokenizer, prompt: Prompt) -> list[int]:
    """Positions of the key's digits where the needle first states them."""
    for text in (prompt.key, " " + prompt.key):  # tokenised alone or with its leading space
        digits = _ids(tokenizer, text)
        for i in range(len(prompt.ids) - len(digits) + 1):
            if prompt.ids[i : i + len(digits)] == digits:
                return list(range(i, i + len(digits)))
    raise UserError(f"the key {prompt.key} is not found in its own prompt's tokens")


def needle_attention(model, tokenizer, length: int = 2048, prompts: int = 5, progress: bool = True) -> torch.Tensor:
    """(layers, query heads): the attention probability the last position of a passkey prompt (where
    the answer starts) puts on the needle's digits, averaged over `prompts` synthetic prompts at depths
    from 8% to 92%. Retrieval heads (Wu et al. 2024) put much of it there; most heads almost none."""
    return needle_attention_by_depth(model, tokenizer, length, prompts, progress).mean(0)


@torch.no_grad()
def needle_attention_by_depth(
    model, tokenizer, length: int = 2048, depths: int = 5, progress: bool = True, per_depth: int = 1
) -> torch.Tensor:
    """(depths, layers, query heads): `needle_attention` of the prompts at each of `depths` depths from
    8% to 92% (`per_depth` each, averaged), apart, so that a needle far back can be told from one near
    the question."""
    from tqdm.auto import tqdm

    cfg = model.config
    options = RetrievalOptions(lengths=[length], depths=depths, per_depth=per_depth)
    mass = torch.zeros(depths, cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    captured: dict[int, tuple] = {}
    for l, block in enumerate(model.layers):  # read each layer's queries and keys after RoPE
        block.attn.attend = _capture(captured, l, block.attn.attend)
    try:
        bar = tqdm(
            passkey_prompts(tokenizer, options),
            desc="needle attention",
            unit="prompt",
            disable=not progress,
            file=sys.stderr,
        )
        for i, p in enumerate(bar):
            span = needle_span(tokenizer, p)
            model(torch.tensor([p.ids], device=next(model.parameters()).device), last_only=True)
            for l, block in enumerate(model.layers):
                q, k, allowed = captured[l]
                k = k.index_select(1, block.attn.key_index)  # (1, H, S, hd)
                scale = block.attn.scale if block.attn.scale is not None else q.shape[-1] ** -0.5
                scores = q @ k.transpose(-1, -2) * scale
                if allowed is not None:  # a sliding window's mask; plain causal allows every key
                    scores = scores.masked_fill(~allowed, float("-inf"))
                probs = scores.softmax(-1)[0, :, 0]  # (H, S)
                mass[i // per_depth, l] += probs[:, span].sum(-1).double().cpu() / per_depth
    finally:
        for block in model.layers:
            del block.attn.attend  # back to the class's method
    return mass


def _capture(captured: dict, layer: int, attend):
    def wrapped(q, k, v, mask):
        captured[layer] = (q[:, :, -1:].float(), k.float(), None if mask is None else mask[-1:])
        return attend(q, k, v, mask)

    return wrapped


def key_head_mass(model, mass: torch.Tensor) -> list[list[float]]:
    """Per layer, per key head: the `needle_attention` mass of the query heads that read it, summed."""
    cfg = model.config
    return [
        [
            float(sum(mass[l, h] for h in range(cfg.num_heads) if cfg.key_index[l][h] == j))
            for j in range(cfg.key_heads(l))
        ]
        for l in range(cfg.num_layers)
    ]


def retrieval_key_heads(model, mass: torch.Tensor, top: int) -> list[tuple[int, int]]:
    """The `top` (layer, key head) pairs whose query heads put the most attention on the needle."""
    per_head = [(m, l, j) for l, row in enumerate(key_head_mass(model, mass)) for j, m in enumerate(row)]
    return [(l, j) for _, l, j in sorted(per_head, reverse=True)[:top]]


def retrieval(
    model, tokenizer, options: RetrievalOptions, stream: torch.Tensor | None = None, progress: bool = True
) -> dict:
    """The passkey grid of one model: prompts, greedy answers through the KV cache, scores."""
    options.validate()
    prompts = passkey_prompts(tokenizer, options, stream)
    return score(prompts, answers(model, tokenizer, prompts, options, progress), options)
