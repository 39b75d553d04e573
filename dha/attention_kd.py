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

Use: `with tap.record(teacher): teacher(x)` stores the teacher's distributions; then
`with tap.compare(student, weight): loss = f(student(x)); loss.backward()` computes the gradient of
loss + weight * term, and `tap.take()` gives the term's value (a sum over rows and queries of the
mean over layers and heads). The term is not added to `loss`: each layer's share enters the
backward pass through that layer's attention output (`_WithLoss`), so its gradient is formed when
the block's own backward runs. With the blocks activation-checkpointed, a block's recomputation
runs the tap again (keep the backward pass inside `compare`), and no block is recomputed before its
turn, as a separate loss term would force.
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
        self.kl: dict[int, torch.Tensor] = {}  # global layer -> the student's KL sum (a value)

    @contextlib.contextmanager
    def record(self, model):
        """The teacher's distributions of every global layer, stored (no gradient) while it runs."""

        def tap(i, attn, q, k, mask):
            log_probs = last_queries_log_probs(attn, q, k, mask, self.queries).detach()
            self.teacher[i] = log_probs.exp()
            self.entropy[i] = (self.teacher[i] * log_probs).sum()
            return None

        self.teacher, self.entropy, self.kl = {}, {}, {}
        with _tapped(model, tap):
            yield self

    @contextlib.contextmanager
    def compare(self, model, weight: float):
        """While the student runs and its backward pass: per global layer, KL(teacher || student)
        summed over rows and queries, averaged over heads, against what `record` stored; its
        gradient, times `weight` / layers, joins the layer's attention output's. As
        sum p_t log p_t - sum p_t log p_s: the backward pass keeps only p_t and log p_s."""
        layers = len(global_layers(model))

        def tap(i, attn, q, k, mask):
            student = last_queries_log_probs(attn, q, k, mask, self.queries)  # (B, H, n, S)
            kl = (self.entropy[i] - (self.teacher[i] * student).sum()) / q.shape[1]
            self.kl[i] = kl.detach()  # a recomputation (checkpointing) writes the same value again
            return kl, weight / layers

        with _tapped(model, tap):
            yield self

    def take(self) -> torch.Tensor:
        """Sum over rows and queries of the mean KL over global layers and heads (a value)."""
        return torch.stack(list(self.kl.values())).sum() / len(self.kl)


class _WithLoss(torch.autograd.Function):
    """Identity on `output`; in the backward pass, `loss` receives gradient `scale` (as if
    scale * loss were added to the objective) when `output`'s gradient arrives."""

    @staticmethod
    def forward(ctx, output, loss, scale):
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


@contextlib.contextmanager
def _tapped(model, tap):
    """Every global layer's attend calls tap(i, attn, q, k, mask) first, then attends as before; a
    tap that returns (loss, scale) has the loss join the backward pass through the output."""
    attns = global_layers(model)

    def wrap(i, attn):
        attend = attn.attend

        def wrapped(q, k, v, mask):
            extra = tap(i, attn, q, k, mask)
            output = attend(q, k, v, mask)
            return output if extra is None else _WithLoss.apply(output, *extra)

        return wrapped

    for i, attn in enumerate(attns):
        attn.attend = wrap(i, attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn.attend  # back to the class's method
