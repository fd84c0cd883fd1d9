"""
Expert budgets checked against the model's config before its weights load.

Each uniform-budget modifier plans its budget in ``on_initialize``, after the
model has loaded (minutes, for a large one); a ``sparsity`` that keeps fewer
experts than top-k, a ``num_experts`` above the model's count, or a count that
its expert groups cannot split then fails there. The expert count, top-k and
groups are all in config.json, so the same plan is made here from the config
and the parsed recipe, and refused with the budgets that would fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from ream_modifiers.errors import InputError
from ream_modifiers.moe.architectures import (
    MoEArchSpec,
    UnsupportedFamilyError,
    get_arch_spec,
)
from ream_modifiers.moe.routing import RoutingSpec

__all__ = [
    "ExpertBudgetError",
    "ModelConfigError",
    "check_expert_budget",
    "model_routing",
]


class ModelConfigError(InputError):
    """A model config that this package cannot read routing facts from."""


class ExpertBudgetError(InputError):
    """An expert budget in the recipe that the model cannot satisfy."""


@dataclass(frozen=True)
class _ConfigLayer:
    """What ``min_experts_per_group`` reads of a layer, from the config alone."""

    routing: RoutingSpec
    spec: MoEArchSpec

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts


def _load_config(model: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if not Path(model).expanduser().exists():
            raise  # a hub ID: a network or access problem, reported as it is
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        remote = "trust_remote_code" in str(error)
        raise ModelConfigError(
            f"cannot read config.json of {model}: {first or type(error).__name__}",
            "pass --trust-remote-code if you trust the model's code"
            if remote
            else "check that config.json is valid JSON with a model_type this "
            "transformers version knows, or re-download it",
        ) from None


def model_routing(
    model: str, trust_remote_code: bool = False
) -> tuple[MoEArchSpec, RoutingSpec]:
    """
    The family and routing rules of ``model`` from its config alone.

    :param model: ``--model``: a local directory or a hub ID
    :param trust_remote_code: run configuration code shipped with the model
    :raises ModelConfigError: an unreadable config, a model with no routed
        experts, or a top-k larger than the expert count
    """
    config = _load_config(model, trust_remote_code)
    try:
        spec = get_arch_spec(config)
    except UnsupportedFamilyError as error:
        family = error.family
        raise ModelConfigError(
            f"model {model} is {family.name} (model_type {family.model_type!r}), "
            f"which cannot be reduced: {family.reason}",
            family.fix,
        ) from None
    except ValueError:
        raise ModelConfigError(
            f"model {model} (model_type {config.model_type!r}) is not an MoE model: "
            "its config has no routed expert count or no top-k",
            "give an MoE model (e.g. Qwen3-MoE, Mixtral, DeepSeek-V3); a new MoE "
            "family needs a row in ream_modifiers/moe/architectures.yaml",
        ) from None
    try:
        routing = RoutingSpec.from_config(config, spec)
    except (AttributeError, TypeError, ValueError):
        raise ModelConfigError(
            f"config.json of {model} has no integer {spec.num_experts_key} and "
            f"{spec.top_k_key}",
            "correct config.json, or re-download it",
        ) from None
    count, top_k = spec.num_experts_key, spec.top_k_key
    if routing.top_k < 1 or routing.num_experts < 1:
        raise ModelConfigError(
            f"config.json of {model}: {count}={routing.num_experts} and "
            f"{top_k}={routing.top_k} must both be >= 1",
            "correct config.json, or re-download it",
        )
    if routing.top_k > routing.num_experts:
        raise ModelConfigError(
            f"config.json of {model}: {top_k}={routing.top_k} is larger than "
            f"{count}={routing.num_experts}: the router picks more experts per "
            "token than a layer has",
            f"correct {top_k} or {count} in config.json (top-k is at most the "
            "expert count), or re-download it",
        )
    return spec, routing


def _span(values: list[Any]) -> str:
    """``[2, 3, 4, 5]`` -> ``between 2 and 5``; ``[4, 6]`` -> ``to 4 or 6``."""
    if len(values) <= 3:
        return "to " + " or ".join(map(str, values))
    steps = {b - a for a, b in pairwise(values)}
    if steps == {1}:
        return f"between {values[0]} and {values[-1]}"
    if len(steps) == 1:
        return f"to a multiple of {steps.pop()} from {values[0]} to {values[-1]}"
    return f"to one of {', '.join(map(str, values[:6]))}, ..."


def _fits(plan: Callable[..., Any], **kwargs: Any) -> bool:
    try:
        plan(**kwargs)
    except ValueError:
        return False
    return True


def _fitting_budgets(plan: Callable[..., Any], routing: RoutingSpec, **kw) -> str:
    """The ``num_experts`` and ``sparsity`` values that plan, as a fix line."""
    n = routing.num_experts
    targets = [t for t in range(1, n) if _fits(plan, target=t, **kw)]
    if not targets:
        return (
            f"this model cannot lose an expert (top_k={routing.top_k} of {n}); use "
            "a recipe without expert reduction"
        )
    shares = [s / 100 for s in range(1, 100) if _fits(plan, sparsity=s / 100, **kw)]
    sparsity = f", or sparsity between {shares[0]} and {shares[-1]}" if shares else ""
    return f"set num_experts {_span(targets)}{sparsity}"


def check_expert_budget(
    model: str,
    modifiers: Iterable[Any],
    recipe: str | Path = "the recipe",
    trust_remote_code: bool = False,
) -> None:
    """
    Plan every uniform-budget expert-reduction modifier's budget from the
    model's config, as each will in ``on_initialize`` (where every modifier of
    the recipe sees the model as loaded).

    :param model: ``--model``: a local directory or a hub ID
    :param modifiers: the parsed recipe's modifiers
    :param recipe: the recipe file, named in the error
    :param trust_remote_code: run configuration code shipped with the model
    :raises ModelConfigError: see :func:`model_routing`
    :raises ExpertBudgetError: a budget the model cannot satisfy, with the ones
        that fit
    """
    # llm-compressor is loaded by now (the recipe is parsed); the base module's
    # plan_budget is the very function the modifiers call
    from ream_modifiers.modifiers import base
    from ream_modifiers.modifiers.base import ExpertReductionModifier

    reductions = [m for m in modifiers if isinstance(m, ExpertReductionModifier)]
    if not reductions:
        return
    spec, routing = model_routing(model, trust_remote_code)
    layer = _ConfigLayer(routing, spec)
    for modifier in reductions:
        if not modifier.uniform_budget():
            continue  # a per-layer budget: the method decides each count
        groups = dict(n_group=routing.n_group, topk_group=routing.topk_group)
        kw = dict(
            num_experts=routing.num_experts,
            top_k=routing.top_k,
            min_per_group=modifier.min_experts_per_group([layer]),
            **groups,
        )
        name = type(modifier).__name__
        setting = (
            f"num_experts={modifier.num_experts}"
            if modifier.num_experts is not None
            else f"sparsity={modifier.sparsity}"
        )
        try:
            base.plan_budget(
                target=modifier.num_experts, sparsity=modifier.sparsity, **kw
            )
        except ValueError as error:
            # plan_budget says the problem, then what to do, after a "; "
            head = str(error).split("; ")[0]
            facts = f"{routing.num_experts} experts per layer, top_k={routing.top_k}"
            if routing.n_group is not None:
                facts += f", n_group={routing.n_group}, topk_group={routing.topk_group}"
            raise ExpertBudgetError(
                f"recipe {recipe}: {name} {setting} cannot be met by {model} "
                f"({facts}): {head}",
                f"in {name}, {_fitting_budgets(base.plan_budget, routing, **kw)}",
            ) from None
