"""Sharding a sweep's samples over processes with ``torch.distributed``.

A LocoGen sweep or a causal trace is a flat list of independent samples (window or restored
state, prompt, seed). With several devices, launch one process per device with ``torchrun``
(``torchrun --nproc-per-node 8 -m compiler.cli locate …``): each rank generates and scores
every ``world_size``-th sample, the per-sample scores (a few floats each) are gathered to every
rank, and only rank 0 writes files. Without ``torchrun`` the world has one rank and the very
same code runs over all samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> list[int]:
        """The sample indices this rank owns: every ``world_size``-th, starting at ``rank``.

        Interleaving (rather than contiguous blocks) spreads every window over all ranks, so
        ranks finish together even when sample costs differ between windows.
        """
        return list(range(self.rank, count, self.world_size))

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order, on every rank (picklable objects)."""
        if self.world_size == 1:
            return [payload]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, payload)
        return gathered

    def broadcast(self, payload: Any) -> Any:
        """Rank 0's ``payload`` on every rank."""
        if self.world_size == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_process_group() -> ProcessGroup:
    """This process's place in the ``torch.distributed`` world (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size())
    return ProcessGroup(0, 1)


def init_from_environment(requested: str | torch.device | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment, if any, and
    return the device this process should use.

    ``requested`` is ``--device`` (see :func:`compiler.device.resolve_device`). On GPUs: one
    process per GPU (``LOCAL_RANK`` picks it) with NCCL. More ranks than GPUs: with the device
    left to the default, every rank runs on the CPU with gloo (said once on stderr); with
    ``--device cuda`` asked, bad input (exit 2) saying how many GPUs there are.
    """
    import sys

    from compiler.device import resolve_device
    from compiler.errors import UserError

    device = resolve_device(requested)
    explicit = bool(requested) or bool(os.environ.get("EDITC_DEVICE"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and world_size > 1:
        gpus = torch.cuda.device_count()
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if ranks_here > gpus:  # every rank of this host decides alike
            if explicit:
                raise UserError(f"--device {device}: torchrun started {ranks_here} processes on this host but "
                                f"torch sees {gpus} GPU(s); use --nproc-per-node {gpus}, or --device cpu (gloo)")
            if local_rank == 0:
                print(f"[editc] {ranks_here} processes but {gpus} GPU(s) here: every process runs on the CPU "
                      "(gloo)", file=sys.stderr, flush=True)
            device = torch.device("cpu")
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else 0)
    return device
