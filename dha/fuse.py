"""Fusion: learn, per group of a plan, linear operators that make the group's heads agree, then merge.

DHA (Chen et al. 2024, section 3.2 "Fusion") fuses the heads of each group with learned linear
operators that start from the identity, so training starts from the unchanged model, and pushes
the fused heads of a group together step by step with a fusion loss. When they agree, the group
becomes one head (their mean) and the KV cache shrinks.

Our operator (docs/method.md, "Fusion operator"): a group S of n source key (or value) heads gets
n fused copies

    W~_i = sum_{j in S} C_ij W_j        b~_i = sum_{j in S} C_ij b_j        C = I at step 0

Per layer this is one (n, n) coefficient matrix C, block-diagonal by group (a fixed mask zeroes the
entries between groups). Mixing key weights before RoPE is exact: RoPE is linear and the same for
every head. During fusion the model keeps the source's head count and query maps; only the
projections are swapped for `FusedProjection` modules, so any training loop that calls the model
trains it.

Fusion distance of a group, normalised so groups and layers are comparable (0 = all copies equal):

    d(S) = sum_i ||W~_i - mean_S W~||^2 / sum_i ||W~_i||^2
         = tr(P C G C^T P) / tr(C G C^T)        (restricted to S; P = I - 11^T/n centres the copies)

where G is a Gram matrix of the group's heads: of their flattened weights and biases
(space="param"), or of their outputs on the current batch (space="output"). The Gram matrix is
detached, so the fusion loss moves the coefficients only; the base weights move by the LM loss
(when `train_base`).

`merge` sets each group's copies to their mean, mean_i W~_i = sum_j (mean_i C_ij) W_j, and hands
the column means of C to `dha.transforms.merge_groups`: the result is the reduced-cache model.

Shape legend: B batch, T tokens, D hidden size, n source heads of a layer (key or value), hd head dim.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .model import Transformer
from .plan import Plan
from .transforms import build, heads, merge_groups, state_dict_of

SPACES = ("param", "output")
SCHEDULES = ("ramp", "lagrangian", "anneal")
KINDS = ("key", "value")


@dataclass
class FusionOptions:
    space: str = "param"  # where the fusion distance is measured: "param" (weights) | "output" (batch's head outputs)
    # "ramp": fusion-loss weight ramped up | "lagrangian": d <= eps with learned multipliers |
    # "anneal": the copies are interpolated toward their mean, exactly merged at ramp_end (+ the ramped loss)
    # Default "anneal": the merge then loses nothing (measured best of the three, docs/method.md).
    schedule: str = "anneal"
    weight: float = 10.0  # ramp: the fusion-loss weight reached at `ramp_end`
    ramp_start: float = 0.0  # ramp: fraction of the fusion steps where the weight starts rising from 0
    ramp_end: float = 0.5  # ramp: fraction of the fusion steps where it reaches `weight` (then stays)
    eps: float = 1e-3  # lagrangian: target distance per layer and kind at the end of the target ramp
    multiplier_lr: float = 0.05  # lagrangian: learning rate of the multipliers (gradient ascent)
    # Learning rate of the coefficients C. Adam moves each about lr per step and a copy must travel
    # about 1/2 (identity row -> group mean), so None (auto) gives 2 / fusion steps in [0.005, 0.1].
    coefficient_lr: float | None = None
    train_base: bool = True  # the source K/V projection weights W_j train too (by the LM loss only)

    def __post_init__(self):
        if self.space not in SPACES:
            raise UserError(f"fusion space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"fusion schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.ramp_start <= self.ramp_end <= 1.0:
            raise UserError(f"need 0 <= ramp_start <= ramp_end <= 1, got {self.ramp_start}, {self.ramp_end}")
        if self.weight < 0 or self.eps < 0 or (self.coefficient_lr is not None and self.coefficient_lr <= 0) or self.multiplier_lr <= 0:
            raise UserError("fusion weight and eps must be >= 0, learning rates > 0")


class FusedProjection(nn.Module):
    """A k_proj or v_proj whose n heads are fused copies W~_i = sum_j C_ij W_j of the source heads.

    State dict: `weight` and `bias` are the source (base) weights, exactly as in the source model
    (parameters when they train, buffers otherwise); `coefficients` is C (float32, so small Adam
    updates are not lost in a bf16 model). Dropping `coefficients` gives back the plain model.
    """

    def __init__(self, linear: nn.Linear, groups: list[list[int]], head_dim: int, space: str, train_base: bool):
        super().__init__()
        n = linear.out_features // head_dim
        self.head_dim, self.num_heads, self.space = head_dim, n, space
        self.groups = [list(g) for g in groups]
        weight = linear.weight.detach().clone()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if train_base:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias) if bias is not None else None
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        mask = torch.zeros(n, n)
        group_id = torch.zeros(n, dtype=torch.long)
        for g, members in enumerate(self.groups):
            mask[torch.tensor(members)[:, None], torch.tensor(members)[None, :]] = 1.0
            group_id[members] = g
        self.register_buffer("mask", mask, persistent=False)  # (n, n): 1 inside a group
        self.register_buffer("group_id", group_id, persistent=False)  # (n,): group of each head
        self.coefficients = nn.Parameter(torch.eye(n))  # (n, n) C, the identity: step 0 = source model
        self.gram: torch.Tensor | None = None  # (n, n), detached; output space: from the last training batch
        self.anneal = 0.0  # a in [0, 1]: copies = (1 - a) C W + a (group mean of C W); set by FusionSchedule

    def mixing(self) -> torch.Tensor:
        """Effective (n, n) mixing: C with the entries between groups held at zero, annealed toward
        each group's mean row (M C, M = the group-averaging matrix). Its group means, hence `merge`,
        do not depend on the annealing (M M = M)."""
        C = self.coefficients * self.mask
        if self.anneal:
            C = (1.0 - self.anneal) * C + self.anneal * ((self.mask / self.mask.sum(1, keepdim=True)) @ C)
        return C

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        C = self.mixing().to(self.weight.dtype)
        w = torch.einsum("ij,jdk->idk", C, heads(self.weight, self.head_dim)).reshape_as(self.weight)  # (n*hd, D)
        b = (C @ heads(self.bias, self.head_dim)).reshape_as(self.bias) if self.bias is not None else None
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D) -> (B, T, n*hd)
        if self.space == "param":
            return F.linear(x, *self.fused_weight())
        y = F.linear(x, self.weight, self.bias)  # source heads' outputs (B, T, n*hd)
        y = y.view(*y.shape[:-1], self.num_heads, self.head_dim)  # (B, T, n, hd)
        if self.training:
            flat = y.detach().float().reshape(-1, self.num_heads, self.head_dim)  # (B*T, n, hd)
            self.gram = torch.einsum("tid,tjd->ij", flat, flat) / flat.shape[0]
        out = torch.einsum("ij,...jd->...id", self.mixing().to(y.dtype), y)  # (B, T, n, hd)
        return out.reshape(*out.shape[:-2], self.num_heads * self.head_dim)

    def parameter_gram(self) -> torch.Tensor:
        """(n, n) Gram matrix of the source heads' flattened weights and biases (detached)."""
        with torch.no_grad():
            f = heads(self.weight, self.head_dim).float().reshape(self.num_heads, -1)  # (n, hd*D)
            if self.bias is not None:
                f = torch.cat([f, heads(self.bias, self.head_dim).float()], dim=1)
            return f @ f.T

    def distances(self) -> torch.Tensor:
        """Relative fusion distance d(S) of each group (module doc), differentiable in C: (groups,)."""
        G = self.parameter_gram() if self.space == "param" else self.gram
        if G is None:
            raise RuntimeError("output-space fusion distance needs a training forward pass first")
        # float64: these are (n, n) matrices, and the spread is a small difference of large terms.
        C, G = self.mixing().double(), G.double()
        P = torch.eye(self.num_heads, device=C.device, dtype=C.dtype) - self.mask / self.mask.sum(1, keepdim=True)
        Dev = P @ C  # (n, n): row i gives W~_i - mean_S W~ as a combination of the source heads
        spread = ((Dev @ G) * Dev).sum(1)  # (n,): ||W~_i - mean_S W~||^2
        energy = ((C @ G) * C).sum(1)  # (n,): ||W~_i||^2
        groups = len(self.groups)
        num = spread.new_zeros(groups).index_add(0, self.group_id, spread)
        den = energy.new_zeros(groups).index_add(0, self.group_id, energy)
        return (num / den.clamp_min(1e-30)).float()

    @torch.no_grad()
    def project_to_mean(self) -> None:
        """Make each group's copies exactly equal to their mean (rows of C -> the group's mean row)."""
        C = self.mixing()
        for members in self.groups:
            C[members] = C[members].mean(0, keepdim=True)
        self.coefficients.copy_(C)
        self.anneal = 0.0

    def merge_weights(self) -> list[torch.Tensor]:
        """Per group, the coefficient of each member in the mean copy: mean_i C_ij (column means)."""
        C = self.mixing().detach()
        return [C[members][:, members].mean(0) for members in self.groups]


class FusedModel(nn.Module):
    """The source model with each layer's k_proj and v_proj fused by the plan's groups.

    Same call as Transformer (input_ids -> logits), same head count and query maps: the KV cache is
    not reduced until `merge`. The source model passed in is copied, never changed.
    """

    def __init__(self, model: Transformer, plan: Plan, options: FusionOptions | None = None):
        super().__init__()
        options = options or FusionOptions()
        cfg = model.config
        plan.validate([cfg.key_heads(l) for l in range(cfg.num_layers)], [cfg.value_heads(l) for l in range(cfg.num_layers)])
        self.plan, self.options = plan, options
        self.model = copy.deepcopy(model)
        if cfg.tie_word_embeddings:
            self.model.lm_head.weight = self.model.embed.weight  # deepcopy keeps the tie, but be explicit
        for l, layer in enumerate(plan.layers):
            attn = self.model.layers[l].attn
            attn.k_proj = FusedProjection(attn.k_proj, layer.key_groups, cfg.head_dim, options.space, options.train_base)
            attn.v_proj = FusedProjection(attn.v_proj, layer.value_groups, cfg.head_dim, options.space, options.train_base)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        return self.model(input_ids, cache)

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def projections(self) -> list[tuple[int, str, FusedProjection]]:
        """(layer, "key" | "value", module) for every fused projection."""
        return [(l, kind, getattr(b.attn, "k_proj" if kind == "key" else "v_proj"))
                for l, b in enumerate(self.model.layers) for kind in KINDS]

    def coefficient_parameters(self) -> list[nn.Parameter]:
        return [p.coefficients for _, _, p in self.projections()]

    def layer_distances(self) -> torch.Tensor:
        """(L, 2) mean fusion distance over the multi-head groups of each layer, [key, value]; 0 where none."""
        rows = []
        for l, block in enumerate(self.model.layers):
            row = []
            for proj in (block.attn.k_proj, block.attn.v_proj):
                d = proj.distances()
                multi = torch.tensor([len(g) > 1 for g in proj.groups], device=d.device)
                row.append(d[multi].mean() if multi.any() else d.new_zeros(()))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def fusion_loss(self) -> tuple[torch.Tensor, dict]:
        """Mean relative distance over every multi-head group of the model, and per-layer logs."""
        dists, logs = [], {}
        for l, kind, proj in self.projections():
            d = proj.distances()
            multi = [i for i, g in enumerate(proj.groups) if len(g) > 1]
            if multi:
                dists.append(d[multi])
                logs[f"fusion/{kind}/{l}"] = float(d[multi].mean().detach())
        if not dists:
            return torch.zeros((), device=self.model.embed.weight.device), logs
        loss = torch.cat(dists).mean()
        logs["fusion/distance"] = float(loss.detach())
        return loss, logs

    @torch.no_grad()
    def project_to_mean(self) -> None:
        for _, _, proj in self.projections():
            proj.project_to_mean()

    def base_model(self) -> Transformer:
        """The plain source-shaped Transformer holding the current base weights (coefficients dropped)."""
        sd = {k: v for k, v in state_dict_of(self.model).items() if not k.endswith(".coefficients")}
        return build(self.model.config, sd)


def merge(fused: FusedModel) -> tuple[Plan, Transformer]:
    """Each group's copies -> their mean, one head per group: the reduced-cache model.

    Equal to `fused` after `project_to_mean()` (up to float error), with Hk(l) = len(key_groups).
    """
    key_weights = [block.attn.k_proj.merge_weights() for block in fused.model.layers]
    value_weights = [block.attn.v_proj.merge_weights() for block in fused.model.layers]
    merged = merge_groups(fused.base_model(), fused.plan, key_weights, value_weights)
    merged.train(fused.training)
    return fused.plan, merged


class FusionSchedule:
    """How hard the fusion loss pushes, step by step: hooks for `dha.train.train` (train.Hooks).

    - "ramp" (progressive): objective += w(step) * fusion_loss, with w rising linearly from 0 to
      `weight` between `ramp_start` and `ramp_end` (fractions of the fusion steps), then held.
    - "anneal": as "ramp", and the copies are also interpolated toward their group mean,
      copies = (1 - a) C W + a M C W with a ramped from 0 to 1 over the same steps: from
      `ramp_end` on, the fused model IS the merged model, so the merge loses nothing and the
      remaining fusion steps train the merged function (learning the merge weights).
    - "lagrangian": per layer and kind (key, value) the constraint d_lk <= t_lk(step), where the
      target t ramps from the initial distance down to `eps` by `ramp_end`; the penalty
      l1 * (d - t) + l2 * (d - t)^2 has multipliers l1, l2 >= 0 learned by gradient ascent (a
      negative-lr parameter group; the LLM-Shearing recipe, Xia et al. 2024, section 2.1).

    The coefficients get their own parameter group (lr `coefficient_lr`, no weight decay).
    """

    def __init__(self, fused: FusedModel, steps: int, options: FusionOptions | None = None):
        self.fused, self.steps = fused, max(1, steps)
        self.options = options or fused.options
        self.start = min(round(self.options.ramp_start * self.steps), self.steps - 1)  # the ramp ends by the last step
        self.end = max(self.start + 1, round(self.options.ramp_end * self.steps))
        lr = self.options.coefficient_lr
        self.coefficient_lr = lr if lr is not None else min(0.1, max(0.005, 2.0 / self.steps))
        self.set_anneal(0)  # the starting point (step 0, its evaluation and the first step) is the unchanged model
        self.multipliers: nn.Parameter | None = None  # lagrangian: made in param_groups, on the training device
        self.initial: torch.Tensor | None = None
        if self.options.schedule == "lagrangian" and self.options.space == "param":
            with torch.no_grad():
                self.initial = fused.layer_distances().detach()

    def set_anneal(self, step: int) -> None:
        """The annealing of the copies after `step` steps (0 outside the "anneal" schedule); step k trains at step k-1's."""
        from .train import ramp

        a = ramp(step, self.start, self.end, 0.0, 1.0) if self.options.schedule == "anneal" else 0.0
        for _, _, proj in self.fused.projections():
            proj.anneal = a

    def weight(self, step: int) -> float:
        from .train import ramp

        return ramp(step, self.start, self.end, 0.0, self.options.weight)

    def extra_loss(self, model: FusedModel, step: int) -> tuple[torch.Tensor, dict]:
        from .train import ramp

        if self.options.schedule in ("ramp", "anneal"):
            loss, logs = model.fusion_loss()
            w = self.weight(step)
            logs["fusion/weight"] = w
            if self.options.schedule == "anneal":
                logs["fusion/anneal"] = model.projections()[0][2].anneal
            return w * loss, logs
        d = model.layer_distances()  # (L, 2)
        if self.initial is None:  # output space: the first batch gives the starting distances
            self.initial = d.detach().clone()
        frac = ramp(step, self.start, self.end, 0.0, 1.0)
        target = (1 - frac) * self.initial.to(d.device) + frac * self.options.eps
        active = torch.stack([torch.tensor([any(len(g) > 1 for g in b.attn.k_proj.groups),
                                            any(len(g) > 1 for g in b.attn.v_proj.groups)])
                              for b in model.model.layers]).to(d.device)  # (L, 2)
        gap = (d - target) * active
        l1, l2 = self.multipliers[0], self.multipliers[1]
        term = (l1 * gap + l2 * gap * gap).sum()
        logs = {"fusion/distance": float(d.detach()[active].mean()) if active.any() else 0.0,
                "fusion/target": float(target[active].mean()) if active.any() else 0.0}
        for l in range(d.shape[0]):
            for k, kind in enumerate(KINDS):
                if active[l, k]:
                    logs[f"fusion/{kind}/{l}"] = float(d[l, k].detach())
        return term, logs

    def param_groups(self, model: FusedModel) -> list[dict]:
        groups = [{"params": model.coefficient_parameters(), "lr": self.coefficient_lr, "weight_decay": 0.0}]
        if self.options.schedule == "lagrangian":
            # Called by train() after it has moved the model, so the multipliers live on its device.
            device = model.model.embed.weight.device
            self.multipliers = nn.Parameter(torch.zeros(2, model.config.num_layers, 2, device=device))  # [l1, l2] x (layer, kind)
            groups.append({"params": [self.multipliers], "lr": -self.options.multiplier_lr, "weight_decay": 0.0})
        return groups

    def on_step_end(self, model: FusedModel, step: int, record: dict) -> None:
        self.set_anneal(step)
        if self.multipliers is not None:
            with torch.no_grad():
                self.multipliers.clamp_(min=0.0)  # inequality constraint: multipliers stay >= 0
            record["fusion/lambda1"] = float(self.multipliers[0].detach().mean())
            record["fusion/lambda2"] = float(self.multipliers[1].detach().mean())

    def hooks(self):
        from .train import Hooks

        return Hooks(extra_loss=self.extra_loss, param_groups=self.param_groups, on_step_end=self.on_step_end)
