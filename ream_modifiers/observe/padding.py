"""Which calibration tokens are padding, batch by batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch

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
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is None or bool(torch.as_tensor(mask).all()):
            masks.append(None)
        else:
            masks.append(torch.as_tensor(mask).reshape(-1).bool())
    return masks
