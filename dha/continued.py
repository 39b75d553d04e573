"""Training a loaded SOURCE on DATA: the `train` verb, and `convert --tokens N` after a baseline.

The loop itself is `dha.train.train`, which knows tensors only; this module gives it the token
streams of DATA (`dha.data.load_tokens`, tokenised with the source's own tokenizer: the train
split to train on, the held-out split to evaluate on) and names the run for its run.json
(`source_identity`), so that `--resume` can tell the same run from another one.

`dha.pipeline.continued_stage` (stage 4 of `--method dha`) is a training run of its own, not this:
it trains on token streams the pipeline already split, reads on from where the fusion stage stopped
and keeps its state in a stage directory of the DHA run; the held-out rule they share is
`training_heldout`.
"""

from __future__ import annotations

import os
import sys

from torch import nn

from .checkpoint import DEFAULT_SOURCE
from .data import load_tokens
from .options import TrainConfig
from .train import Hooks, TrainResult, train


def continue_training(
    loaded,
    data: str | None,
    cfg: TrainConfig,
    *,
    out_dir: str | None = None,
    teacher: nn.Module | None = None,
    hooks: Hooks | None = None,
    resume: str | None = None,
    progress: bool = True,
    text_field: str = "text",
    heldout_fraction: float = 0.1,
    run_info: dict | None = None,
) -> TrainResult:
    """Train `loaded.model` on DATA (tokenised with `loaded.tokenizer`, see dha.data.load_tokens).

    The model is trained in place (loaded.model is set to the trained model), in its own dtype
    (load it in float32 for training; cfg.dtype is only the autocast dtype). With out_dir, the
    final model is saved there with loaded's tokenizer, hf_config, plan and provenance.
    run_info identifies the run in run.json (default: source and data as named)."""
    splits = load_tokens(data, loaded.tokenizer, text_field=text_field, heldout_fraction=heldout_fraction)
    if run_info is None:
        run_info = {"source": loaded.source, "data": splits.source, "text_field": text_field}
    heldout = training_heldout(splits, cfg.block_size)
    if heldout is None and progress:
        print(
            f"dha: warning: {splits.source} has {splits.heldout.numel()} held-out tokens, less than one block: "
            "no held-out evaluation",
            file=sys.stderr,
        )
    result = train(
        loaded.model,
        splits.train,
        heldout,
        cfg,
        teacher=teacher,
        hooks=hooks,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        run_info=run_info,
        loaded=loaded,
    )
    loaded.model = result.model
    return result


def training_heldout(splits, block_size: int):
    """The held-out stream a training run evaluates on (dha.data.TokenSplits' heldout), or None when
    it holds less than one block of `block_size` tokens (no held-out evaluation)."""
    return splits.heldout if splits.heldout.numel() >= block_size else None


def source_identity(source: str | None) -> str:
    """The SOURCE as a stable name for run.json: an absolute path when it is a path."""
    if source is None:
        return DEFAULT_SOURCE
    return os.path.abspath(source) if os.path.exists(source) else source
