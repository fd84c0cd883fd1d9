"""
Causal attention in llm-compressor's sequential calibration pipeline.

Upstream behaviour (llm-compressor 0.14.0.1, transformers 5.17): the sequential
pipeline traces the model with ``SequentialTracer``
(``llmcompressor/pipelines/sequential/helpers.py``). Qwen3-MoE and Mixtral call
their mask builder through a local name (``mask_function = create_causal_mask if
... else create_sliding_window_causal_mask``), which the AST autowrapper cannot
evaluate (``AutoWrapper.visit_Call``), so the tracer records
``create_causal_mask`` or ``create_sliding_window_causal_mask`` as a leaf (its
``autowrap_functions``). The leaf's ``config`` argument becomes graph code in
``SequentialTracer.create_arg``, which rebuilds the config as
``type(config)(**config.to_dict())``. ``PreTrainedConfig.to_dict`` drops
``_attn_implementation_internal`` (``_remove_keys_not_serialized``), so the
rebuilt config has no attention implementation, and
``transformers.masking_utils._preprocess_mask_arguments`` returns no mask at all
(its branch for attention backends without masks). Every decoder layer is then
called with ``attention_mask=None`` under the eager attention that
``calibration_forward_context`` forces on sdpa models too, and eager attention
without a mask is bidirectional: each token sees the tokens after it, and
padding is not masked. Calibration statistics (expert saliency, routing counts,
GPTQ Hessians) are computed on hidden states the model never produces at
inference.

The fix: :func:`install` wraps ``SequentialTracer.create_arg`` so that the
rebuilt config also receives ``attn_implementation``, with the value the traced
config holds (eager during tracing, as during calibration). The mask builder
then materialises the causal or sliding-window mask from the batch's own
``attention_mask`` (padding included) in the first subgraph, on the device of
the hidden states, and every layer receives it. Families whose mask builder the
autowrapper wraps with the live config (DeepSeek-V3, gpt-oss and most others)
already got a mask; nothing changes for them.

The package installs it at import. ``REAM_BIDIRECTIONAL_CALIBRATION=1`` in the
environment, or ``with causal_calibration(False):`` around ``oneshot``, restores
the upstream behaviour.

Delete this module (and its call in ``ream_modifiers/__init__.py``) once
llm-compressor keeps the attention implementation when it rebuilds a config.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger

__all__ = [
    "DISABLE_ENV",
    "causal_calibration",
    "causal_calibration_enabled",
    "install",
]

#: Environment variable that, set to a true value, disables the fix.
DISABLE_ENV = "REAM_BIDIRECTIONAL_CALIBRATION"

_MARK = "_ream_causal_calibration"
_override: bool | None = None
_logged = False


def causal_calibration_enabled() -> bool:
    """
    Whether calibration traces pass the attention implementation to the mask
    builders: the innermost :func:`causal_calibration` if any, else True unless
    :data:`DISABLE_ENV` is set to ``1``, ``true`` or ``yes``.
    """
    if _override is not None:
        return _override
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    return value not in {"1", "true", "yes"}


@contextmanager
def causal_calibration(enabled: bool = True) -> Iterator[None]:
    """
    Enable or disable the fix for the ``oneshot`` calls inside the block (the
    choice is made when the pipeline traces the model, at the start of each
    calibration).

    :param enabled: False reproduces upstream's bidirectional calibration
    """
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def _log_once() -> None:
    """Say once per process that a traced config kept its attention backend."""
    global _logged
    if not _logged:
        _logged = True
        logger.info(
            "Calibration uses causal attention masks: the sequential pipeline's "
            "traced config keeps its attention implementation (ream_modifiers."
            f"causal_calibration; {DISABLE_ENV}=1 disables)"
        )


def _keep_attn_implementation(create_arg: Callable[..., Any]) -> Callable[..., Any]:
    """
    Wrap ``SequentialTracer.create_arg`` so that the graph node rebuilding a
    config (``type(config)(**config.to_dict())``) also passes
    ``attn_implementation``, which ``to_dict`` leaves out.

    :param create_arg: the tracer's original method
    :return: the wrapped method, marked so that :func:`install` wraps only once
    """
    from torch.fx import Node
    from transformers.configuration_utils import PretrainedConfig

    @functools.wraps(create_arg)
    def wrapper(self: Any, a: Any) -> Any:
        arg = create_arg(self, a)
        if not isinstance(a, PretrainedConfig) or not causal_calibration_enabled():
            return arg
        implementation = getattr(a, "_attn_implementation", None)
        if (
            isinstance(arg, Node)
            and arg.op == "call_function"
            and arg.target is type(a)
            and isinstance(implementation, str)
            and "attn_implementation" not in arg.kwargs
        ):
            arg.kwargs = {**arg.kwargs, "attn_implementation": implementation}
            _log_once()
        return arg

    setattr(wrapper, _MARK, True)
    return wrapper


def install() -> bool:
    """
    Patch llm-compressor's ``SequentialTracer`` (idempotent). Every ``oneshot``
    that uses the sequential pipeline in this process is affected, whatever its
    modifiers (GPTQ included), model loading (offloaded or not) or launcher.

    :return: whether the patch is in place
    """
    try:
        from llmcompressor.pipelines.sequential.helpers import SequentialTracer
    except ImportError as error:  # pragma: no cover - layout changed upstream
        logger.warning(
            f"ream_modifiers.causal_calibration not installed ({error}): calibration "
            "may see bidirectional attention"
        )
        return False
    if not getattr(SequentialTracer.create_arg, _MARK, False):
        SequentialTracer.create_arg = _keep_attn_implementation(
            SequentialTracer.create_arg
        )
    return True
