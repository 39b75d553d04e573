"""Fusion: move each group of a plan, step by step, from its source heads to their aligned merge, then merge.

DHA (Chen et al. 2024, section 3.2 "Fusion") fuses the heads of each group with learned linear
operators that start from the identity, so training starts from the unchanged model, and moves
them progressively until each group is one head and the KV cache shrinks.

Our operator fuses toward the closed-form aligned merge of `dha.merge` (not toward the mean: the
mean of trained heads is far from every one of them). A group S's merge is a shared head plus a
reading map per member, A (down: members -> shared) and B_j (up: shared -> member j); for keys both
act on each RoPE frequency pair as a complex scalar, so they commute with RoPE (a run with a
fusion stage merges no pair position-free, `dha.merge`: it would not end exactly at the
merge). Member j's k_proj (or v_proj) rows during fusion are

    W_j(a) = (1 - a) W_j + a B_j A W_S          (a = 0: the source; a = 1: the merge, exactly)

with `a` the anneal of `FusionSchedule`. At a = 1 each member's head is B_j applied to one shared
head, so folding B_j into the readers (q_proj for keys, o_proj for values) gives the merged model
with one head per group: `merge(fused)` equals the fused model at a = 1. The maps A, B start at the
closed-form merge and are trained with everything else (they are `nn.Parameter`s; keys keep their
complex-scalar form, so any trained value is still exact under RoPE). Without merges (DHAConfig
merge "mean") they start at the group mean instead (the old target, for comparison).

Fusion distance of a group (for the "ramp" and "lagrangian" schedules): how far the members are
from their merge, relative to their size, in parameter space (weights and biases):

    d(S) = sum_j ||W_j - B_j A W_S||^2 / sum_j ||W_j||^2        (0: the merge loses nothing)

Shape legend: D hidden size, n source heads of a layer (key or value), g heads in a group, hd head
dim, r rotary dims, p = hd - r pass-through dims.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .merge import KeyMerge, ValueMerge, aligned_merge, mean_merge, reconstructed_key_rows, reconstructed_value_rows
from .model import Transformer
from .options import FusionOptions
from .plan import Plan
from .summary import kv_summary
from .train import Hooks, ramp
from .transforms import build, heads, state_dict_of, unheads

KINDS = ("key", "value")


class GroupMaps(nn.Module):
    """The trainable maps of one group's merge (a KeyMerge or ValueMerge held as float32 parameters).

    Empty tensors (keys without unrotated dimensions) are buffers: every parameter must get a
    gradient, or DDP stops (dha.train under torchrun)."""

    def __init__(self, merge: KeyMerge | ValueMerge, learn: bool):
        super().__init__()
        self.kind = "key" if isinstance(merge, KeyMerge) else "value"
        tensors = (
            {
                "down_re": merge.down.real,
                "down_im": merge.down.imag,
                "up_re": merge.up.real,
                "up_im": merge.up.imag,
                "pass_down": merge.pass_down,
                "pass_up": merge.pass_up,
            }
            if self.kind == "key"
            else {"down": merge.down, "up": merge.up}
        )
        if self.kind == "key":  # the order of the merge's head dims: no parameter, moves with the module
            self.register_buffer("layout", merge.layout.clone(), persistent=False)
        for name, t in tensors.items():
            t = t.detach().float().clone()
            if learn and t.numel():
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    def merge(self) -> KeyMerge | ValueMerge:
        if self.kind == "key":
            return KeyMerge(
                torch.complex(self.down_re, self.down_im),
                torch.complex(self.up_re, self.up_im),
                self.pass_down,
                self.pass_up,
                self.layout,
            )
        return ValueMerge(self.down, self.up)


class FusedProjection(nn.Module):
    """A k_proj or v_proj whose heads move toward their group's merge: W_j(a) = (1 - a) W_j + a B_j A W_S.

    State dict: `weight` and `bias` are the source (base) weights (parameters when they train,
    buffers otherwise); `maps.G.*` the merge maps of group G. Dropping the maps gives back the
    plain model."""

    def __init__(
        self,
        linear: nn.Linear,
        groups: list[list[int]],
        merges: list,
        head_dim: int,
        train_base: bool,
        learn_maps: bool,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = linear.out_features // head_dim
        self.groups = [list(g) for g in groups]
        weight = linear.weight.detach().clone()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if train_base:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias) if bias is not None else None
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        # A head alone in its group is its own merge: its maps stay fixed (and DDP needs every
        # parameter to get a gradient at every step, which a singleton's maps would not at anneal 0).
        self.maps = nn.ModuleList(GroupMaps(m, learn_maps and len(g) > 1) for g, m in zip(self.groups, merges))
        self.anneal = 0.0  # a in [0, 1], set by FusionSchedule; 0: the source model

    def reconstructed(self, w: torch.Tensor) -> torch.Tensor:
        """Rows (n*hd, ...) -> every member read back from its group's merge: B_j A W_S."""
        rows = heads(w, self.head_dim)  # (n, hd, ...)
        out = rows.clone()
        with torch.autocast(w.device.type, enabled=False):  # small maps, kept in the weights' precision
            for members, maps in zip(self.groups, self.maps):
                merge = maps.merge()
                if maps.kind == "key":
                    out[members] = reconstructed_key_rows(rows[members], merge)
                else:
                    out[members] = reconstructed_value_rows(rows[members], merge)
        return unheads(out)

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.anneal
        if a == 0.0:
            return self.weight, self.bias
        w = self.weight + a * (self.reconstructed(self.weight) - self.weight)
        b = self.bias + a * (self.reconstructed(self.bias) - self.bias) if self.bias is not None else None
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D) -> (B, T, n*hd)
        return F.linear(x, *self.fused_weight())

    def distances(self) -> torch.Tensor:
        """Relative fusion distance d(S) of each group (module doc), differentiable: (groups,)."""
        parts = [(self.weight, self.reconstructed(self.weight))]
        if self.bias is not None:
            parts.append((self.bias, self.reconstructed(self.bias)))
        out = []
        for members in self.groups:
            num = sum(
                (heads(w, self.head_dim)[members] - heads(rec, self.head_dim)[members]).float().pow(2).sum()
                for w, rec in parts
            )
            den = sum(heads(w, self.head_dim)[members].float().pow(2).sum() for w, _ in parts)
            out.append(num / den.clamp_min(1e-30))
        return torch.stack(out)

    def merges(self) -> list:
        """The current merge of every group (detached, float64), for `dha.merge.aligned_merge`."""
        with torch.no_grad():
            return [_as_float64(m.merge()) for m in self.maps]


def _as_float64(merge):
    if isinstance(merge, KeyMerge):
        return KeyMerge(
            merge.down.to(torch.complex128),
            merge.up.to(torch.complex128),
            merge.pass_down.double(),
            merge.pass_up.double(),
            merge.layout,
        )
    return ValueMerge(merge.down.double(), merge.up.double())


def mean_merges(model: Transformer, plan: Plan) -> list[dict]:
    """The group mean of every group of `plan`, as merges (what FusedModel fuses toward without merges:
    merge "mean")."""
    cfg, device = model.config, next(model.parameters()).device
    r = cfg.rotary_dim if cfg.position == "rope" else 0
    return [
        {
            "key": [mean_merge("key", len(g), cfg.head_dim, r, device) for g in layer.key_groups],
            "value": [mean_merge("value", len(g), cfg.head_dim, r, device) for g in layer.value_groups],
        }
        for layer in plan.layers
    ]


class FusedModel(nn.Module):
    """The source model with each layer's k_proj and v_proj fused toward the plan's merges.

    merges[l] = {"key": [merge per key group], "value": [...]} (dha.merge.closed_form_merges), or
    None for the group means. Same call as Transformer (input_ids -> logits), same head count and
    query maps: the KV cache is not reduced until `merge`. The source model is copied, never changed.
    """

    def __init__(
        self, model: Transformer, plan: Plan, merges: list[dict] | None = None, options: FusionOptions | None = None
    ):
        super().__init__()
        options = options or FusionOptions()
        cfg = model.config
        kv = kv_summary(cfg)
        plan.validate(kv["key_heads"], kv["value_heads"])
        merges = merges if merges is not None else mean_merges(model, plan)
        self.plan, self.options = plan, options
        self.model = copy.deepcopy(model)
        if cfg.tie_word_embeddings:
            self.model.lm_head.weight = self.model.embed.weight  # deepcopy keeps the tie, but be explicit
        for l, layer in enumerate(plan.layers):
            attn = self.model.layers[l].attn
            attn.k_proj = FusedProjection(
                attn.k_proj, layer.key_groups, merges[l]["key"], cfg.head_dim, options.train_base, options.learn_maps
            )
            attn.v_proj = FusedProjection(
                attn.v_proj,
                layer.value_groups,
                merges[l]["value"],
                cfg.head_dim,
                options.train_base,
                options.learn_maps,
            )

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, cache, positions=positions)

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def projections(self) -> list[tuple[int, str, FusedProjection]]:
        """(layer, "key" | "value", module) for every fused projection."""
        return [
            (l, kind, getattr(b.attn, "k_proj" if kind == "key" else "v_proj"))
            for l, b in enumerate(self.model.layers)
            for kind in KINDS
        ]

    def set_anneal(self, a: float) -> None:
        for _, _, proj in self.projections():
            proj.anneal = a

    def layer_distances(self) -> torch.Tensor:
        """(L, 2) mean fusion distance over the multi-head groups of each layer, [key, value]; 0 where none."""
        rows = []
        for l, block in enumerate(self.model.layers):
            row = []
            for proj in (block.attn.k_proj, block.attn.v_proj):
                multi = [i for i, g in enumerate(proj.groups) if len(g) > 1]
                row.append(proj.distances()[multi].mean() if multi else self.model.embed.weight.new_zeros(()))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def fusion_loss(self) -> tuple[torch.Tensor, dict]:
        """Mean relative distance over every multi-head group of the model, and per-layer logs."""
        dists, logs = [], {}
        for l, kind, proj in self.projections():
            multi = [i for i, g in enumerate(proj.groups) if len(g) > 1]
            if multi:
                d = proj.distances()[multi]
                dists.append(d)
                logs[f"fusion/{kind}/{l}"] = float(d.mean().detach())
        if not dists:
            return torch.zeros((), device=self.model.embed.weight.device), logs
        loss = torch.cat(dists).mean()
        logs["fusion/distance"] = float(loss.detach())
        return loss, logs

    def base_model(self) -> Transformer:
        """The plain source-shaped Transformer holding the current base weights (maps dropped)."""
        sd = {k: v for k, v in state_dict_of(self.model).items() if ".maps." not in k}
        return build(self.model.config, sd)


def merge(fused: FusedModel) -> tuple[Plan, Transformer]:
    """One head per group by the current merges: the reduced-cache model.

    Equal to `fused` at anneal 1 (up to float error), with Hk(l) = len(key_groups)."""
    merges = [{"key": b.attn.k_proj.merges(), "value": b.attn.v_proj.merges()} for b in fused.model.layers]
    merged = aligned_merge(fused.base_model(), fused.plan.layers, merges)
    merged.train(fused.training)
    return fused.plan, merged


class FusionSchedule:
    """How the fusion moves, step by step: hooks for `dha.train.train` (train.Hooks).

    - "anneal" (default): the members are interpolated toward their merge (module doc), a ramped
      from 0 to 1 between `ramp_start` and `ramp_end` (fractions of the fusion steps): from
      `ramp_end` on the fused model IS the merged model, so the merge loses nothing and the
      remaining fusion steps train the merged function (maps included). Plus the "ramp" loss.
    - "ramp" (progressive loss): objective += w(step) * fusion_loss, w rising linearly from 0 to
      `weight` between `ramp_start` and `ramp_end`, then held; the merge happens at the end.
    - "lagrangian": per layer and kind the constraint d_lk <= t_lk(step), the target t ramping from
      the initial distance down to `eps` by `ramp_end`; the penalty l1 * g + l2 * g^2 on the
      violation g = max(d - t, 0) (an inequality: a group ahead of schedule is not pushed back) has
      multipliers l1, l2 >= 0 learned by gradient ascent (a negative-lr parameter group; the
      LLM-Shearing recipe, Xia et al. 2024, section 2.1).

    The maps train in the default parameter group, with the model's learning rate.
    """

    def __init__(self, fused: FusedModel, steps: int, options: FusionOptions | None = None):
        self.fused, self.steps = fused, max(1, steps)
        self.options = options or fused.options
        self.start = min(round(self.options.ramp_start * self.steps), self.steps - 1)  # the ramp ends by the last step
        self.end = max(self.start + 1, round(self.options.ramp_end * self.steps))
        self.set_anneal(0)  # the starting point (step 0, its evaluation and the first step) is the unchanged model
        self.multipliers: nn.Parameter | None = None  # lagrangian: made in param_groups, on the training device
        self.initial: torch.Tensor | None = None
        if self.options.schedule == "lagrangian":
            with torch.no_grad():
                self.initial = fused.layer_distances().detach()

    def set_anneal(self, step: int) -> None:
        """The anneal after `step` steps (0 outside the "anneal" schedule); step k trains at step k-1's."""
        self.fused.set_anneal(ramp(step, self.start, self.end, 0.0, 1.0) if self.options.schedule == "anneal" else 0.0)

    def weight(self, step: int) -> float:
        return ramp(step, self.start, self.end, 0.0, self.options.weight)

    def extra_loss(self, model: FusedModel, step: int) -> tuple[torch.Tensor, dict]:
        if self.options.schedule in ("ramp", "anneal"):
            loss, logs = model.fusion_loss()
            w = self.weight(step)
            logs["fusion/weight"] = w
            if self.options.schedule == "anneal":
                logs["fusion/anneal"] = model.projections()[0][2].anneal
            return w * loss, logs
        d = model.layer_distances()  # (L, 2)
        frac = ramp(step, self.start, self.end, 0.0, 1.0)
        target = (1 - frac) * self.initial.to(d.device) + frac * self.options.eps
        active = torch.stack(
            [
                torch.tensor(
                    [any(len(g) > 1 for g in b.attn.k_proj.groups), any(len(g) > 1 for g in b.attn.v_proj.groups)]
                )
                for b in model.model.layers
            ]
        ).to(d.device)  # (L, 2)
        gap = (d - target).clamp_min(0.0) * active
        l1, l2 = self.multipliers[0], self.multipliers[1]
        term = (l1 * gap + l2 * gap * gap).sum()
        logs = {
            "fusion/distance": float(d.detach()[active].mean()) if active.any() else 0.0,
            "fusion/target": float(target[active].mean()) if active.any() else 0.0,
        }
        for l in range(d.shape[0]):
            for k, kind in enumerate(KINDS):
                if active[l, k]:
                    logs[f"fusion/{kind}/{l}"] = float(d[l, k].detach())
        return term, logs

    def param_groups(self, model: FusedModel) -> list[dict]:
        if self.options.schedule != "lagrangian":
            return []
        # Called by train() after it has moved the model, so the multipliers live on its device.
        device = model.model.embed.weight.device
        self.multipliers = nn.Parameter(
            torch.zeros(2, model.config.num_layers, 2, device=device)
        )  # [l1, l2] x (layer, kind)
        return [{"params": [self.multipliers], "lr": -self.options.multiplier_lr, "weight_decay": 0.0}]

    def on_step_end(self, model: FusedModel, step: int, record: dict) -> None:
        self.set_anneal(step)
        if self.multipliers is not None:
            with torch.no_grad():
                self.multipliers.clamp_(min=0.0)  # inequality constraint: multipliers stay >= 0
            record["fusion/lambda1"] = float(self.multipliers[0].detach().mean())
            record["fusion/lambda2"] = float(self.multipliers[1].detach().mean())

    def state_dict(self) -> dict:
        """What a checkpoint keeps besides the model: the multipliers (the anneal follows from the step)."""
        return {"multipliers": None if self.multipliers is None else self.multipliers.detach().cpu().clone()}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.set_anneal(step)
        if self.multipliers is not None and state.get("multipliers") is not None:
            with torch.no_grad():
                self.multipliers.copy_(state["multipliers"])

    def hooks(self) -> Hooks:
        return Hooks(
            extra_loss=self.extra_loss,
            param_groups=self.param_groups,
            on_step_end=self.on_step_end,
            state_dict=self.state_dict,
            load_state_dict=self.load_state_dict,
        )
