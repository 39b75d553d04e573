"""Run a model on calibration tokens one decoder layer at a time, as GPTQ and llm-compressor do.

The embedding runs once; then each decoder layer in turn is brought to the compute device (its
floating tensors in float32, or float64 for a float64 model), applied to the hidden states of
every calibration batch, and dropped. The rest of the model stays where it is: in CPU memory, or
in the memory-mapped safetensors it was loaded from (`safetensors.torch.load_file` maps the file;
a model loaded in the file's own dtype is never copied). So the device holds one layer, the
hidden states of the calibration tokens and the activations of one batch; converting a 70B model
needs no more GPU memory than that. The model is never modified or copied: a layer runs through
`torch.func.functional_call` on device copies of its own tensors (no copy at all when the model
is already there in the compute dtype).

- `forward_heads`: per layer, in order, the query, key and value heads' outputs (before RoPE) on
  the layer's input, which is the output of the source's own previous layers: what one
  whole-model forward pass sees. With qk-norm the queries and keys are taken after their norms
  (what RoPE and attention see), and a per-head norm ("head") adds "key_rms": each key head's RMS
  before its norm (what the norm divides by, on average, over every calibration token), which the
  norm-aware merge needs.
- `backward_heads`: the same outputs with the gradient of the summed next-token loss at the key
  and value outputs, from the last layer back. A forward sweep keeps every layer's input hidden
  states (in CPU memory); the loss gradient at the last hidden states is taken with the
  vocabulary in chunks (`loss_gradient`: the output matrix is never on the device whole); then
  each layer, last first, is run again with autograd on its stored input and the gradient at its
  output is pulled back through it (`torch.autograd.grad`): the whole-model backward pass, one
  layer at a time.

Both give what the whole-model pass gives, to float rounding (tests: fp32, atol 1e-5).

Shape legend: B blocks in a batch, T tokens per block, N = n_blocks * T, D hidden size, H query
heads, n key or value heads of a layer, hd head dim, V vocabulary size.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .model import Transformer

LM_HEAD_CHUNK_BYTES = 2**25  # bound on one chunk of the output matrix, and on its logits, in the compute dtype
PROJECTIONS = (("q_proj", "queries"), ("k_proj", "keys"), ("v_proj", "values"))
NORMED = (("q_norm", "queries"), ("k_norm", "keys"), ("v_proj", "values"))
RAW_KEYS = ("k_proj", "raw_keys")  # a per-head norm's divisor: `_collected` turns it into "key_rms"


def capture_points(model: Transformer) -> tuple[tuple[str, str], ...]:
    """(module of a layer's attention, name) whose outputs `forward_heads` collects: the projections,
    or with qk-norm the normalised queries and keys (and, per head, the keys before their norm)."""
    if model.config.qk_norm is None:
        return PROJECTIONS
    return (*NORMED, RAW_KEYS) if model.config.qk_norm == "head" else NORMED


def compute_device(model: Transformer, device=None) -> torch.device:
    """`device` if given (e.g. CUDA for a model kept on the CPU, one layer there at a time), else the
    model's own device: the verbs load the model onto --device, so their work stays there."""
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def compute_dtype(model: Transformer) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def tensors_on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`module`'s parameters and buffers on `device`, floating ones in `dtype`: the same tensors when
    already so, else views into one new buffer (a single allocation, returned whole when dropped)."""
    named = [(name, t.detach()) for name, t in [*module.named_parameters(), *module.named_buffers()] if t is not None]
    moving = [(name, t) for name, t in named if t.is_floating_point() and (t.device != device or t.dtype != dtype)]
    out = {
        name: t.to(device) for name, t in named if not any(name == m for m, _ in moving)
    }  # already there, or integer
    buffer = torch.empty(sum(t.numel() for _, t in moving), device=device, dtype=dtype)
    start = 0
    for name, t in moving:
        out[name] = buffer[start : start + t.numel()].view(t.shape).copy_(t)
        start += t.numel()
    return out


class Sweep:
    """The calibration blocks of one sweep, cut into batches, and what every layer's call needs."""

    def __init__(self, model: Transformer, blocks: torch.Tensor, batch_size: int, device=None):
        if blocks.dim() != 2 or blocks.numel() == 0:
            raise ValueError(f"blocks must be a non-empty (n_blocks, T) tensor, got shape {tuple(blocks.shape)}")
        self.model, self.device, self.dtype = model, compute_device(model, device), compute_dtype(model)
        self.batches = [blocks[s : s + batch_size] for s in range(0, blocks.shape[0], batch_size)]
        T = blocks.shape[1]
        positions = torch.arange(T, device=self.device)
        self.rope = model.rope(positions, self.dtype)
        self.mask = model.causal_mask(0, T, T, self.device)
        self.positions = positions

    def embed(self) -> list[torch.Tensor]:
        """The hidden states entering layer 0, one (B, T, D) tensor per batch, on the device."""
        model, out = self.model, []
        for ids in self.batches:
            x = model.embed(ids.to(model.embed.weight.device)).to(self.device, self.dtype)
            if model.config.position == "learned":
                pos = model.pos_embed(self.positions.to(model.pos_embed.weight.device) + model.config.position_offset)
                x = x + pos.to(self.device, self.dtype)
            out.append(x)
        return out

    def layer(self, l: int) -> dict[str, torch.Tensor]:
        return tensors_on(self.model.layers[l], self.device, self.dtype)

    def run(self, l: int, weights: dict, x: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        """Layer l on x (B, T, D); with `capture`, appends (name, output) of its `capture_points`."""
        block = self.model.layers[l]
        with _capturing(block, capture_points(self.model), capture):
            return functional_call(block, weights, (x, self.rope, self.mask, None))


@contextlib.contextmanager
def _capturing(block: nn.Module, points, capture: list | None):
    if capture is None:
        yield
        return
    handles = [
        getattr(block.attn, module).register_forward_hook(lambda m, a, out, name=name: capture.append((name, out)))
        for module, name in points
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _heads(outputs: list[torch.Tensor], hd: int) -> torch.Tensor:
    """Per-batch outputs (B, T, n*hd) or (B, T, n, hd) -> (N, n, hd) float32 on the CPU."""
    return torch.cat([t.detach().reshape(t.shape[0] * t.shape[1], -1, hd).float().cpu() for t in outputs])


def _collected(capture: list, points, hd: int) -> dict[str, torch.Tensor]:
    """The captured outputs by name, (N, n, hd) each; raw keys become "key_rms" (n,) float64."""
    out = {name: _heads([t for n, t in capture if n == name], hd) for _, name in points}
    raw = out.pop("raw_keys", None)
    if raw is not None:
        out["key_rms"] = raw.double().pow(2).mean((0, 2)).sqrt()
    return out


def forward_heads(
    model: Transformer, blocks: torch.Tensor, batch_size: int = 4, device=None
) -> Iterator[tuple[int, dict]]:
    """For each layer l in order: (l, {"queries": (N, H, hd), "keys": (N, Hk, hd), "values": (N, Hv, hd)}),
    float32 on the CPU, pre-RoPE, on the hidden states the source's layers 0..l-1 give."""
    sweep = Sweep(model, blocks, batch_size, device)
    hd, points = model.config.head_dim, capture_points(model)
    xs = sweep.embed()
    with torch.no_grad():
        for l in range(model.config.num_layers):
            weights, capture = sweep.layer(l), []
            xs = [sweep.run(l, weights, x, capture) for x in xs]
            del weights
            yield l, _collected(capture, points, hd)


def _final_hidden(sweep: Sweep, x: torch.Tensor) -> torch.Tensor:
    """The final norm on the last hidden states x (B, T, D) (x itself without one)."""
    model = sweep.model
    if not model.config.final_norm:
        return x
    return functional_call(model.norm, tensors_on(model.norm, sweep.device, sweep.dtype), (x,))


def _output_chunks(sweep: Sweep, flat: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, logits (M, rows), W_chunk (rows, D)) for each chunk of rows of the output matrix, on
    the device: LM_HEAD_CHUNK_BYTES bounds a chunk and its logits of the M positions of `flat`."""
    weight, bias = sweep.model.lm_head.weight, sweep.model.lm_head.bias
    rows = max(1, LM_HEAD_CHUNK_BYTES // (max(weight.shape[1], flat.shape[0]) * torch.finfo(sweep.dtype).bits // 8))
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].detach().to(sweep.device, sweep.dtype)
        b = bias[start : start + rows].detach().to(sweep.device, sweep.dtype) if bias is not None else None
        yield start, F.linear(flat, w, b), w


def _hit(targets: torch.Tensor, start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, columns) whose next token falls in the chunk of vocabulary rows [start, start + rows)."""
    hit = (targets >= start) & (targets < start + rows)
    return hit.nonzero()[:, 0], targets[hit] - start


def _logsumexp(sweep: Sweep, flat: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over the vocabulary, the target's logit) of every position of `flat` (M, D)."""
    lse = torch.full((flat.shape[0],), float("-inf"), device=sweep.device, dtype=sweep.dtype)
    picked = torch.zeros_like(lse)
    for start, chunk, w in _output_chunks(sweep, flat):
        lse = torch.logaddexp(lse, chunk.logsumexp(-1))
        rows, cols = _hit(targets, start, w.shape[0])
        picked[rows] = chunk[rows, cols]
    return lse, picked


def loss_gradient(sweep: Sweep, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(sum over positions of the next-token loss)/dx at the last hidden states x (B, T, D).

    The final norm runs with autograd; the output matrix comes to the device in chunks of rows
    (`_output_chunks`), twice: once for each position's logsumexp over the vocabulary, once for
    dL/dz = sum_chunks (softmax - onehot) @ W_chunk. Positions whose next token is past the block
    (the last) have no loss."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        z = _final_hidden(sweep, x)
    flat = z.detach()[:, :-1].reshape(-1, z.shape[-1])  # (B*(T-1), D)
    targets = ids[:, 1:].reshape(-1).to(sweep.device)
    with torch.no_grad():
        lse, _ = _logsumexp(sweep, flat, targets)
        grad_flat = torch.zeros_like(flat)
        for start, chunk, w in _output_chunks(sweep, flat):
            p = chunk.sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary, this chunk's columns
            rows, cols = _hit(targets, start, w.shape[0])
            p[rows, cols] -= 1.0
            grad_flat += p @ w
    grad_z = torch.zeros_like(z)
    grad_z[:, :-1] = grad_flat.reshape(z.shape[0], z.shape[1] - 1, -1)
    return torch.autograd.grad(z, x, grad_z)[0] if z is not x else grad_z


def nll_sum(model: Transformer, blocks: torch.Tensor, batch_size: int = 4, device=None) -> float:
    """The summed next-token negative log-likelihood (nats) of tokens 1..T-1 of every row of
    `blocks` (n, T), each predicted from its row's earlier tokens, computed one decoder layer at a
    time on `device` (a forward sweep, then the final norm and the output matrix in chunks): what
    `dha.model.next_token_nll` sums over the rows, for a model kept off the device."""
    sweep = Sweep(model, blocks, batch_size, device)
    xs = sweep.embed()
    total = 0.0
    with torch.no_grad():
        for l in range(model.config.num_layers):
            weights = sweep.layer(l)
            xs = [sweep.run(l, weights, x) for x in xs]
            del weights
        for x, ids in zip(xs, sweep.batches):
            z = _final_hidden(sweep, x)
            lse, picked = _logsumexp(sweep, z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1).to(sweep.device))
            total += float((lse - picked).double().sum())
    return total


def backward_heads(
    model: Transformer, blocks: torch.Tensor, batch_size: int = 4, device=None
) -> Iterator[tuple[int, dict, dict]]:
    """For each layer l from the last to the first: (l, heads, grads), heads as `forward_heads`
    gives them and grads {"keys": (N, Hk, hd), "values": (N, Hv, hd)}: d(sum of next-token
    losses)/d(the key and value projections' outputs), float32 on the CPU. Only gradients with
    respect to activations are taken: the model's parameters and their .grad are untouched."""
    sweep = Sweep(model, blocks, batch_size, device)
    hd, L = model.config.head_dim, model.config.num_layers
    xs, inputs = sweep.embed(), []
    with torch.no_grad():
        for l in range(L):
            inputs.append([x.cpu() for x in xs])  # no copy when computing on the CPU
            weights = sweep.layer(l)
            xs = [sweep.run(l, weights, x) for x in xs]
            del weights
    gs = [loss_gradient(sweep, x, ids) for x, ids in zip(xs, sweep.batches)]
    del xs
    for l in reversed(range(L)):
        weights, capture = sweep.layer(l), []
        grads = {"keys": [], "values": []}
        for b, x in enumerate(inputs[l]):
            start = len(capture)
            with torch.enable_grad():
                x = x.to(sweep.device).requires_grad_()
                out = sweep.run(l, weights, x, capture)
                named = dict(capture[start:])
                gx, gk, gv = torch.autograd.grad(out, [x, named["keys"], named["values"]], gs[b])
            gs[b] = gx
            grads["keys"].append(gk)
            grads["values"].append(gv)
        inputs[l] = None  # this layer's input is no longer needed
        del weights
        yield l, _collected(capture, capture_points(model), hd), {name: _heads(ts, hd) for name, ts in grads.items()}
