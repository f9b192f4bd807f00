"""Where the work runs: device, compute dtype, and the data-parallel group.

One code path serves 1 and N processes: :class:`Runtime` reads the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) when it is there, and with a world of one every
collective is the identity and ``wrap`` returns the module unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are about 3x slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> "Runtime":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device, local_rank)
        if world > 1 and not dist.is_initialized():
            if resolved.type == "cuda":
                torch.cuda.set_device(resolved)
            dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=resolved)

    def wrap(self, module: torch.nn.Module, *, fsdp: bool = False) -> torch.nn.Module:
        """The module as trained on this world: itself, DDP, or FSDP2-sharded."""
        if self.world_size == 1:
            return module
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
