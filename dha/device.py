"""Where models run: the `--device` option of every verb, and what it implies.

`resolve_device` reads `--device`: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda`
or `cuda:N`. Under torchrun, `auto` and `cuda` mean this process's GPU, cuda:LOCAL_RANK, and an
explicit `cuda:N` is refused (every process would take that one GPU). A device this machine does
not have is a UserError, raised before any model is loaded.

`inference_dtype` is what `--dtype auto` means for inference and calibration: bfloat16 on a GPU,
the checkpoint's own dtype on the CPU. Training keeps float32 master weights wherever it runs
(its autocast dtype is chosen apart, dha.train).

`synchronize` waits for a device's queued work, so that wall-clock timings on CUDA measure the
work and not only its launch.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device that `spec` names on this machine; UserError when it is unknown or absent."""
    name = str(spec).strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UserError(f"unknown --device {spec!r}; choose from auto, cpu, cuda, cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {spec}: this machine has no usable GPU ({build}); use --device cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.index is not None and world > 1:
        raise UserError(
            f"--device {spec} under torchrun (WORLD_SIZE={world}) would put every process on that one GPU: "
            "give --device cuda or auto, and each process takes its own, cuda:LOCAL_RANK"
        )
    index = local_rank if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"--device {spec}: there is no GPU cuda:{index}; this machine has {count} "
            f"({', '.join(f'cuda:{i}' for i in range(count))})"
        )
    return torch.device("cuda", index)


def inference_dtype(requested: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The dtype to load a model in for inference or calibration: `requested` when given (not
    `--dtype auto`), else bfloat16 on a GPU and None (the checkpoint's own) on the CPU."""
    if requested is not None:
        return requested
    return torch.bfloat16 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
