"""Processes of one training run: joining torchrun's group, wrapping the model, gathering it back.

`dha train` (and `dha convert ... --tokens N`) runs under torchrun; the process group is gloo on
CPU and NCCL on GPU (one GPU per process, cuda:LOCAL_RANK). `--fsdp` shards parameters, gradients
and optimizer state with FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per transformer
block); otherwise DDP. Only rank 0 writes files, but for the shards of a checkpoint under FSDP
(dha.resume). One machine:

    torchrun --nproc_per_node 2 -m dha train SOURCE --data D --tokens N --out DIR [--fsdp]

Several machines (every node runs this, with its own --node_rank; all see DIR on shared storage,
which `--resume` also reads):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST0:29500 -m dha train SOURCE --data D --tokens N --out DIR
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .transforms import build


@dataclass
class Dist:
    """This process in the run: its rank of `world` and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dev)
    return Dist(0, 1, dev)


def all_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum `t` over the ranks, in place (one process: `t`)."""
    if d.world > 1:
        dist.all_reduce(t)
    return t


def wrap_distributed(module: nn.Module, fsdp: bool, d: Dist) -> nn.Module:
    """Under torchrun: FSDP2 shards the module in place (one unit per transformer block; the module
    itself is returned), or DDP wraps it. One process: the module."""
    if d.world > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(module, "layers", []):
            fully_shard(block)
        fully_shard(module)
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return module


def unwrap_full_model(module: nn.Module, fsdp: bool, d: Dist) -> nn.Module | None:
    """The trained model as a plain module. Under FSDP the weights are gathered once, to CPU on
    rank 0, which alone gets a model (the other ranks get None): no rank but rank 0 holds them all."""
    if not fsdp:
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return build(module.config, sd) if d.main else None
