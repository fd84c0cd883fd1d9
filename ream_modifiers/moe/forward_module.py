"""
A forward for models whose top-level class has none.

Qwen3-Omni's ``Qwen3OmniMoeForConditionalGeneration`` holds the thinker (the
language model with its audio and vision towers) beside the talker and the
code-to-waveform decoder, and only defines ``generate``; llm-compressor's
calibration and every perplexity here call the model. The model's class is
swapped for a subclass (same name, same modules and parameter names, so hooks,
saving and the saved ``architectures`` are unchanged) whose ``forward`` calls
the row's :attr:`~ream_modifiers.moe.architectures.MoEArchSpec.forward_module`.
(llm-compressor's own advice, ``oneshot(model.thinker, ...)``, would save the
thinker alone, which vLLM has no architecture for.)
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from ream_modifiers.moe.architectures import get_arch_spec

__all__ = ["adapt_forward_module"]

_ADAPTED: dict[tuple[type, str], type] = {}


def adapt_forward_module(model: PreTrainedModel) -> None:
    """
    Give ``model`` its row's ``forward_module``'s forward, once; a no-op for
    rows without one.

    :raises TypeError: if the model has no such submodule
    """
    attr = get_arch_spec(model.config).forward_module
    if attr is None or getattr(type(model), "_forward_module", None) == attr:
        return
    inner = getattr(model, attr, None)
    if not isinstance(inner, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no `{attr}` module, which its "
            "architecture row names as the model's forward; load the whole model "
            "with ream_modifiers.load_moe_model"
        )
    key = (type(model), attr)
    if key not in _ADAPTED:
        _ADAPTED[key] = _subclass(type(model), attr)
    model.__class__ = _ADAPTED[key]


def forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    **kwargs,
):
    # named `forward`, with named inputs and plain source: llm-compressor's
    # tracer recompiles this function's source, looks its result up by that
    # name, and fixes every parameter the calibration batch lacks
    return getattr(self, self._forward_module)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        labels=labels,
        use_cache=use_cache,
        **kwargs,
    )


def _get_input_embeddings(self) -> nn.Module:
    return getattr(self, self._forward_module).get_input_embeddings()


def _get_output_embeddings(self) -> nn.Module | None:
    return getattr(self, self._forward_module).get_output_embeddings()


def _subclass(cls: type, attr: str) -> type:
    return type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            # REAM's statistics hook the token embeddings; llm-compressor
            # checks the head
            "get_input_embeddings": _get_input_embeddings,
            "get_output_embeddings": _get_output_embeddings,
            "_forward_module": attr,
            "__module__": cls.__module__,
        },
    )
