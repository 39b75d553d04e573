"""The closed-form aligned merge of key and value heads: what DHA merges to and `svd` applies.

A group S of key (or value) heads becomes one shared head. Merging trained heads by their mean
fails because they are not aligned: two key heads that attend alike can be rotations of each
other. Alignment is free in the function, so each merge here is a shared head plus one reading
map per source head, folded into the weights of the query heads that read it:

- Values. For any d x d map B, (x W_V) (B W_O[h]) = ((x W_V) B) W_O[h], so source value head j is
  replaced by v_j ~ v~ B_j and B_j is folded into W_O's columns of every query head that read j.
  With a metric L_j (d x d, reconstruction error measured as ||(v_j - v~ B_j) L_j||^2), the best
  shared head is the top-d principal subspace U of the stacked, whitened outputs [v_j L_j]_j
  (Eckart-Young): v~ = sum_j v_j (L_j U_j), B_j = U_j^T L_j^-1, U_j the j-th (d, d) block of U.
  metric="weighted" takes L_j^2 = sum_{h reads j} W_O[h] W_O[h]^T, so the error is the error of the
  layer's output (what the heads write to the residual stream); metric="plain" takes L_j = I
  (ordinary PCA of the values, Yu et al. 2024).
- Keys. RoPE multiplies frequency pair i of every key (and query) by the same e^{i theta_i p}, so a
  map commutes with RoPE exactly when it multiplies each pair, seen as a complex number z, by a
  complex scalar. Per pair, with weights s_j > 0 per source head, the best rank-one approximation
  of the weighted pair vector (s_j z_j)_j is u u^H (top eigenvector u of its Gram matrix): the
  shared key is k~ = sum_j conj(u_j) s_j z_j and z_j ~ (u_j / s_j) k~, so a query that read j reads
  the shared head with its pair multiplied by conj(u_j / s_j) (exact: Re(conj(q) c k) =
  Re(conj(conj(c) q) k)). metric="weighted" takes s_j^2 = sum_{h reads j} E|q_h,i|^2, the energy of
  the queries that read the key on that pair, so the error is the attention-logit error;
  metric="plain" takes s = 1 (complex PCA per pair). Dimensions past the rotary ones are not
  rotated: they merge like values, with the metric L_j^2 = sum_{h reads j} E[q_h q_h^T] on them
  (the logit error again).
- Position-free pairs. The lowest-frequency pairs barely turn over a context (SmolLM2's last
  pair by 0.01 rad over 512 tokens), so a merge may treat the `free_pairs` lowest of them as
  pass-through dims: one block merged by PCA with full maps, mixing pairs, instead of a complex
  scalar per pair. That is exact only at angle 0 (the maps no longer commute with RoPE), so it
  trades the error of the turning for a far better merge of the block: measured in
  docs/method.md. `dha.calibration.key_layout` is the head dims in that order; a KeyMerge keeps it. A key group
  that exact maps fit as well (a tie: copies, or heads that differ by per-pair rotations) keeps
  exact maps, so such merges stay exact at every position.

`dha.calibration.LayerStats` holds, per layer, the weighted second moments these need, from one
pass over calibration tokens (`dha.calibration.calibrate`); here `group_residual` is the error a
group leaves (trace minus the kept eigenvalues: no merge is built), `group_merge` the merge itself,
`closed_form_merges` those of a plan and `aligned_merge` the merged model.

Shape legend: N calibration tokens, H query heads, n source heads of one kind in a layer, g heads in
a group, hd head dim, r rotary dims (r/2 frequency pairs), p = hd - r pass-through dims, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .calibration import LayerStats, complex_pairs
from .model import Transformer
from .plan import LayerPlan
from .transforms import build, heads, regroup_map, tensors_of, unheads, with_maps

# A key group's exact-pair residual within TIE x its layer's key energy of the position-free one is a tie.
TIE = 1e-6


# ---- one group ---------------------------------------------------------------------------------------


def _block(gram: torch.Tensor, members: list[int], dim: int) -> torch.Tensor:
    """The (g*dim, g*dim) sub-Gram of `members` from a stacked (n*dim, n*dim) Gram."""
    idx = torch.cat([torch.arange(m * dim, (m + 1) * dim, device=gram.device) for m in members])
    return gram[idx][:, idx]


def _kept_energy(gram: torch.Tensor, rank: int) -> float:
    return float(torch.linalg.eigvalsh(gram)[-rank:].sum()) if rank else 0.0


def _key_residual(stats: LayerStats, members: list[int]) -> float:
    G = stats.key_pair_gram[:, members][:, :, members]  # (r/2, g, g)
    rotary = (
        float(torch.diagonal(G, dim1=1, dim2=2).real.sum() - torch.linalg.eigvalsh(G)[:, -1].sum())
        if G.shape[0]
        else 0.0
    )
    p = stats.key_pass_metric.shape[1]
    P = _block(stats.key_pass_gram, members, p)
    return max(rotary + float(P.trace()) - _kept_energy(P, p), 0.0)


def _key_choice(stats: LayerStats, members: list[int]) -> tuple[LayerStats, float]:
    """The statistics a key group merges by and the residual it leaves: the exact-pair ones on a tie."""
    free = _key_residual(stats, members)
    if stats.exact is None:
        return stats, free
    exact = _key_residual(stats.exact, members)
    return (stats.exact, exact) if exact <= free + TIE * energy(stats.exact, "key") else (stats, free)


def group_residual(stats: LayerStats, kind: str, members: list[int]) -> float:
    """Squared error (in the metric) that merging `members` into one head leaves: trace - kept eigenvalues."""
    if kind == "key":
        return _key_choice(stats, members)[1]
    hd = stats.value_metric.shape[1]
    V = _block(stats.value_gram, members, hd)
    return max(float(V.trace()) - _kept_energy(V, hd), 0.0)


def energy(stats: LayerStats, kind: str) -> float:
    """Total squared norm (in the metric) of the layer's source heads of `kind`: the residual of dropping them all."""
    if kind == "key":
        return float(torch.diagonal(stats.key_pair_gram, dim1=1, dim2=2).real.sum() + stats.key_pass_gram.trace())
    return float(stats.value_gram.trace())


def _top(gram: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.eigh(gram)[1][..., -rank:].flip(-1)


@dataclass
class KeyMerge:
    """One key group's merge, on head dims in `layout` order: per exact pair, shared z~ = sum_j
    down[:, j] z_j and z_j ~ up[:, j] z~; the rest (p dims): shared = sum_j k_j pass_down[j],
    k_j ~ shared pass_up[j]."""

    down: torch.Tensor  # (r/2, g) complex128, r the dims merged pair by pair
    up: torch.Tensor  # (r/2, g) complex128
    pass_down: torch.Tensor  # (g, p, p)
    pass_up: torch.Tensor  # (g, p, p)
    layout: torch.Tensor  # (hd,) long: key_layout
    rms: torch.Tensor | None = None  # (g,) float64: each member's RMS before a per-head key norm (qk-norm)
    energy: torch.Tensor | None = None  # (1 + g, r) float64: E[z_d^2] per dim of the shared key, then of each member

    @property
    def rotary(self) -> int:
        return 2 * self.down.shape[0]


@dataclass
class ValueMerge:
    """One value group's merge: v~ = sum_j v_j down[j], v_j ~ v~ up[j]."""

    down: torch.Tensor  # (g, hd, hd)
    up: torch.Tensor  # (g, hd, hd)


def _real_merge(gram: torch.Tensor, metric: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened PCA of a stacked group: (down (g, dim, dim) = L_j U_j, up (g, dim, dim) = U_j^T L_j^-1)."""
    g = metric.shape[0]
    if dim == 0:
        return metric.new_zeros(g, 0, 0), metric.new_zeros(g, 0, 0)
    U = _top(gram, dim).reshape(g, dim, dim)  # (g, dim, dim): U_j
    down = metric @ U
    up = U.transpose(1, 2) @ torch.linalg.inv(metric)
    return down, up


def group_merge(stats: LayerStats, kind: str, members: list[int]) -> KeyMerge | ValueMerge:
    """The closed-form aligned merge of one group (module doc)."""
    if kind == "value":
        hd = stats.value_metric.shape[1]
        return ValueMerge(*_real_merge(_block(stats.value_gram, members, hd), stats.value_metric[members], hd))
    stats = _key_choice(stats, members)[0]
    G = stats.key_pair_gram[:, members][:, :, members]  # (r/2, g, g)
    u = _top(G, 1)[..., 0] if G.shape[0] else G.new_zeros(0, len(members))  # (r/2, g)
    s = stats.key_scale[members].T  # (r/2, g)
    p = stats.key_pass_metric.shape[1]
    pass_down, pass_up = _real_merge(_block(stats.key_pass_gram, members, p), stats.key_pass_metric[members], p)
    rms = stats.key_rms[members] if stats.key_rms is not None else None
    down = u.conj() * s
    return KeyMerge(down, u / s, pass_down, pass_up, stats.key_layout, rms, _shared_energy(stats, members, down))


def _shared_energy(stats: LayerStats, members: list[int], down: torch.Tensor) -> torch.Tensor | None:
    """E[z_d^2] per rotary dim (pair firsts, then seconds) of the shared key sum_j down_j z_j, then of
    each member z_j, from the real per-pair moments (LayerStats.key_pair_moments); None without them."""
    if stats.key_pair_moments is None:
        return None
    n = stats.key_pair_moments.shape[1] // 2
    idx = [*members, *(n + j for j in members)]
    moments = stats.key_pair_moments[:, idx][:, :, idx] / stats.tokens  # (r/2, 2g, 2g)
    first = torch.cat([down.real, -down.imag], 1)  # z~_a = sum_j Re(d_j) a_j - Im(d_j) b_j
    second = torch.cat([down.imag, down.real], 1)  # z~_b = sum_j Im(d_j) a_j + Re(d_j) b_j
    quad = lambda c: torch.einsum("pi,pij,pj->p", c, moments, c)  # noqa: E731
    own = torch.diagonal(moments, dim1=1, dim2=2).T  # (2g, r/2): E a_j^2, then E b_j^2
    g = len(members)
    return torch.cat([torch.cat([quad(first), quad(second)])[None], torch.cat([own[:g], own[g:]], 1)])


def mean_merge(
    kind: str, size: int, head_dim: int, rotary_dim: int, device: torch.device | None = None
) -> KeyMerge | ValueMerge:
    """The mean of a group written as a merge (shared head = the mean, read unchanged): the old target."""
    eye = torch.eye(head_dim if kind == "value" else head_dim - rotary_dim, dtype=torch.float64, device=device)
    down, up = (eye / size).expand(size, *eye.shape).clone(), eye.expand(size, *eye.shape).clone()
    if kind == "value":
        return ValueMerge(down, up)
    pairs = torch.ones(rotary_dim // 2, size, dtype=torch.complex128, device=device)
    return KeyMerge(pairs / size, pairs, down, up, torch.arange(head_dim, device=device))


# ---- applying merges to weights ------------------------------------------------------------------------


def pair_multiply(rows: torch.Tensor, c: torch.Tensor, r: int) -> torch.Tensor:
    """Multiply the rotary pairs of head rows (hd, ...) by complex scalars c (r/2,); pass rows unchanged."""
    shape = (-1,) + (1,) * (rows.dim() - 1)
    a, b = c.real.reshape(shape).to(rows.dtype), c.imag.reshape(shape).to(rows.dtype)
    x1, x2 = rows[: r // 2], rows[r // 2 : r]
    return torch.cat([a * x1 - b * x2, b * x1 + a * x2, rows[r:]])


def _unordered(merge: KeyMerge) -> torch.Tensor:
    """Indices that put head dims in `merge.layout` order back in the model's order."""
    return torch.argsort(merge.layout)


def _shared_in_layout(rows: torch.Tensor, merge: KeyMerge) -> torch.Tensor:
    """Members' rows (g, hd, ...) in the merge's layout -> the shared head's rows, in that layout."""
    r = merge.rotary
    out = sum(pair_multiply(rows[m], merge.down[:, m], r) for m in range(rows.shape[0]))
    if rows.shape[1] > r:
        flat = rows[:, r:].reshape(rows.shape[0], rows.shape[1] - r, -1)  # (g, p, ...)
        out[r:] = torch.einsum("gpe,gpk->ek", merge.pass_down.to(rows.dtype), flat).reshape(out[r:].shape)
    return out


def shared_key_rows(rows: torch.Tensor, merge: KeyMerge) -> torch.Tensor:
    """Group members' k_proj rows (g, hd, ...) -> the shared head's rows (hd, ...)."""
    return _shared_in_layout(rows[:, merge.layout], merge)[_unordered(merge)]


def key_reader_rows(rows: torch.Tensor, merge: KeyMerge, member: int) -> torch.Tensor:
    """q_proj rows (hd, ...) of a query head that read `member`, rewritten to read the shared head."""
    r, rows = merge.rotary, rows[merge.layout]
    out = pair_multiply(rows, merge.up[:, member].conj(), r)
    if rows.shape[0] > r:
        flat = rows[r:].reshape(rows.shape[0] - r, -1)
        out[r:] = (merge.pass_up[member].to(rows.dtype) @ flat).reshape(out[r:].shape)
    return out[_unordered(merge)]


def reconstructed_key_rows(rows: torch.Tensor, merge: KeyMerge) -> torch.Tensor:
    """Each member's k_proj rows as read back from the shared head: (g, hd, ...) -> (g, hd, ...)."""
    r, shared = merge.rotary, _shared_in_layout(rows[:, merge.layout], merge)
    out = []
    for m in range(rows.shape[0]):
        rec = pair_multiply(shared, merge.up[:, m], r)
        if rows.shape[1] > r:
            flat = shared[r:].reshape(rows.shape[1] - r, -1)
            rec[r:] = (merge.pass_up[m].T.to(rows.dtype) @ flat).reshape(rec[r:].shape)
        out.append(rec[_unordered(merge)])
    return torch.stack(out)


def shared_value_rows(rows: torch.Tensor, merge: ValueMerge) -> torch.Tensor:
    """Group members' v_proj rows (g, hd, ...) -> the shared head's rows: sum_j down_j^T W_j."""
    flat = rows.reshape(rows.shape[0], rows.shape[1], -1)
    return torch.einsum("gde,gdk->ek", merge.down.to(rows.dtype), flat).reshape(rows.shape[1:])


def reconstructed_value_rows(rows: torch.Tensor, merge: ValueMerge) -> torch.Tensor:
    """Each member's v_proj rows as read back from the shared head: up_j^T W~."""
    shared = shared_value_rows(rows, merge).reshape(rows.shape[1], -1)
    return torch.einsum("gde,dk->gek", merge.up.to(rows.dtype), shared).reshape(rows.shape)


def _merge_on(merge: KeyMerge | ValueMerge, device: torch.device) -> KeyMerge | ValueMerge:
    moved = (getattr(merge, f.name) for f in fields(merge))
    return type(merge)(*(t.to(device) if t is not None else None for t in moved))


def norm_gain(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """What a norm's stored weight multiplies by: the weight, or 1 + weight for Gemma's rmsnorm_1p."""
    return weight + 1 if norm == "rmsnorm_1p" else weight


def gain_weight(gain: torch.Tensor, norm: str) -> torch.Tensor:
    """The stored weight of a norm that multiplies by `gain` (norm_gain's inverse)."""
    return gain - 1 if norm == "rmsnorm_1p" else gain


def _pairs_to_dims(x: torch.Tensor) -> torch.Tensor:
    """Per-pair values (..., r/2) -> per-dim (..., r) in the rotate-half layout (pair i is dims i, i + r/2)."""
    return torch.cat([x, x], -1)


def _member_scale(merge: KeyMerge) -> torch.Tensor:
    """m (r,) per dim: the mean over the members that read each pair of 1 / |up_j|, which brings the
    shared key back to its members' scale (1 on a pair no member reads)."""
    up = merge.up.abs()  # (r/2, g); a member with up 0 on a pair is not read there: the mean skips it
    reads = up > 1e-12 * up.amax(1, keepdim=True).clamp_min(1e-300)
    inverse = torch.where(reads, 1 / up.clamp_min(1e-300), torch.zeros_like(up)).sum(1)
    return _pairs_to_dims(torch.where(reads.any(1), inverse / reads.sum(1).clamp_min(1), torch.ones_like(inverse)))


def normed_key_rows(rows: torch.Tensor, gains: torch.Tensor, merge: KeyMerge) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-head key norm's group, members' k_proj rows (g, hd, ...) and norm gains (g, hd) -> the
    shared head's k_proj rows (hd, ...) and norm gain (hd,): the norm-aware realisation (docs/method.md).

    The merge is computed on the normalised keys z_j = gain * W_j x / rms(W_j x). With each member's
    RMS near its mean r_j (times a factor common to the group, which a norm divides out), the shared
    key sum_j down_j z_j is gain * sum_j down_j W_j x / r_j when the gain commutes with the maps (they
    scale each pair, and turn it where the gain is equal within the pair). The shared head stores
    W~ = mean(r) / m * sum_j down_j W_j / r_j and gain m * gain, m per pair = the mean over members of
    1 / |up_j| (what brings the shared key back to each member's scale, so the norm sees a vector of
    the members' RMS; mean(r) keeps the norm's eps as it weighed). Exact for copies, and for per-pair
    rotations of one head when the gain is equal within each pair; a gain of 0 (Gemma's switched-off
    dims) stays 0, its row the first member's. Members with gains of their own (a merged model merged
    again) share their mean."""
    if merge.rms is None or merge.rotary != rows.shape[1]:
        raise ValueError("a per-head key norm merges with its members' RMS and every dim rotary, pair by pair")
    column = lambda t: t.reshape((-1,) + (1,) * (rows.dim() - 2))  # noqa: E731  (hd,) against rows (hd, ...)
    normalised = rows / merge.rms.reshape((-1,) + (1,) * (rows.dim() - 1))  # W_j / r_j
    m = _member_scale(merge)
    shared = _shared_in_layout(normalised, merge) * column(merge.rms.mean() / m)  # every pair exact: no reordering
    gain = gains.mean(0)
    # A dim whose gain is 0 is 0 in every calibrated key: it has no merge of its own, but it still
    # counts in what the norm divides by, so the shared head keeps the first member's row there.
    off = gain == 0
    shared[off] = merge.rms.mean() * normalised[0][off]
    return shared, torch.where(off, torch.zeros_like(gain), gain * m)


def normed_reader_rows(rows: torch.Tensor, gain: torch.Tensor, merge: KeyMerge, member: int):
    """q_proj rows (hd, ...) and q-norm gain (hd,) of a query head that read `member`, rewritten to
    read the shared head: the reading map's phase turns the rows (a rotation keeps the norm's
    divisor), its modulus scales the gain. Exact when the gain is equal within each pair."""
    c = merge.up[:, member].conj()
    phase = torch.where(c.abs() > 0, c / c.abs().clamp_min(1e-300), torch.ones_like(c))  # no turn where up is 0
    return pair_multiply(rows, phase, merge.rotary), gain * _pairs_to_dims(c.abs())


def _stored(sd: dict, name: str, where: torch.device, hd: int | None = None) -> torch.Tensor:
    """sd[name] in float64 on `where`; with hd, split into heads (n, hd, ...)."""
    t = sd[name].to(where, torch.float64)
    return heads(t, hd) if hd is not None else t


def _put(sd: dict, name: str, new: torch.Tensor) -> None:
    """sd[name] = new, in the old tensor's dtype and place."""
    sd[name] = new.to(sd[name].device, sd[name].dtype)


def _member_of(groups: list[list[int]]) -> dict[int, tuple[int, int]]:
    """Source head j -> (its group, its place in the group)."""
    return {j: (g, m) for g, members in enumerate(groups) for m, j in enumerate(members)}


def _merge_keys(sd, pre, names, index, groups, merges, where, hd) -> None:
    """One layer's key groups merged (shared k_proj rows), every query head reading its key's
    shared head through up* (q_proj rows)."""
    key_of = _member_of(groups)
    for s in names:
        k, q = _stored(sd, f"{pre}.k_proj.{s}", where, hd), _stored(sd, f"{pre}.q_proj.{s}", where, hd)
        shared = [shared_key_rows(k[g], mg) for g, mg in zip(groups, merges)]
        readers = [key_reader_rows(q[h], merges[key_of[j][0]], key_of[j][1]) for h, j in enumerate(index)]
        _put(sd, f"{pre}.k_proj.{s}", unheads(torch.stack(shared)))
        _put(sd, f"{pre}.q_proj.{s}", unheads(torch.stack(readers)))


def _normed_readers(q, q_gain, index, merges, key_of) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`normed_reader_rows` of every query head h (rows q[h], gain q_gain[h]), reading key head index[h]."""
    return [normed_reader_rows(q[h], q_gain[h], merges[key_of[j][0]], key_of[j][1]) for h, j in enumerate(index)]


def _merge_normed_keys(sd, pre, names, index, groups, merges, where, hd, norm: str) -> None:
    """`_merge_keys` for a per-head qk-norm layer: `normed_key_rows` and `normed_reader_rows`, the
    norms' weights becoming one row per head."""
    key_of = _member_of(groups)
    k_gain = norm_gain(_stored(sd, f"{pre}.k_norm.weight", where), norm).expand(len(key_of), hd)
    q_gain = norm_gain(_stored(sd, f"{pre}.q_norm.weight", where), norm).expand(len(index), hd)
    for s in names:
        k, q = _stored(sd, f"{pre}.k_proj.{s}", where, hd), _stored(sd, f"{pre}.q_proj.{s}", where, hd)
        shared = [normed_key_rows(k[g], k_gain[g], mg) for g, mg in zip(groups, merges)]
        readers = _normed_readers(q, q_gain, index, merges, key_of)
        _put(sd, f"{pre}.k_proj.{s}", unheads(torch.stack([rows for rows, _ in shared])))
        _put(sd, f"{pre}.q_proj.{s}", unheads(torch.stack([rows for rows, _ in readers])))
    for name, new in (("k_norm", [g for _, g in shared]), ("q_norm", [g for _, g in readers])):
        sd[f"{pre}.{name}.weight"] = gain_weight(torch.stack(new), norm).to(sd[f"{pre}.{name}.weight"])


def _unscaled(energy: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """E[z^2] / gain^2 per dim (0 where the gain is 0)."""
    return torch.where(gain == 0, torch.zeros_like(energy), energy / torch.where(gain == 0, 1.0, gain) ** 2)


def _merge_layer_normed_keys(sd, pre, names, index, groups, merges, where, hd, norm: str) -> None:
    """`_merge_keys` under a norm over the layer's whole key projection (OLMo 2; docs/method.md). Each
    shared head merges its members' normalised keys z_j (gain included) and is put back on their
    scale before the norm: divided per dim by d = m * p (m `_member_scale`, p the members' mean gain).
    The layer's divisor then changes per token by rho: rho^2 = (mean over the new dims of
    (z~_d / d)^2 + eps / r^2) with r^2 = the old divisor squared, and eps / r^2 = 1 - the mean over the
    old dims of (z_d / gain_d)^2. The new gains are sqrt(E[rho^2]) * d (E from KeyMerge.energy).
    Exact for copies in groups of one size (rho = 1) and, with gains equal within each pair, for
    per-pair turns. A dim whose gain is 0 in every member stays 0; what it added to the old divisor
    is not known from the normalised keys, so there the new divisor is approximate."""
    if any(mg.energy is None or mg.rotary != hd for mg in merges):
        raise ValueError("a layer-wide key norm merges with its pairs' moments and every dim rotary, pair by pair")
    key_of = _member_of(groups)
    k_gain = heads(norm_gain(_stored(sd, f"{pre}.k_norm.weight", where), norm), hd)  # (n, hd)
    q_gain = heads(norm_gain(_stored(sd, f"{pre}.q_norm.weight", where), norm), hd)  # (H, hd)
    mean_gain = [k_gain[g].abs().mean(0) for g in groups]  # the signs are in the rows (gain_j * W_j)
    d = [torch.where(p == 0, torch.ones_like(p), _member_scale(mg) * p) for p, mg in zip(mean_gain, merges)]
    new_dims = sum((mg.energy[0] / dg**2).sum() for mg, dg in zip(merges, d)) / (len(groups) * hd)
    old_dims = sum(_unscaled(mg.energy[1:], k_gain[g]).sum() for g, mg in zip(groups, merges)) / (len(key_of) * hd)
    rho = (new_dims + 1 - old_dims).clamp_min(1e-12).sqrt()
    for s in names:
        k, q = _stored(sd, f"{pre}.k_proj.{s}", where, hd), _stored(sd, f"{pre}.q_proj.{s}", where, hd)
        gained = k * k_gain.reshape(k_gain.shape + (1,) * (k.dim() - 2))  # gain_j * W_j
        column = lambda t: t.reshape((-1,) + (1,) * (k.dim() - 2))  # noqa: E731  (hd,) against rows (hd, ...)
        shared = [_shared_in_layout(gained[g], mg) / column(dg) for g, mg, dg in zip(groups, merges, d)]
        readers = _normed_readers(q, q_gain, index, merges, key_of)
        _put(sd, f"{pre}.k_proj.{s}", unheads(torch.stack(shared)))
        _put(sd, f"{pre}.q_proj.{s}", unheads(torch.stack([rows for rows, _ in readers])))
    k_new = [torch.where(p == 0, torch.zeros_like(p), rho * dg) for p, dg in zip(mean_gain, d)]
    for name, new in (("k_norm", k_new), ("q_norm", [g for _, g in readers])):
        sd[f"{pre}.{name}.weight"] = gain_weight(torch.cat(new), norm).to(sd[f"{pre}.{name}.weight"])


def _merge_values(sd, pre, names, index, groups, merges, where, hd) -> None:
    """One layer's value groups merged (shared v_proj rows), each query head's W_O columns reading
    its value's shared head through up."""
    value_of = _member_of(groups)
    for s in names:
        v = _stored(sd, f"{pre}.v_proj.{s}", where, hd)
        _put(
            sd,
            f"{pre}.v_proj.{s}",
            unheads(torch.stack([shared_value_rows(v[g], mg) for g, mg in zip(groups, merges)])),
        )
    o_heads = heads(sd[f"{pre}.o_proj.weight"].T.to(where, torch.float64, copy=True), hd)  # (H, hd, D): W_O[h]
    for h, j in enumerate(index):  # y_h W_O[h] ~ y~ (up_j W_O[h])
        g, m = value_of[j]
        o_heads[h] = merges[g].up[m] @ o_heads[h]
    _put(sd, f"{pre}.o_proj.weight", unheads(o_heads).T.contiguous())


def aligned_merge(model: Transformer, layers: list[LayerPlan], merges: list[dict], device=None) -> Transformer:
    """The merged model: each group of `layers` becomes one head by its merge, the reading maps folded
    into q_proj (keys) and o_proj (values); with a per-head qk-norm, by the norm-aware realisation
    (`normed_key_rows`), the norms' weights one per head; with a norm over the layer's whole key
    projection, by `_merge_layer_normed_keys`. merges[l] = {"key": [KeyMerge per group],
    "value": [...]}. The attention's tensors are new, computed one layer at a time in float64 on
    `device` (default: where the model's weights are; for a model kept in CPU memory, each layer's
    projections go there and the results come back) and placed beside the old ones; every other
    tensor is `model`'s own, shared (no second copy of the model; `dha.train.train` gives a model
    its own copies of the weights it trains)."""
    cfg, hd = model.config, model.config.head_dim
    sd = tensors_of(model)
    key_index, value_index = [], []
    for l, (plan_layer, merge) in enumerate(zip(layers, merges)):
        pre = f"layers.{l}.attn"
        where = torch.device(device) if device is not None else sd[f"{pre}.o_proj.weight"].device
        merge = {kind: [_merge_on(m, where) for m in ms] for kind, ms in merge.items()}
        names = [s for s in ("weight", "bias") if f"{pre}.k_proj.{s}" in sd]
        keys = (sd, pre, names, cfg.key_index[l], plan_layer.key_groups, merge["key"], where, hd)
        if cfg.qk_norm == "head":
            _merge_normed_keys(*keys, cfg.norm)
        elif cfg.qk_norm == "full":
            _merge_layer_normed_keys(*keys, cfg.norm)
        else:
            _merge_keys(*keys)
        _merge_values(sd, pre, names, cfg.value_index[l], plan_layer.value_groups, merge["value"], where, hd)
        key_index.append(regroup_map(cfg.key_index[l], plan_layer.key_groups))
        value_index.append(regroup_map(cfg.value_index[l], plan_layer.value_groups))
    merged = with_maps(cfg, key_index, value_index)
    if cfg.qk_norm == "head":
        merged.qk_norm_weights = "head"
    return build(merged, sd)


def closed_form_merges(stats: list[LayerStats], layers: list[LayerPlan]) -> list[dict]:
    """The aligned merge of every group of `layers` (one LayerPlan per layer)."""
    return [
        {
            "key": [group_merge(s, "key", g) for g in lp.key_groups],
            "value": [group_merge(s, "value", g) for g in lp.value_groups],
        }
        for s, lp in zip(stats, layers)
    ]


def reconstructed_outputs(outputs: torch.Tensor, kind: str, groups: list[list[int]], merges: list) -> torch.Tensor:
    """Heads' outputs (N, n, hd) as the merged heads give them back: each member through its group's
    merge (the same maps as on weight rows, `reconstructed_key_rows` / `reconstructed_value_rows`,
    applied to the N output vectors at once)."""
    out = torch.empty_like(outputs)
    for members, merge in zip(groups, merges):
        x = outputs[:, members]  # (N, g, hd)
        if kind == "value":
            out[:, members] = torch.einsum(
                "ne,gef->ngf", torch.einsum("ngd,gde->ne", x, merge.down.to(x.dtype)), merge.up.to(x.dtype)
            )
            continue
        r, x = merge.rotary, x[..., merge.layout.to(x.device)]
        z = complex_pairs(x, r)  # (N, g, r/2)
        shared = torch.einsum("ngi,ig->ni", z, merge.down.to(z.dtype))  # (N, r/2)
        rec = shared[:, None, :] * merge.up.T.to(z.dtype)[None]  # (N, g, r/2)
        passed = torch.einsum(
            "ne,gef->ngf",
            torch.einsum("ngd,gde->ne", x[..., r:], merge.pass_down.to(x.dtype)),
            merge.pass_up.to(x.dtype),
        )
        out[:, members] = torch.cat([rec.real, rec.imag, passed], -1)[..., _unordered(merge).to(x.device)]
    return out
