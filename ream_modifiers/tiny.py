"""
Tiny random MoE models built locally from transformers configs, with a byte-level
BPE tokenizer trained on the bundled corpus. They serve the demo and the tests;
nothing is downloaded.

Sizes keep every quantizable ``Linear`` input a multiple of 128, W4A16's group
size, so GPTQ runs on them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ream_modifiers.data.calibration import bundled_texts

__all__ = ["TINY_CONFIGS", "build_tokenizer", "build_tiny_moe"]

_RANDOMIZED_SUFFIXES = (
    "e_score_correction_bias",
    "expert_bias",
    "experts.gate_up_proj_bias",
    "experts.down_proj_bias",
    "router.bias",
)


def _load_configs() -> dict[str, dict[str, Any]]:
    """``tiny_configs.yaml``: entries starting with ``_`` are shared parts."""
    text = resources.files(__package__).joinpath("tiny_configs.yaml").read_text()
    configs = {}
    for model_type, entry in yaml.safe_load(text).items():
        if model_type.startswith("_"):
            continue
        entry = dict(entry)
        for key in entry.pop("drop", ()):
            entry.pop(key)
        configs[model_type] = entry
    return configs


# Per model_type: config kwargs of a 2-MoE-layer model with 8 experts, top-2.
TINY_CONFIGS: dict[str, dict[str, Any]] = _load_configs()


def build_tokenizer(
    vocab_size: int = 512, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer trained (deterministically) on ``texts``, by default
    the bundled corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = bundled_texts("mix") if texts is None else texts
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_tiny_moe(
    model_type: str,
    save_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """
    Build a tiny random MoE of ``model_type``, save it with its tokenizer, and
    return the directory. Score-correction biases get random values so that
    routing tests exercise them.

    :param model_type: a key of :data:`TINY_CONFIGS`
    :param save_dir: where to save the model and tokenizer
    :param seed: weights seed
    :param overrides: config kwargs overriding the tiny defaults
    """
    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}"
        )
    config = AutoConfig.for_model(
        model_type, **{**TINY_CONFIGS[model_type], **overrides}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        # selection biases (buffers, or ERNIE's frozen parameter) and the expert
        # and router biases start at zero; random values make pruning and merging
        # tests notice a bias that does not follow its expert
        tensors = dict(model.named_buffers())
        tensors.update(model.named_parameters())
        for name, tensor in tensors.items():
            if name.endswith(_RANDOMIZED_SUFFIXES):
                tensor.copy_(torch.randn_like(tensor) * 0.05)
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    build_tokenizer(config.vocab_size).save_pretrained(save_dir)
    return save_dir
