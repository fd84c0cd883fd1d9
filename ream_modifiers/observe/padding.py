"""Which calibration tokens are padding, batch by batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.utils.data import RandomSampler

__all__ = ["padding_masks_from_dataloader"]


def padding_masks_from_dataloader(
    dataloader: Iterable | None,
) -> list[torch.Tensor | None]:
    """
    One flattened ``[batch*seq]`` bool mask of real tokens per calibration batch,
    or None for a batch without padding (the common case: llm-compressor's default
    collator truncates instead of padding). Only batches with padding cost memory.
    """
    masks: list[torch.Tensor | None] = []
    if dataloader is None:
        return masks
    for batch in dataloader:
        # BatchEncoding is a Mapping, not a dict
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None or bool(torch.as_tensor(mask).all()):
            masks.append(None)
        else:
            masks.append(torch.as_tensor(mask).reshape(-1).bool())
    if any(m is not None for m in masks) and isinstance(
        getattr(dataloader, "sampler", None), RandomSampler
    ):
        # a second pass over a shuffled loader sees another order: the masks
        # would not line up with the batches the pipeline feeds
        raise ValueError(
            "Calibration batches are padded and shuffled, so padding tokens cannot "
            "be told apart from real ones. Pass shuffle_calibration_samples=False, "
            "batch_size=1, or the default truncating data_collator."
        )
    return masks
