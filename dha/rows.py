"""The rows a training run reads, in which order, at which positions, with which copies in them.

Data order: the training rows are visited in epochs; epoch e is a permutation of all rows drawn
from a generator seeded by (seed, e). The data position (rows consumed) is an integer saved in
every checkpoint, so a resumed run reads exactly the rows the uninterrupted run would have.

Skipped positions (`position_span`, PoSE: Zhu et al. 2024, "PoSE: Efficient Context Window
Extension of LLMs via Positional Skip-wise Training"): each row is cut in two at a random point and
the second part's positions jump forward by a random skip, so that a row of W tokens has positions
spread over up to `position_span`. Attention then sees distances up to the span at the cost of
W-token rows. The cut and the skip are drawn from the row's data position (`skip_positions`), so a
resumed run, and any split over processes and micro batches, sees the same positions; the teacher
reads the same positions as the student.

Recall spans (`recall_tokens`): natural text rarely needs a token thousands of positions back, so
training on it teaches little about reading far. With recall spans the last n tokens of each row
repeat n tokens of its first part (before the skip, with skipped positions), so that predicting
them takes keys up to the row's whole span back: what a retrieval head does when it copies a
passkey. The copied span is drawn from the row's data position (`recall_rows`), like the skip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .data import DataError, blocks
from .errors import UserError


def as_blocks(data, block_size: int, what: str) -> Tensor:
    """A 1-D token stream cut into (n, block_size) rows, or 2-D rows as given."""
    if not isinstance(data, Tensor):
        data = torch.as_tensor(data)
    if data.dim() == 1:
        if data.numel() < block_size:
            raise DataError(
                f"{what} data has {data.numel()} tokens, shorter than one block of {block_size}: "
                "use more data or a smaller --block-size"
            )
        return blocks(data.long(), block_size)
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise DataError(
            f"{what} data must be a 1-D token stream or (n, block) rows with n >= 1 and block >= 2, "
            f"got shape {tuple(data.shape)}"
        )
    return data.long()


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    """The order rows are read in during `epoch`: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g)


def rows_at(num_rows: int, seed: int, start: int, count: int) -> Tensor:
    """Row indices at global data positions [start, start + count) (may cross epochs)."""
    out, position = [], start
    while position < start + count:
        epoch, offset = divmod(position, num_rows)
        take = min(num_rows - offset, start + count - position)
        out.append(epoch_order(num_rows, seed, epoch)[offset : offset + take])
        position += take
    return torch.cat(out)


def skip_positions(width: int, span: int, seed: int, data_positions: Tensor) -> Tensor:
    """(len(data_positions), width) position ids for rows at these data positions (module doc,
    "Skipped positions"): 0..c-1, then c+s..width-1+s, with the cut c in [1, width-1] and the skip
    s in [0, span-width], drawn from a generator seeded by (seed, data position). The largest
    position is at most span-1."""
    out = torch.empty(len(data_positions), width, dtype=torch.long)
    base = torch.arange(width)
    for i, p in enumerate(data_positions.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * p + 1)
        cut = int(torch.randint(1, width, (1,), generator=g))
        skip = int(torch.randint(0, span - width + 1, (1,), generator=g))
        out[i] = torch.where(base < cut, base, base + skip)
    return out


def recall_rows(rows: Tensor, n: int, seed: int, data_positions: Tensor, positions: Tensor | None) -> Tensor:
    """A copy of `rows` ((rows, W + 1) tokens) whose last n tokens repeat n tokens of each row's first
    part (module doc, "Recall spans"): those at [o, o + n), with o drawn in [0, max(0, cut - n)] from
    a generator seeded by (seed, data position). The cut is where `positions` (the inputs' position
    ids, (rows, W); None: no skip) first jump; without a jump it is W - n, so the copy never
    overlaps itself."""
    out = rows.clone()
    width = rows.shape[1] - 1
    for i, p in enumerate(data_positions.tolist()):
        cut = width - n
        if positions is not None:
            jumps = (positions[i, 1:] - positions[i, :-1] != 1).nonzero()
            cut = min(cut, int(jumps[0]) + 1) if len(jumps) else cut
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * p + 2)
        o = int(torch.randint(0, max(0, cut - n) + 1, (1,), generator=g))
        out[i, -n:] = rows[i, o : o + n]
    return out


def check_position_span(span: int, mc, width: int) -> None:
    """Refuse a position span (TrainConfig.position_span; 0: off) that rows of `width` tokens or the
    model of ModelConfig `mc` cannot take."""
    if not span:
        return
    if span <= width:
        raise UserError(f"--position-span {span} must exceed the training rows' {width} tokens")
    if span > mc.max_position_embeddings:
        raise UserError(f"--position-span {span} is beyond the model's {mc.max_position_embeddings} positions")
    if mc.sliding_window is not None:
        raise UserError(
            f"--position-span: the model attends within a sliding window of {mc.sliding_window} tokens, "
            "which counts tokens, not positions; train it on rows as long as the context instead"
        )


def check_recall_tokens(n: int, width: int) -> None:
    """Refuse recall spans (TrainConfig.recall_tokens; 0: off) of n tokens that rows of `width` tokens
    cannot hold beside the first part they copy from."""
    if 2 * n >= width:
        raise UserError(f"--recall-tokens {n} must be under half the training rows' {width} tokens")
