"""Skipped positions (`--position-span`, PoSE): rows of W tokens whose positions spread over up to
the span. The model's explicit positions are checked against transformers' own `position_ids`;
the training loop's first loss against a reference computed here from those positions."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dha.cli import main
from dha.errors import UserError
from dha.model import ModelConfig, Transformer
from dha.options import TrainConfig
from dha.rows import rows_at, skip_positions
from dha.train import train
from tests.conftest import ours_from_hf, random_ids, text_file, tiny_llama_hf
from tests.test_train import tiny_source

pytestmark = pytest.mark.usefixtures("one_thread")


def test_skip_positions_layout():
    width, span = 16, 64
    pos = skip_positions(width, span, seed=3, data_positions=torch.arange(200))
    assert pos.shape == (200, width)
    steps = pos.diff(dim=1)
    assert (pos[:, 0] == 0).all() and (steps >= 1).all() and pos.max() <= span - 1
    assert ((steps > 1).sum(1) <= 1).all()  # one jump at most: 0..c-1, then a run from c + s
    assert pos[:, -1].max() >= span - 4 and pos[:, -1].min() <= width + 3  # the skips cover [0, span - width]
    assert len({int(c) for c in (steps > 1).float().argmax(1)}) > 5  # the cut moves
    # drawn from (seed, data position): the same rows give the same positions, in any split
    assert torch.equal(pos[7:9], skip_positions(width, span, 3, torch.tensor([7, 8])))
    assert not torch.equal(pos, skip_positions(width, span, 4, torch.arange(200)))


def test_explicit_positions_match_transformers_position_ids():
    hf = tiny_llama_hf(num_kv_heads=2)
    ours = ours_from_hf(hf)
    ids = random_ids(batch=3, length=16, seed=1)
    positions = skip_positions(16, 200, seed=0, data_positions=torch.arange(3))
    assert (positions[:, -1] > 15).all()  # every row skips
    with torch.no_grad():
        theirs = hf(ids, position_ids=positions).logits
        got = ours(ids, positions=positions)
        plain = ours(ids)
    assert_close(got, theirs, rtol=0, atol=1e-5)  # fp32
    assert (got - plain).abs().max() > 1e-3  # the positions matter for this model


def sharp_llama_hf():
    """A tiny random LLaMA whose attention and logits are sharp enough that positions move its loss."""
    hf = tiny_llama_hf()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
                p.mul_(4.0)
            elif "lm_head" in name:
                p.mul_(8.0)
    return hf


def _config(**overrides) -> TrainConfig:
    base = dict(tokens=4 * 17, block_size=17, batch_tokens=4 * 17, micro_batch=2, lr=0.0, warmup_steps=1)
    base.update(dtype="float32", eval_every=0, seed=5, position_span=96, distill=True)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_training_reads_skipped_positions_for_student_and_teacher(micro_batch):
    hf = sharp_llama_hf()
    rows = random_ids(batch=8, length=17, seed=2)
    cfg = _config(micro_batch=micro_batch)
    order = rows_at(8, cfg.seed, 0, 4)  # the rows of step 1
    positions = skip_positions(16, 96, cfg.seed, torch.arange(4))
    with torch.no_grad():
        # Step 1's rows continued greedily by HF at their skipped positions, so that reading them
        # at other positions costs the loss something (on random tokens the mean hardly moves).
        for t in range(1, 17):
            rows[order, t] = hf(rows[order, :t], position_ids=positions[:, :t]).logits[:, -1].argmax(-1)
        # HF's loss on those rows at those positions (fp32), and at 0..15
        logits = hf(rows[order, :-1], position_ids=positions).logits
        plain = hf(rows[order, :-1]).logits
    targets = rows[order, 1:].flatten()
    reference = F.cross_entropy(logits.flatten(0, 1), targets).item()
    unskipped = F.cross_entropy(plain.flatten(0, 1), targets).item()
    assert unskipped - reference > 1e-3  # 100 times the tolerance below
    first = train(ours_from_hf(hf), rows, None, cfg, progress=False).history[0]
    assert first["loss"] == pytest.approx(reference, abs=1e-5)
    # the teacher (the model before any step) read the same positions: nothing to distill yet
    assert first["distill_loss"] == pytest.approx(0.0, abs=1e-6)


def test_position_span_the_model_cannot_take_is_refused():
    rows = random_ids(batch=8, length=17, seed=2)
    with pytest.raises(UserError, match="beyond the model's 256 positions"):
        train(ours_from_hf(tiny_llama_hf()), rows, None, _config(position_span=257), progress=False)
    cfg = ModelConfig(vocab_size=97, hidden_size=48, num_layers=1, num_heads=6, head_dim=8, intermediate_size=64)
    windowed = Transformer(ModelConfig(**{**cfg.to_dict(), "sliding_window": 8}))
    with pytest.raises(UserError, match="sliding window of 8 tokens"):
        train(windowed, rows, None, _config(), progress=False)


def test_cli_refuses_a_span_within_the_row_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    src, data = tiny_source(str(tmp_path / "src")), text_file(str(tmp_path / "data.txt"))
    common = ["train", src, "--data", data, "--tokens", "64", "--block-size", "16", "--batch-tokens", "32"]
    common.append("--no-progress")
    for span, message in (("16", "more than the block size (16)"), ("100000", "beyond the model's")):
        out = tmp_path / f"out{span}"
        assert main([*common, "--position-span", span, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not os.path.exists(out)
