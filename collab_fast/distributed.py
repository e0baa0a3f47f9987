"""Process groups: one process alone, or one per GPU under torchrun (NCCL; gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "cleanup", "init_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: str = "auto", capture: bool = False) -> tuple[Dist, torch.device]:
    """Reads torchrun's variables; returns this process's place and device ("auto": CUDA when present,
    "cuda", or "cpu" even where a GPU exists). capture: the step will be captured in a CUDA graph
    (--cuda-graphs), which needs NCCL's asynchronous error handling off (PyTorch's CUDA graphs notes, DDP)."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch "
                         f"({torch.__version__}, CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    cuda = device != "cpu" and torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
            if capture:
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        d = Dist(rank, world, local)
    else:
        d = Dist()
    return d, torch.device("cuda", d.local_rank) if cuda else torch.device("cpu")


def cleanup(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        # Every rank reaches the teardown before any destroys: without this barrier, gloo on CPU
        # (torch 2.13) intermittently aborts a worker at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
