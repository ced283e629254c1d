"""Every collective op raykd runs between the ranks of a Ray Train worker group, in one place.

NCCL (Ray Train's backend when ``train.use_gpu``) takes only CUDA tensors; gloo (CPU workers)
takes host tensors. Both follow from one source, the device Ray Train gave this worker
(``ray.train.torch.get_device()``: its GPU, or the CPU), so no caller chooses a device and none
can hand a CPU tensor to NCCL. No other module of raykd imports ``torch.distributed`` (a test
checks); DDP's own gradient all-reduce is Ray Train's and torch's business.
"""

from __future__ import annotations

from typing import Any

import torch


def worker_resources(train) -> dict[str, float]:
    """One Ray Train worker's resources (``train``: the config's ``train`` section)."""
    gpus = {"GPU": train.gpus_per_worker} if train.use_gpu else {}
    return {"CPU": train.cpus_per_worker, **gpus}


def process_group_backend(train) -> str | None:
    """NCCL (Ray Train's choice with GPUs, None here) takes one rank per GPU: workers sharing a
    GPU (``train.gpus_per_worker`` < 1) all-reduce through gloo, which takes CUDA tensors too."""
    return "gloo" if train.use_gpu and train.gpus_per_worker < 1 else None


def backend_device() -> torch.device:
    """The device the worker group's collectives run on. Only called with world > 1, which
    happens only inside a Ray Train worker."""
    import ray.train.torch

    return ray.train.torch.get_device()


def all_reduce_sum(values: list[float], world: int) -> list[float]:
    """Sum a few numbers across the ranks (float64: exact for counts up to 2**53)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=backend_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (pickled by torch; small objects only)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=backend_device())
    return box[0]
