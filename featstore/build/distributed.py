"""Several GPUs of one host under torchrun: each rank builds every `world`-th unit of the plan
into the same store, rank 0 creates the store and finishes its manifest with every rank's
report. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op and torch.distributed
is never imported.

Example:
    >>> from featstore.build.distributed import setup, barrier
    >>> setup()            # (rank, world) without torchrun
    (0, 1)
    >>> barrier(1)         # one rank: nothing to wait for
"""

from __future__ import annotations

import os

from featstore.build.report import BuildReport

__all__ = ["setup", "barrier", "gather_reports", "shutdown", "local_device", "rank_of_process"]


def setup() -> tuple[int, int]:
    """(rank, world size) of this process, joining the process group under torchrun (NCCL where
    CUDA is, gloo otherwise); (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every rank (a no-op for one)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_reports(report: BuildReport, world: int) -> BuildReport:
    """Every rank's report combined (`BuildReport.combine`), on every rank; `report` itself for one."""
    if world <= 1:
        return report
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, report.to_dict())
    return BuildReport.combine(report, parts)


def shutdown() -> None:
    """Leave the process group, if this process joined one (the CLI calls it when a build ends)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_of_process() -> int:
    """This process's rank from torchrun's environment (0 without torchrun): who prints."""
    return int(os.environ.get("RANK", "0"))


def local_device(device: str) -> str:
    """`device`, with "auto" resolved: the local rank's GPU (cuda:LOCAL_RANK) where CUDA is, else "cpu"."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"
