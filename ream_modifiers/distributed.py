"""
``torch.distributed`` plumbing for data-parallel calibration under ``torchrun``.

llm-compressor splits the calibration set across ranks; every rank runs the same
pipeline on its shard. Our modifiers reduce their statistics onto the source rank,
decide there, and broadcast the decision (:mod:`ream_modifiers.modifiers.base`).
What is here: starting the process group from ``torchrun``'s environment on any
device (compressed-tensors' ``init_dist`` needs an accelerator), moving decisions
to host memory before they travel, and one-liners the CLI needs around saving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, TypeVar

import torch
from compressed_tensors.distributed import (
    get_source_rank,
    is_distributed,
    is_source_process,
)
from loguru import logger
from torch import distributed as dist

__all__ = [
    "init_distributed",
    "is_distributed",
    "is_source_process",
    "host_copy",
    "broadcast_from_source",
    "barrier",
    "shard_for_rank",
    "check_sharded",
]

T = TypeVar("T")
D = TypeVar("D")


def init_distributed() -> bool:
    """
    Join the process group ``torchrun`` describes in the environment (NCCL with
    one GPU per local rank, gloo on CPU). A no-op outside ``torchrun`` or when a
    group already exists.

    :return: whether the run is distributed
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend=backend)
    logger.info(
        f"Distributed calibration: rank {dist.get_rank()} of "
        f"{dist.get_world_size()} ({backend})"
    )
    return True


def host_copy(value: T) -> T:
    """
    ``value`` with every tensor inside (dicts, lists, tuples, dataclasses) moved
    to the CPU: a pickled CUDA tensor would unpickle onto the *sender's* device.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [host_copy(item) for item in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            field.name: host_copy(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


def broadcast_from_source(value: Any, group: dist.ProcessGroup | None = None) -> Any:
    """``value`` of the source rank on every rank (itself outside distributed)."""
    if not is_distributed():
        return value
    box = [host_copy(value) if is_source_process() else None]
    dist.broadcast_object_list(box, src=get_source_rank(), group=group)
    return box[0]


def shard_for_rank(dataset: D) -> D:
    """
    This rank's contiguous share of ``dataset`` (all of it outside distributed);
    the shares of all ranks together are the whole dataset, each row once.

    Pass the shard to ``oneshot``: given the same dataset on every rank,
    llm-compressor 0.14 partitions the sampler but indexes the unpartitioned
    dataset, so every rank calibrates on the first ``1/world_size`` of the rows
    and the rest are never seen (:func:`check_sharded` refuses that case).
    """
    if not is_distributed():
        return dataset
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(dataset) < world:
        raise ValueError(
            f"{len(dataset)} calibration rows cannot be shared by {world} ranks; "
            "use at least one row per rank"
        )
    start, end = (len(dataset) * r // world for r in (rank, rank + 1))
    return dataset.select(range(start, end))


def _fingerprint(dataset: Any) -> str:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None and len(dataset):
        fingerprint = hashlib.sha256(repr(dataset[0]).encode()).hexdigest()
    return f"{len(dataset)}:{fingerprint}"


def check_sharded(dataset: Any, group: dist.ProcessGroup | None = None) -> None:
    """
    Refuse, before calibration, a distributed run where every rank holds the same
    calibration dataset (see :func:`shard_for_rank`). Every rank must call it.

    :raises ValueError: if all ranks hold the same dataset
    """
    if not is_distributed() or dataset is None:
        return
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, _fingerprint(dataset), group=group)
    if len(set(prints)) == 1:
        raise ValueError(
            f"every one of the {len(prints)} ranks holds the same "
            f"{len(dataset)}-row calibration dataset. llm-compressor 0.14 would "
            "then calibrate every rank on the first "
            f"{len(dataset) // len(prints)} rows only. Give each rank its share: "
            "oneshot(dataset=ream_modifiers.distributed.shard_for_rank(dataset)), "
            "as ream-compress does."
        )


def barrier() -> None:
    if is_distributed():
        dist.barrier()
