"""
Models whose weights live off the execution device, in compressed-tensors'
offloading: an offloaded module's ``_parameters`` is an ``OffloadCache`` that keeps
each tensor in CPU memory or in a safetensors file on disk and hands out an
onloaded copy on every access (the same copy while ``disable_offloading`` is
active, as in llm-compressor's sequential pipeline).

An in-place write to such a copy never reaches the stored tensor, so every weight
this package changes goes through :func:`write_parameter`; assigning a new
``Parameter`` (a different shape) already goes through the cache and is stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from compressed_tensors.distributed import is_distributed, is_source_process
from compressed_tensors.offload import disable_onloading, update_offload_parameter
from compressed_tensors.offload.cache import DiskCache, OffloadCache
from torch import nn

__all__ = [
    "OFFLOAD_MODES",
    "Offload",
    "OffloadOptionError",
    "check_offload_options",
    "offload_load_kwargs",
    "is_offloaded",
    "disk_offloaded",
    "write_parameter",
    "parameter_totals",
]

Offload = Literal["none", "cpu", "disk", "auto"]
OFFLOAD_MODES: tuple[str, ...] = ("none", "cpu", "disk", "auto")


class OffloadOptionError(ValueError):
    """An offload option that cannot work (raised before the model is loaded)."""


def check_offload_options(
    offload: str,
    offload_folder: str | os.PathLike | None,
    device_map: Any = None,
) -> None:
    """
    Fail fast, before anything is loaded, on offload options that cannot work.

    :param offload: one of :data:`OFFLOAD_MODES`
    :param offload_folder: folder for ``disk`` and ``auto``; must be empty or new
        (compressed-tensors names its files by tensor id, and files of an earlier
        run would collide with this run's)
    :param device_map: a ``device_map`` also given to ``from_pretrained``
    :raises OffloadOptionError: on an unknown mode, a missing, misplaced or
        non-empty folder, or a ``device_map`` given together with an offload mode
    """
    if offload not in OFFLOAD_MODES:
        raise OffloadOptionError(
            f"offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}"
        )
    if offload in ("none", "cpu"):
        if offload_folder is not None:
            raise OffloadOptionError(
                f"an offload folder is only used with offload 'disk' or 'auto', not "
                f"{offload!r}"
            )
        if offload == "none":
            return
    elif offload_folder is None:
        raise OffloadOptionError(
            f"offload {offload!r} needs an offload folder (--offload-folder DIR): "
            "weights are read from it and changed weights are written to it"
        )
    else:
        folder = Path(offload_folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise OffloadOptionError(
                f"offload folder {folder} must be an empty or new directory: files "
                "of an earlier offloaded run would collide with this run's"
            )
    if device_map is not None:
        raise OffloadOptionError(
            f"give either offload {offload!r} or a device_map, not both"
        )


def offload_load_kwargs(
    offload: str, offload_folder: str | os.PathLike | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """
    The ``from_pretrained`` arguments of an offload mode, for loading inside
    compressed-tensors' ``load_offloaded_model()`` (creates the folder):

    - ``none``: none (the model loads into CPU memory as usual);
    - ``cpu``: every weight in CPU memory, onloaded layer by layer to the
      execution device (``device_map="cpu"``);
    - ``disk``: every weight on disk (``device_map={"": "disk"}``): tensors are
      read from the checkpoint's safetensors files where they are, and only
      changed tensors are written to ``offload_folder``;
    - ``auto``: CPU memory up to what is available less a reserve, the rest on
      disk (``device_map="auto_offload"``; a ``max_memory`` in ``kwargs`` sets
      the budget).

    :param kwargs: the other ``from_pretrained`` arguments, checked for conflicts
    :raises OffloadOptionError: see :func:`check_offload_options`
    """
    check_offload_options(offload, offload_folder, kwargs.get("device_map"))
    if offload == "none":
        return {}
    if offload == "cpu":
        return {"device_map": "cpu"}
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    device_map = {"": "disk"} if offload == "disk" else "auto_offload"
    return {"device_map": device_map, "offload_folder": str(offload_folder)}


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module``'s own tensors live in a compressed-tensors offload cache."""
    return isinstance(module._parameters, OffloadCache)


def disk_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` keeps its tensors on disk."""
    return any(isinstance(m._parameters, DiskCache) for m in model.modules())


@torch.no_grad()
def write_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """
    Overwrite ``module.<name>`` with ``value`` (same shape; cast to the stored
    dtype) where it is stored: in place for an ordinary module, in the offload
    cache (CPU copy or disk file, and the onloaded copy if one is held) for an
    offloaded one. The parameter object is kept.

    Under ``torchrun`` every rank computes the same ``value``. Storage that the
    ranks share (compressed-tensors' distributed CPU and disk caches) is written
    by the source rank alone, as compressed-tensors requires; the other ranks
    only refresh the onloaded copy they hold. The caller synchronises the ranks
    before anyone reads the storage again (the modifiers do after each layer).

    :raises ValueError: if the shapes differ
    """
    with disable_onloading():  # the stored tensor's shape and dtype, no disk read
        stored = getattr(module, name)
    if tuple(stored.shape) != tuple(value.shape):
        raise ValueError(
            f"{type(module).__name__}.{name} has shape {tuple(stored.shape)}, "
            f"cannot write {tuple(value.shape)}"
        )
    # contiguous: the disk cache saves the tensor as is, and safetensors refuses a
    # non-contiguous one (e.g. DERN's recombined rows)
    value = value.detach().to(dtype=stored.dtype).contiguous()
    cache = module._parameters if name in module._parameters else module._buffers
    if _shared_between_ranks(cache) and not is_source_process():
        onloaded = cache.keep_onloaded_values.get(cache.offloaded_values.get(name))
        if onloaded is not None and onloaded is not stored:
            with torch.no_grad():
                onloaded.copy_(value.to(onloaded.device))
        return
    update_offload_parameter(module, name, value)


def _shared_between_ranks(cache: Any) -> bool:
    """Whether ``cache`` keeps one copy for all ranks (not one per rank)."""
    from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return is_distributed() and isinstance(
        cache, (DistributedCPUCache, DistributedDiskCache)
    )


def parameter_totals(model: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)`` of ``model`` without onloading offloaded tensors."""
    count = size = 0
    with disable_onloading():
        for parameter in model.parameters():
            count += parameter.numel()
            size += parameter.numel() * parameter.element_size()
    return count, size
