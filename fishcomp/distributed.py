"""Several processes through torchrun (torch.distributed), not a home-made launcher.

Under `torchrun --nproc_per_node N -m fishcomp <stage> ...` (or `fishcomp <stage> --nproc N`, which
starts exactly that), every rank runs the same command. Ranks split the work and rank 0 alone
writes and publishes artifacts, after a barrier, so an artifact made by N processes is the one a
single process makes, under the same cache key. Backend: NCCL when each rank has a GPU, gloo
otherwise. A rank that fails exits non-zero; torchrun then stops the others (SIGTERM, which
fishcomp turns into a clean interrupt), so nothing half-built is ever marked complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun sets (a plain run is rank 0 of 1)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def setup() -> World:
    """Join the process group once (no-op for a single process); share the cores between ranks."""
    here = world()
    if not here.distributed:
        return here
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= here.local_size
        if use_nccl:
            torch.cuda.set_device(here.local_rank)
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    if "OMP_NUM_THREADS" not in os.environ:
        # N ranks on one machine would each take every core; give each its share instead.
        torch.set_num_threads(share_of_cores(here.local_size))
    return here


def share_of_cores(processes: int) -> int:
    """Threads for each of `processes` processes sharing this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // processes)


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_to_main(value):
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    here = world()
    if not here.distributed:
        return [value]
    import torch.distributed as dist

    gathered = [None] * here.size if here.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (so all ranks take the same decision)."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    here = world()
    if not here.distributed:
        return [value]
    import torch.distributed as dist

    gathered = [None] * here.size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_across(*numbers: float) -> tuple[float, ...]:
    """The sums of `numbers` over all ranks (the numbers themselves in a single process)."""
    if not world().distributed:
        return numbers
    import torch
    import torch.distributed as dist

    # NCCL reduces only tensors on the rank's GPU; gloo those in host memory.
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return tuple(totals.tolist())


def my_rows(count: int) -> np.ndarray:
    """This rank's share of `count` rows: every size-th row from its rank (all rows in one process),
    the split DistributedSampler makes, without its padding."""
    here = world()
    return np.arange(here.rank, count, here.size)


def gather_rows(local: dict, count: int) -> dict:
    """Arrays of `count` rows, reassembled on every rank from each rank's `my_rows(count)` part."""
    if not world().distributed:
        return local
    parts = all_gather(local)
    whole = {}
    for rank, part in enumerate(parts):
        rows = np.arange(rank, count, len(parts))
        for name, values in part.items():
            if name not in whole:
                whole[name] = np.empty((count,) + values.shape[1:], dtype=values.dtype)
            whole[name][rows] = values
    return whole


def data_parallel(setting: str, folds: int) -> bool:
    """Whether every fold trains on all ranks (DistributedDataParallel, each rank a share of every
    batch) rather than whole folds being dealt to the ranks. `auto` deals folds when there are at
    least as many as ranks: no gradient traffic at all, and bit-for-bit the single-process result;
    a hold-out split (one fold) or fewer folds than ranks take the data-parallel way."""
    here = world()
    if not here.distributed:
        return False
    return setting == "data" or (setting == "auto" and folds < here.size)


def wrap_data_parallel(model, device):
    """`model` in DistributedDataParallel, which averages gradients over the ranks at each step.

    On GPUs, BatchNorm layers become SyncBatchNorm (in place, keeping their parameters), so they
    normalise over the global batch as one process would. PyTorch has no CPU SyncBatchNorm: on
    gloo each rank normalises its own share, which trains slightly differently (noisier
    statistics from a smaller batch), not worse.
    """
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def sync_buffers(model) -> None:
    """Rank 0's BatchNorm running statistics on every rank (each rank updated its own from its own
    share of the last batch), so that every rank validates, and keeps, the same model."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def device_for(name: str) -> str:
    """`auto` on a multi-GPU run means this rank's own GPU."""
    here = world()
    if name == "auto" and here.distributed:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{here.local_rank}"
    return name


def ensure_together(cache, stage: str, label: str, key: str, build):
    """`cache.ensure` for a build that every rank takes part in.

    All ranks call `build`: rank 0 inside the cache's lock and temp folder, the others with the
    same temp folder path (to write their share into files rank 0 created, or to send their part
    to rank 0). Rank 0 alone publishes; the others wait at a barrier and then use the artifact.
    """
    from fishcomp.cache import Artifact

    here = world()
    if not here.distributed:
        return cache.ensure(stage, label, key, build)
    cached = broadcast_from_main(cache.find(stage, key) is not None)
    artifact = None
    if here.is_main:
        artifact = cache.ensure(stage, label, key, build)
    elif not cached:
        build(cache.temp_folder(stage, label, key))
    barrier()
    return artifact or Artifact(stage, key, cache.find(stage, key), built=not cached)
