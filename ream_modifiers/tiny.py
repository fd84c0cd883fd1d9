"""
Tiny random MoE models built locally from transformers configs, with a byte-level
BPE tokenizer trained on the bundled corpus. They serve the demo and the tests;
nothing is downloaded.

Sizes keep every quantizable ``Linear`` input a multiple of 128, W4A16's group
size, so GPTQ runs on them unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, PreTrainedTokenizerFast

from ream_modifiers.data.calibration import bundled_texts
from ream_modifiers.moe.architectures import ARCHITECTURES
from ream_modifiers.moe.auto import auto_model_class
from ream_modifiers.moe.conversions import hub_save_conversions
from ream_modifiers.moe.saved_config import write_row_config_keys
from ream_modifiers.moe.saved_names import rename_saved_tensors

__all__ = ["TINY_CONFIGS", "TINY_PROCESSORS", "build_tokenizer", "build_tiny_moe"]

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
        configs[model_type] = _without_dropped_keys(entry)
    return configs


def _without_dropped_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry without its ``drop`` keys, also inside a nested ``text_config``
    (which can start from another family's entry)."""
    entry = {
        key: _without_dropped_keys(value) if isinstance(value, dict) else value
        for key, value in entry.items()
    }
    for key in entry.pop("drop", ()):
        entry.pop(key)
    return entry


# Per model_type: config kwargs of a 2-MoE-layer model with 8 experts, top-2.
TINY_CONFIGS: dict[str, dict[str, Any]] = _load_configs()
# Per multimodal model_type: its preprocessor_config.json (not config kwargs)
TINY_PROCESSORS: dict[str, dict[str, Any]] = {
    model_type: entry.pop("processor")
    for model_type, entry in TINY_CONFIGS.items()
    if "processor" in entry
}
# Families whose hub checkpoints store the fused experts transposed, (experts,
# in, out), which transformers' save does not restore (its Transpose only
# swaps a shape that differs from the model's): the tiny model is written so
_TRANSPOSED_ON_HUB: set[str] = {
    model_type
    for model_type, entry in TINY_CONFIGS.items()
    if entry.pop("hub_transposed_experts", False)
}


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
    mtp_layers: int = 0,
    **overrides: Any,
) -> Path:
    """
    Build a tiny random MoE of ``model_type``, save it with its tokenizer, and
    return the directory. Score-correction biases get random values so that
    routing tests exercise them.

    :param model_type: a key of :data:`TINY_CONFIGS`
    :param save_dir: where to save the model and tokenizer
    :param seed: weights seed
    :param mtp_layers: MTP layers to store after the trunk, in the hub layout
        (families with ``mtp_layers_key`` in the architecture table)
    :param overrides: config kwargs overriding the tiny defaults
    """
    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}"
        )
    kwargs = {**TINY_CONFIGS[model_type], **overrides}
    spec = ARCHITECTURES.get(model_type)
    if mtp_layers:
        if spec is None or not (spec.mtp_layers_key or spec.mtp_module):
            raise ValueError(f"{model_type} has no MTP layers in the table")
        # an MTP module's count is a hub key transformers has no field for
        kwargs[spec.mtp_layers_key or "mtp_num_hidden_layers"] = mtp_layers
    config = AutoConfig.for_model(model_type, **kwargs)
    model = _random_model(config, seed, dtype)
    if spec is not None and spec.keep_load_converters:
        # transformers' own reverse of these families' renames is not the hub's
        model._weight_conversions = hub_save_conversions(
            model_type, spec, linearized=False
        )
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    if spec is not None:
        write_row_config_keys(save_dir, spec)
        rename_saved_tensors(save_dir, spec)  # the hub's names (ERNIE-4.5-VL)
    if mtp_layers:
        _append_mtp_layers(model_type, kwargs, save_dir, seed, dtype)
    if model_type in _TRANSPOSED_ON_HUB:
        _transpose_fused_experts(save_dir / "model.safetensors")
    build_tokenizer(config.get_text_config().vocab_size).save_pretrained(save_dir)
    if model_type in TINY_PROCESSORS:
        # a multimodal model's image preprocessing, which vLLM needs to build it
        (save_dir / "preprocessor_config.json").write_text(
            json.dumps(TINY_PROCESSORS[model_type], indent=2) + "\n"
        )
    return save_dir


def _transpose_fused_experts(weights: Path) -> None:
    """Rewrite the fused expert tensors of ``weights`` in the hub's layout."""
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = tensor.transpose(1, 2).contiguous()
    save_file(state, weights, metadata={"format": "pt"})


def _random_model(config, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, dtype=dtype)
    with torch.no_grad():
        # selection biases (buffers, or ERNIE's frozen parameter) and the expert
        # and router biases start at zero; random values make pruning and merging
        # tests notice a bias that does not follow its expert
        tensors = dict(model.named_buffers())
        tensors.update(model.named_parameters())
        for name, tensor in tensors.items():
            if name.endswith(_RANDOMIZED_SUFFIXES):
                tensor.copy_(torch.randn_like(tensor) * 0.05)
    return model


def _append_mtp_layers(
    model_type: str, kwargs: dict[str, Any], save_dir: Path, seed: int, dtype
) -> None:
    """
    Add MTP layers to the saved checkpoint as the hub stores them, taken from
    a deeper random model so that they carry the family's hub names: decoder
    layers ``num_hidden_layers + i`` with ``enorm``, ``hnorm``, ``eh_proj``,
    ``shared_head`` and their own ``embed_tokens`` (DeepSeek-V3), or an MTP
    module's ``mtp.layers.{i}`` (full attention) with ``mtp.fc`` and its norms
    (Qwen3-Next).
    """
    import tempfile

    from safetensors.torch import load_file, save_file

    spec = ARCHITECTURES[model_type]
    count = kwargs[spec.mtp_layers_key or "mtp_num_hidden_layers"]
    trunk = kwargs["num_hidden_layers"]
    deeper_kwargs = {**kwargs, "num_hidden_layers": trunk + count}
    if "layer_types" in kwargs:
        deeper_kwargs["layer_types"] = [*kwargs["layer_types"]] + [
            "full_attention"
        ] * count
    deeper = AutoConfig.for_model(model_type, **deeper_kwargs)
    with tempfile.TemporaryDirectory() as scratch:
        _random_model(deeper, seed + 1, dtype).save_pretrained(scratch)
        extra = load_file(Path(scratch) / "model.safetensors")
    weights = save_dir / "model.safetensors"
    state = load_file(weights)
    hidden, vocab = deeper.hidden_size, deeper.vocab_size
    generator = torch.Generator().manual_seed(seed + 2)

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.05).to(dtype)

    module = spec.mtp_module
    for i in range(count):
        source = f"model.layers.{trunk + i}."
        prefix = f"{module}.layers.{i}." if module else source
        state.update(
            {
                prefix + k[len(source) :]: v
                for k, v in extra.items()
                if k.startswith(source)
            }
        )
        if module:
            continue
        state[prefix + "eh_proj.weight"] = random((hidden, 2 * hidden))
        state[prefix + "shared_head.head.weight"] = random((vocab, hidden))
        state[prefix + "embed_tokens.weight"] = random((vocab, hidden))
        for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            state[prefix + name] = torch.ones(hidden, dtype=dtype)
    if module:
        state[f"{module}.fc.weight"] = random((hidden, 2 * hidden))
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            state[f"{module}.{name}.weight"] = torch.ones(hidden, dtype=dtype)
    save_file(state, weights, metadata={"format": "pt"})
