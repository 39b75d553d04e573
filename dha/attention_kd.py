"""Attention distillation: the student's attention matched to the teacher's over the whole row.

Distillation on logits teaches what the teacher predicts. On natural text few predictions depend
on tokens thousands of positions back, so it barely constrains the attention that long-context
retrieval needs: after a merge, the retrieval layers' attention on a needle 8,192 tokens back
collapses though those layers keep all their heads (docs/longcontext_runs.md). This term reads, in every
global-attention layer, the attention of each row's last `queries` positions (they see the whole
row; under skipped positions, the longest distances) over every key, per query head:

    AKD = mean over global layers, query heads, rows and those queries of KL(p_teacher || p_student)

The KL over all keys is mostly about the nearby ones, where nearly all the mass is: a head that
reads a key thousands of positions back puts a few percent there on natural text, so the term
barely notices when the student stops finding it. The far term (`far` > 0) compares the same
queries' attention renormalized over the keys at least `far` positions back (by the rows' position
ids, so under skipped positions the distances the positions say), whatever mass they have:

    FAR = mean over global layers, query heads, rows and those queries of KL(q_teacher || q_student),
          q(j) = p(j) / sum of p over the far keys, for the keys j at least `far` positions back

It asks which far keys each head reads, not how much it reads them. A query with no far key has a
uniform q in both models (a KL of 0).

Both models keep every query head (DHA reduces key and value heads only), so the distributions
compare head by head whatever each model's grouping. The scores are computed explicitly for those
queries only: (B, H, n, S) floats per layer, n/S of one attention matrix. Layers with a sliding
window (local layers) are left out: their attention does not reach far.

Use: `with tap.record(teacher): teacher(x)` stores the teacher's distributions; then
`with tap.compare(student, weight, far_weight): loss = f(student(x)); loss.backward()` computes the
gradient of loss + weight * AKD + far_weight * FAR, and `tap.take()` (`take("far")`) gives the term's
value (a sum over rows and queries of the mean over layers and heads). The terms are not added to
`loss`: each layer's share enters the backward pass through that layer's attention output
(`_WithLoss`), so its gradient is formed when the block's own backward runs. With the blocks
activation-checkpointed, a block's recomputation runs the tap again (keep the backward pass inside
`compare`), and no block is recomputed before its turn, as a separate loss term would force.
"""

from __future__ import annotations

import contextlib

import torch

MASKED = -1e9  # a masked score: exp() is exactly 0 in float32, and KL terms stay finite


def last_queries_scores(attn, q: torch.Tensor, k: torch.Tensor, mask, queries: int) -> tuple:
    """Attention scores (B, H, n, S) of the last n = min(queries, T) query positions of `attn` (a
    dha.model.Attention), in float32, and the (n, S) boolean mask of the keys each may read: q
    (B, H, T, hd), k (B, Hk, S, hd) after RoPE, as its attend gets them; mask (T, S) boolean (True:
    allowed) or None for plain causal."""
    T, S = q.shape[2], k.shape[2]
    n = min(queries, T)
    k = k.index_select(1, attn.key_index)  # (B, H, S, hd)
    scale = attn.scale if attn.scale is not None else q.shape[-1] ** -0.5
    scores = (q[:, :, T - n :].float() @ k.float().transpose(-1, -2)) * scale  # (B, H, n, S)
    if mask is None:
        rows = torch.arange(S - n, S, device=q.device)  # the queries' own key index (no cache: S - T = start)
        return scores, torch.arange(S, device=q.device)[None, :] <= rows[:, None]
    return scores, mask[T - n :]


def masked_log_probs(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log_softmax of `scores` over the allowed keys; a row with none allowed is uniform."""
    return scores.masked_fill(~allowed, MASKED).log_softmax(-1)


def far_keys(positions: torch.Tensor | None, T: int, n: int, far: int, device) -> torch.Tensor:
    """(B, n, S) boolean: key j at least `far` positions behind query i, for the last n of T queries;
    positions (B, T) position ids (None: 0..T-1, one row that broadcasts); keys are the T inputs."""
    if positions is None:
        positions = torch.arange(T, device=device)[None]
    return positions[:, T - n :, None] - positions[:, None, :] >= far


def global_layers(model) -> list:
    """The attention modules of a dha Transformer (or of a model wrapping one as `.model`, such as
    dha.fuse.FusedModel) that attend over the whole context."""
    body = model if hasattr(model, "layers") else model.model
    return [block.attn for block in body.layers if not block.attn.local]


class AttentionTap:
    """The term(s) of one micro batch: AKD, and with `far` > 0 the far term (module doc)."""

    def __init__(self, queries: int, far: int = 0):
        self.queries, self.far = queries, far
        self.teacher: dict[tuple, torch.Tensor] = {}  # (global layer, part) -> the teacher's probabilities
        self.entropy: dict[tuple, torch.Tensor] = {}  # (global layer, part) -> sum of p log p of the teacher
        self.kl: dict[tuple, torch.Tensor] = {}  # (global layer, part) -> the student's KL sum (a value)

    def _log_probs(self, attn, q, k, mask, positions) -> dict[str, torch.Tensor]:
        """The distributions compared, from one product of queries and keys: over "all" keys, and
        with `far` over the "far" keys, those at least `far` positions back by `positions` (B, T)
        (None: 0..T-1)."""
        scores, allowed = last_queries_scores(attn, q, k, mask, self.queries)
        out = {"all": masked_log_probs(scores, allowed)}
        if self.far:
            far = far_keys(positions, q.shape[2], scores.shape[2], self.far, q.device)[:, None]  # (B, 1, n, S)
            out["far"] = masked_log_probs(scores, allowed & far)
        return out

    @contextlib.contextmanager
    def record(self, model, positions: torch.Tensor | None = None):
        """The teacher's distributions of every global layer, stored (no gradient) while it runs on
        rows with these position ids (None: 0..T-1)."""

        def tap(i, attn, q, k, mask):
            for part, log_probs in self._log_probs(attn, q, k, mask, positions).items():
                log_probs = log_probs.detach()
                self.teacher[i, part] = log_probs.exp()
                self.entropy[i, part] = (self.teacher[i, part] * log_probs).sum()
            return None

        self.teacher, self.entropy, self.kl = {}, {}, {}
        with _tapped(model, tap):
            yield self

    @contextlib.contextmanager
    def compare(self, model, weight: float, far_weight: float = 0.0, positions: torch.Tensor | None = None):
        """While the student runs and its backward pass: per global layer, KL(teacher || student)
        summed over rows and queries, averaged over heads, against what `record` stored; its
        gradient, times `weight` / layers (the far term's: `far_weight` / layers), joins the layer's
        attention output's. As sum p_t log p_t - sum p_t log p_s: the backward pass keeps only p_t
        and log p_s."""
        layers = len(global_layers(model))
        weights = {"all": weight, "far": far_weight}

        def tap(i, attn, q, k, mask):
            loss = 0.0
            for part, student in self._log_probs(attn, q, k, mask, positions).items():  # (B, H, n, S) each
                kl = (self.entropy[i, part] - (self.teacher[i, part] * student).sum()) / q.shape[1]
                self.kl[i, part] = kl.detach()  # a recomputation (checkpointing) writes the same value again
                loss = loss + weights[part] * kl
            return loss, 1.0 / layers

        with _tapped(model, tap):
            yield self

    def take(self, part: str = "all") -> torch.Tensor:
        """Sum over rows and queries of the mean KL over global layers and heads (a value): of the
        distributions over all keys, or ("far") over the far keys."""
        values = [v for (_, p), v in self.kl.items() if p == part]
        return torch.stack(values).sum() / len(values)


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
