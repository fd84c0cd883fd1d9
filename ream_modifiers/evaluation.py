"""Held-out perplexity, the quick quality check the demo and benchmarks print."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ream_modifiers.data.calibration import pack_rows

__all__ = ["perplexity", "read_jsonl_texts"]


def read_jsonl_texts(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` of every record of a JSONL file."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line)[field] for line in lines if line.strip()]


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    seq_len: int = 128,
    num_rows: int = 64,
    batch_size: int = 8,
) -> float:
    """
    exp(mean next-token negative log-likelihood) over ``num_rows`` packed rows of
    ``seq_len`` tokens (the same rows for every model given the same texts).
    """
    rows = torch.tensor(pack_rows(texts, tokenizer, num_rows, seq_len))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(total / count)
