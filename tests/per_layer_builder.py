"""
A checkpoint whose two MoE layers keep different expert counts, built the way a
user gets one: calibrate once, then REAP from those statistics with a
non-uniform budget. Shared by the unit tests and the vLLM tier.
"""

from __future__ import annotations

from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoTokenizer

from ream_modifiers import ExpertStatisticsModifier, REAPModifier
from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.moe import find_moe_layers, load_moe_model

__all__ = ["QUIET_EXPERTS", "build_per_layer_checkpoint"]

# per family, the second MoE layer's experts whose outputs are scaled down 100x
# first, so that the allocation removes them and keeps every expert of the
# first MoE layer (DeepSeek-V3: two in each of its two router groups)
QUIET_EXPERTS = {
    "qwen3_moe": (0, 1, 2, 3),
    "gpt_oss": (0, 1, 2, 3),
    "deepseek_v3": (0, 1, 4, 5),
}


def build_per_layer_checkpoint(
    source: Path,
    out: Path,
    *,
    samples: int = 16,
    seq_len: int = 32,
    quantized: bool = False,
    dtype: torch.dtype = torch.float32,
    family: str = "qwen3_moe",
):
    """
    Save to ``out`` a REAP reduction of ``source`` (8 experts, two MoE layers)
    at 25% with the ``saliency_fraction`` budget: the MoE layers keep 8 and 4.
    Returns the reduced model as it stands in memory.
    """
    tokenizer = AutoTokenizer.from_pretrained(source)
    dataset = build_calibration_dataset("bundled", tokenizer, samples, seq_len)
    model = load_moe_model(source, dtype=dtype)
    second = find_moe_layers(model)[1]
    with torch.no_grad():
        for index in QUIET_EXPERTS[family]:
            down = second.expert(index).down_proj
            down.weight.mul_(0.01)
            if down.bias is not None:  # gpt-oss
                down.bias.mul_(0.01)
    stats = out.parent / f"{out.name}-stats"
    calibration = dict(
        processor=tokenizer, num_calibration_samples=samples, max_seq_length=seq_len
    )
    reset_session()
    recorder = ExpertStatisticsModifier(
        save_statistics=str(stats), methods={"reap": {}}
    )
    oneshot(model=model, dataset=dataset, recipe=[recorder], **calibration)
    reset_session()
    recipe = [
        REAPModifier(
            sparsity=0.25, from_statistics=str(stats), budget="saliency_fraction"
        )
    ]
    if quantized:
        recipe.append(
            QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
        )
    oneshot(
        model=model,
        dataset=dataset if quantized else None,
        recipe=recipe,
        **calibration,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reset_session()
    return model
