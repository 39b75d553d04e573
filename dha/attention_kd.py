"""Attention distillation: the student's attention matched to the teacher's over the whole row.

Distillation on logits teaches what the teacher predicts. On natural text few predictions depend
on tokens thousands of positions back, so it barely constrains the attention that long-context
retrieval needs: after a merge, the retrieval layers' attention on a needle 8,192 tokens back
collapses though those layers keep all their heads (docs/longcontext.md). This term reads, in every
global-attention layer, the attention of each row's last `queries` positions (they see the whole
row; under skipped positions, the longest distances) over every key, per query head:

    AKD = mean over global layers, query heads, rows and those queries of KL(p_teacher || p_student)

Both models keep every query head (DHA reduces key and value heads only), so the distributions
compare head by head whatever each model's grouping. The scores are computed explicitly for those
queries only: (B, H, n, S) floats per layer, n/S of one attention matrix. Layers with a sliding
window (local layers) are left out: their attention does not reach far.

Use: `with tap.record(teacher): teacher(x)` stores the teacher's distributions, then
`with tap.compare(student): student(x); tap.take().backward()`: take() is the term (a sum over rows
and queries of the mean over layers and heads). Keep the backward pass inside `compare` when the
student's blocks are activation-checkpointed: their recomputation runs the tap again.
"""

from __future__ import annotations

import contextlib

import torch

MASKED = -1e9  # a masked score: exp() is exactly 0 in float32, and KL terms stay finite


def last_queries_log_probs(attn, q: torch.Tensor, k: torch.Tensor, mask, queries: int) -> torch.Tensor:
    """Attention log-probabilities (B, H, n, S) of the last n = min(queries, T) query positions of
    `attn` (a dha.model.Attention): q (B, H, T, hd), k (B, Hk, S, hd) after RoPE, as its attend gets
    them; mask (T, S) boolean (True: allowed) or None for plain causal. Computed in float32."""
    T, S = q.shape[2], k.shape[2]
    n = min(queries, T)
    k = k.index_select(1, attn.key_index)  # (B, H, S, hd)
    scale = attn.scale if attn.scale is not None else q.shape[-1] ** -0.5
    scores = (q[:, :, T - n :].float() @ k.float().transpose(-1, -2)) * scale  # (B, H, n, S)
    if mask is None:
        rows = torch.arange(S - n, S, device=q.device)  # the queries' own key index (no cache: S - T = start)
        mask = torch.arange(S, device=q.device)[None, :] <= rows[:, None]
    else:
        mask = mask[T - n :]
    return scores.masked_fill(~mask, MASKED).log_softmax(-1)


def global_layers(model) -> list:
    """The attention modules of a dha Transformer (or of a model wrapping one as `.model`, such as
    dha.fuse.FusedModel) that attend over the whole context."""
    body = model if hasattr(model, "layers") else model.model
    return [block.attn for block in body.layers if not block.attn.local]


class AttentionTap:
    def __init__(self, queries: int):
        self.queries = queries
        self.teacher: dict[int, torch.Tensor] = {}  # global layer -> the teacher's probabilities
        self.entropy: dict[int, torch.Tensor] = {}  # global layer -> sum of p log p of the teacher
        self.kl: dict[int, torch.Tensor] = {}  # global layer -> the student's KL sum

    @contextlib.contextmanager
    def record(self, model):
        """The teacher's distributions of every global layer, stored (no gradient) while it runs."""

        def tap(i, attn, q, k, mask):
            log_probs = last_queries_log_probs(attn, q, k, mask, self.queries).detach()
            self.teacher[i] = log_probs.exp()
            self.entropy[i] = (self.teacher[i] * log_probs).sum()

        self.teacher, self.entropy, self.kl = {}, {}, {}
        with _tapped(model, tap):
            yield self

    @contextlib.contextmanager
    def compare(self, model):
        """While the student runs: per global layer, KL(teacher || student) summed over rows and
        queries, averaged over heads (with gradient), against what `record` stored. As
        sum p_t log p_t - sum p_t log p_s: the backward pass keeps only p_t and log p_s."""

        def tap(i, attn, q, k, mask):
            student = last_queries_log_probs(attn, q, k, mask, self.queries)  # (B, H, n, S)
            kl = self.entropy[i] - (self.teacher[i] * student).sum()
            self.kl[i] = kl / q.shape[1]  # a recomputation (checkpointing) writes the same value again

        with _tapped(model, tap):
            yield self

    def take(self) -> torch.Tensor:
        """Sum over rows and queries of the mean KL over global layers and heads."""
        return torch.stack(list(self.kl.values())).sum() / len(self.kl)


@contextlib.contextmanager
def _tapped(model, tap):
    """Every global layer's attend calls tap(i, attn, q, k, mask) first, then attends as before."""
    attns = global_layers(model)

    def wrap(i, attn):
        attend = attn.attend

        def wrapped(q, k, v, mask):
            tap(i, attn, q, k, mask)
            return attend(q, k, v, mask)

        return wrapped

    for i, attn in enumerate(attns):
        attn.attend = wrap(i, attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn.attend  # back to the class's method
