"""A training run's identity and checkpoints: what `--resume` checks and reads back.

run.json holds the run's identity (source, data, TrainConfig, model). A directory holding another
run is refused (dha.rundir, given `run_identity`, RESUMABLE_CHANGES and `added_defaults` from
here), and a checkpoint resumes only the run that wrote it, up to the settings in
RESUMABLE_CHANGES, which do not change the weights' trajectory.

checkpoints/step_XXXXXXXX.pt holds the model, the optimizer state, the step, the data position
(rows consumed, all ranks together), the RNG states, the hooks' state and the history so far,
written atomically (temp file + rename). Under FSDP a checkpoint is a directory,
step_XXXXXXXX/: every rank writes its own shards of the weights and of the optimizer state with
torch.distributed.checkpoint, beside meta.pt (the rest). Such a checkpoint is read back at any
process count, with or without FSDP. The newest `keep_checkpoints` are kept.
"""

from __future__ import annotations

import copy
import glob
import os
import random
import shutil
import warnings
from dataclasses import MISSING, asdict, fields

import torch
import torch.distributed as dist
from torch import nn

from . import rundir
from .atomic import atomic_file
from .distributed import Dist
from .errors import UserError
from .model import ModelConfig
from .options import TrainConfig

RUN_FORMAT = "dha-train-run/1"
CHECKPOINT_FORMAT = "dha-train-checkpoint/1"
SHARDED_META = "meta.pt"  # beside the shards of a sharded checkpoint: step, history, RNG, identity
# TrainConfig fields that may differ between a run and its resumption: they do not change the
# trajectory of the weights.
RESUMABLE_CHANGES = {
    "config.eval_every",
    "config.save_every",
    "config.keep_checkpoints",
    "config.device",
    "config.micro_batch",  # only the order of sums
    "config.activation_checkpointing",
}  # recomputes the same forward: the same gradients


def run_identity(cfg: TrainConfig, model: nn.Module, run_info: dict | None) -> dict:
    model_cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else None
    return {"format": RUN_FORMAT, "run": dict(run_info or {}), "config": asdict(cfg), "model": model_cfg}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two identities of a training run (dha.rundir.differences): settings a
    resume may change skipped, a TrainConfig field added since a run was written at its default."""
    return rundir.differences(old, new, RESUMABLE_CHANGES, added_defaults())


def added_defaults() -> dict:
    """Fields a run written before they existed lacks, at their defaults (TrainConfig's and the model's)."""
    model = {f"model.{f.name}": f.default for f in fields(ModelConfig) if f.default is not MISSING}
    return {f"config.{f.name}": f.default for f in fields(TrainConfig)} | model


def checkpoints_in(directory: str) -> list[str]:
    """The checkpoints of a run's checkpoints/ directory, oldest first: step_XXXXXXXX.pt (full state)
    or step_XXXXXXXX/ (sharded, under FSDP; see save_checkpoint)."""
    return sorted(glob.glob(os.path.join(directory, "step_*")))


def find_checkpoint(resume: str) -> str:
    """`resume` is a run directory (its newest checkpoint), a checkpoints/ directory, or a checkpoint."""
    if os.path.isfile(resume) or os.path.isfile(os.path.join(resume, SHARDED_META)):
        return resume
    for d in (os.path.join(resume, "checkpoints"), resume):
        found = checkpoints_in(d)
        if found:
            return found[-1]
    if not os.path.exists(resume):
        raise UserError(f"resume directory not found: {resume}")
    raise UserError(f"{resume} holds no training checkpoint (checkpoints/step_*)")


def _unreadable(path: str, e: Exception) -> UserError:
    return UserError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def load_checkpoint(path: str, identity: dict, model: nn.Module) -> dict:
    """The checkpoint's state, checked against this run and model. A full checkpoint's weights and
    optimizer state come with it; a sharded one's are read later, into the wrapped model (restore)."""
    sharded = os.path.isdir(path)
    try:
        state = torch.load(
            os.path.join(path, SHARDED_META) if sharded else path, map_location="cpu", weights_only=False
        )
    except Exception as e:  # truncated or not a torch file
        raise _unreadable(path, e) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a dha training checkpoint")
    if state["identity"].get("model") != identity.get("model"):
        raise UserError(f"checkpoint {path} is from another model (different architecture) than the one being trained")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if sharded:
        from torch.distributed.checkpoint import FileSystemReader

        try:
            meta = FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception as e:
            raise _unreadable(path, e) from None
        theirs = {
            k[len("model.") :]: tuple(m.size) for k, m in meta.items() if k.startswith("model.") and hasattr(m, "size")
        }
    else:
        theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if ours != theirs:
        raise UserError(f"checkpoint {path} is from another model: its weights do not match this model's")
    diffs = differences(state["identity"], identity)
    if diffs:
        raise UserError(f"checkpoint {path} belongs to a different run (differs in {', '.join(diffs)})")
    state["path"], state["sharded"] = path, sharded
    return state


def atomic_torch_save(obj, path: str) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state on CPU, of an unsharded module (one process or DDP)."""
    model_sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return model_sd, copy.deepcopy(optimizer.state_dict())


def restore(module: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    """Load a checkpoint's weights and optimizer state into the (wrapped) model and optimizer.

    A sharded checkpoint is read by torch.distributed.checkpoint, which reshards: each rank reads
    what its own shards need, at any process count, with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if state["sharded"]:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(module, optimizer)
        target = {"model": model_sd, "optimizer": optim_sd}
        try:
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(target, checkpoint_id=state["path"])
        except Exception as e:
            raise _unreadable(state["path"], e) from None
        set_state_dict(module, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    elif fsdp:
        set_state_dict(
            module,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        module.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])


def save_checkpoint(
    out_dir: str,
    module,
    optimizer,
    step: int,
    data_position: int,
    history,
    evals,
    identity,
    cfg: TrainConfig,
    d: Dist,
    hooks_state: dict | None = None,
) -> None:
    """Write checkpoints/step_XXXXXXXX.pt atomically (rank 0), or under FSDP the sharded
    checkpoints/step_XXXXXXXX/ (every rank writes its shards; then renamed); keep the newest few."""
    directory = os.path.join(out_dir, "checkpoints")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "step": step,
        "data_position": data_position,  # rows consumed, all ranks together
        "history": list(history),
        "evals": list(evals),
        "rng": rng_state(),
        "hooks": hooks_state,
    }
    if cfg.fsdp and d.world > 1:
        _save_sharded(os.path.join(directory, f"step_{step:08d}"), module, optimizer, meta, d)
    elif d.main:
        model_sd, optim_sd = _full_state(module, optimizer)
        atomic_torch_save(
            {**meta, "model": model_sd, "optimizer": optim_sd}, os.path.join(directory, f"step_{step:08d}.pt")
        )
    if d.main:
        for old in checkpoints_in(directory)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old) if os.path.isdir(old) else os.unlink(old)


def _save_sharded(path: str, module, optimizer, meta: dict, d: Dist) -> None:
    """torch.distributed.checkpoint into a temp directory (a collective), meta.pt, then the rename.
    Every rank writes its own shards of the weights and of the optimizer state, to a directory all
    ranks can reach (one filesystem for a multi-node run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    if d.main:
        torch.save(meta, os.path.join(tmp, SHARDED_META))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
