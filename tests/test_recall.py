"""Recall spans (`--recall-tokens N`): the last N tokens of each training row repeat N tokens of its
first part (before the skip of `--position-span`). The rows are checked against that rule on rows
of distinct tokens; the training loop's first loss against transformers' own loss on those rows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dha.cli import main
from dha.errors import UserError
from dha.rows import recall_rows, rows_at, skip_positions
from dha.train import train
from tests.conftest import ours_from_hf, random_ids, text_file
from tests.test_position_span import _config, sharp_llama_hf
from tests.test_train import tiny_source

pytestmark = pytest.mark.usefixtures("one_thread")


def _first_jump(positions: torch.Tensor) -> int | None:
    """Where a row's position ids first skip ahead (the cut), or None."""
    for t in range(1, len(positions)):
        if positions[t] != positions[t - 1] + 1:
            return t
    return None


def _copied_from(row: torch.Tensor, n: int) -> int:
    """The offset o of the run row[o : o + n] that row's last n tokens repeat (distinct tokens: one)."""
    first = int(row[-n])
    o = first - int(row[0])  # the row's tokens are row[0] + index
    assert torch.equal(row[-n:], torch.arange(first, first + n)), "the last n tokens are not a run of the row"
    return o


@pytest.mark.parametrize("skipped", [True, False])
def test_recall_rows_repeat_a_span_of_the_first_part(skipped):
    width, n, rows_n = 64, 8, 300
    rows = torch.arange(width + 1).repeat(rows_n, 1) + 1000 * torch.arange(rows_n)[:, None]  # distinct tokens
    where = torch.arange(10, 10 + rows_n)
    positions = skip_positions(width, 512, seed=3, data_positions=where) if skipped else None
    out = recall_rows(rows, n, seed=3, data_positions=where, positions=positions)
    assert torch.equal(out[:, :-n], rows[:, :-n])  # only the last n tokens change
    offsets = []
    for i in range(rows_n):
        o = _copied_from(out[i], n)
        cut = _first_jump(positions[i]) if skipped else None
        end = min(cut, width - n) if cut is not None else width - n
        assert 0 <= o and (o + n <= end or (o == 0 and end < n)), (o, cut)
        offsets.append(o)
    assert len(set(offsets)) > 20  # the span moves
    # drawn from (seed, data position): the same rows give the same spans, in any split
    part = recall_rows(rows[7:9], n, 3, where[7:9], None if positions is None else positions[7:9])
    assert torch.equal(part, out[7:9])
    assert not torch.equal(recall_rows(rows, n, 4, where, positions), out)
    assert int(rows[5, -1]) == 5 * 1000 + width  # the input rows are left as they were


def test_training_reads_recall_rows_for_student_and_teacher():
    hf = sharp_llama_hf()
    rows = random_ids(batch=8, length=17, seed=2)
    cfg = _config(micro_batch=1, recall_tokens=4)
    order = rows_at(8, cfg.seed, 0, 4)  # the rows of step 1
    positions = skip_positions(16, 96, cfg.seed, torch.arange(4))
    recalled = recall_rows(rows[order], 4, cfg.seed, torch.arange(4), positions)
    with torch.no_grad():  # HF's loss (fp32) on the recalled rows, and on the rows as read
        losses = [
            F.cross_entropy(hf(r[:, :-1], position_ids=positions).logits.flatten(0, 1), r[:, 1:].flatten()).item()
            for r in (recalled, rows[order])
        ]
    assert abs(losses[0] - losses[1]) > 1e-3  # the copies move the loss: 100 times the tolerance below
    first = train(ours_from_hf(hf), rows, None, cfg, progress=False).history[0]
    assert first["loss"] == pytest.approx(losses[0], abs=1e-5)
    assert first["distill_loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher read the same rows


def test_recall_tokens_of_half_a_row_are_refused(tmp_path, monkeypatch, capsys):
    rows = random_ids(batch=8, length=17, seed=2)
    with pytest.raises(UserError, match="recall tokens must be >= 0 and less than half the block size"):
        train(ours_from_hf(sharp_llama_hf()), rows, None, _config(recall_tokens=9), progress=False)
    wide = random_ids(batch=4, length=9, seed=2)  # 2-D rows keep their width: 9 tokens
    with pytest.raises(UserError, match="under half the training rows' 9 tokens"):
        train(ours_from_hf(sharp_llama_hf()), wide, None, _config(recall_tokens=5, position_span=0), progress=False)
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    src, data = tiny_source(str(tmp_path / "src")), text_file(str(tmp_path / "data.txt"))
    out = tmp_path / "out"
    args = ["train", src, "--data", data, "--tokens", "64", "--block-size", "16", "--batch-tokens", "32"]
    assert main([*args, "--recall-tokens", "8", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "less than half the block size (16)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(out)
