"""
:class:`MoELayer`: one view of an MoE block over llm-compressor's linearized
experts (``LinearExperts2D`` of ``ExpertMLP`` modules), its router and its shared
experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from compressed_tensors import align_module_device
from compressed_tensors.offload import disable_onloading
from llmcompressor.modeling.moe.linear_experts import ExpertMLP, LinearExperts2D
from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
from torch import nn
from transformers import PreTrainedModel

from ream_modifiers.moe.architectures import MoEArchSpec, get_arch_spec, text_config
from ream_modifiers.moe.forward_module import adapt_forward_module
from ream_modifiers.moe.per_layer import (
    PER_LAYER_KEY,
    mismatched_counts,
    per_layer_counts,
)
from ream_modifiers.moe.routing import RoutingSpec
from ream_modifiers.moe.weights import ExpertWeights

__all__ = ["MoELayer", "ExpertWeights", "find_moe_layers", "MoEModelError"]


class MoEModelError(ValueError):
    """The model cannot be handled as an MoE model (raised before calibration)."""


class MoELayer:
    """
    One MoE block: its routed experts, router, routing rules and shared experts.

    :param name: module name of the MoE block in the model
    :param block: the MoE block module (e.g. ``Qwen3MoeSparseMoeBlock``)
    :param spec: the family's architecture facts
    :param routing: routing rules resolved against the model config
    :param owner: the module holding this block as one of its expert sets
        (ERNIE-4.5-VL's decoder MLP, which caches the count too); None elsewhere
    """

    def __init__(
        self,
        name: str,
        block: nn.Module,
        spec: MoEArchSpec,
        routing: RoutingSpec,
        owner: nn.Module | None = None,
    ):
        self.name = name
        self.block = block
        self.spec = spec
        self.routing = routing
        self.owner = owner

    # -- structure -----------------------------------------------------------

    @property
    def experts(self) -> LinearExperts2D:
        return getattr(self.block, self.spec.experts_attr)

    @property
    def router(self) -> nn.Module:
        """The module holding the router ``weight`` (and a logit ``bias``)."""
        return _resolve(self.block, self.spec.router_attr)

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    def router_groups(self) -> list[list[int]]:
        """
        The experts of each router group (group membership is positional), or all
        experts as one group when routing is not group-limited. Merging or moving
        weights across these groups would change routing semantics.
        """
        size = self.routing.group_size or self.num_experts
        return [list(range(lo, lo + size)) for lo in range(0, self.num_experts, size)]

    def expert(self, index: int) -> ExpertMLP:
        return self.experts[index]

    def expert_modules(self) -> list[ExpertMLP]:
        """The routed experts in routing order (the act_fn entry is skipped)."""
        return [self.experts[i] for i in range(self.num_experts)]

    def iter_expert_weights(self, index: int) -> Iterator[torch.Tensor]:
        """
        Expert ``index``'s projection weights, one at a time, each on the layer's
        execution device only while the caller holds it (offload-safe, no copy).
        """
        expert = self.expert(index)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(expert, proj, None)
            if linear is None:
                continue
            with align_module_device(linear):
                yield linear.weight

    @property
    def shared_experts(self) -> list[nn.Module]:
        """Shared experts and their gates; no method here ever modifies them."""
        names = list(self.spec.shared_expert_attrs)
        if self.spec.shared_expert_gate_attr:
            names.append(self.spec.shared_expert_gate_attr)
        return [m for n in names if (m := getattr(self.block, n, None)) is not None]

    # -- router ----------------------------------------------------------------

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight

    @property
    def router_bias(self) -> torch.Tensor | None:
        """A logit bias added by the router itself (gpt-oss style)."""
        bias = getattr(self.router, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def bias_owner(self) -> nn.Module | None:
        """The module that directly holds the score-correction bias, or None."""
        if self.spec.bias_attr is None:
            return None
        base = (
            self.block
            if self.spec.bias_location == "block"
            else _resolve(self.block, self.spec.router_owner_attr)
        )
        *path, _ = self.spec.bias_attr.split(".")
        owner = _resolve(base, ".".join(path)) if path else base
        return owner if hasattr(owner, self.bias_name) else None

    @property
    def bias_name(self) -> str:
        """Attribute name of the bias on :attr:`bias_owner`."""
        return (self.spec.bias_attr or "").split(".")[-1]

    @property
    def correction_bias(self) -> torch.Tensor | None:
        """The selection-only score-correction bias, or None."""
        owner = self.bias_owner
        return None if owner is None else getattr(owner, self.bias_name)

    def count_holders(self) -> list[nn.Module]:
        """Modules that may cache the expert count: block, router path, experts."""
        holders = [self.block, self.experts]
        if self.owner is not None:
            holders.append(self.owner)
        module = self.block
        for part in self.spec.router_attr.split("."):
            module = getattr(module, part)
            holders.append(module)
        return holders

    def router_logits(
        self, hidden_states: torch.Tensor, native: bool = False
    ) -> torch.Tensor:
        """
        Router logits in fp32 for ``[tokens, H]`` hidden states; with ``native``,
        computed in the router weight's dtype (as most families' routers do in
        bf16) and then cast to fp32.
        """
        with align_module_device(self.router):
            weight, bias = self.router_weight, self.router_bias
            if native:
                hidden = hidden_states.to(weight.dtype)
                return nn.functional.linear(hidden, weight, bias).float()
            bias = None if bias is None else bias.float()
            return nn.functional.linear(hidden_states.float(), weight.float(), bias)

    def route(
        self,
        hidden_states: torch.Tensor,
        among: Sequence[int] | None = None,
        native: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        ``(top_k_index, top_k_weights)`` exactly as the model routes; with
        ``among``, as it would route once only those experts (router rows and
        biases) are kept, the indices pointing into ``among``; ``native``: from
        logits computed in the router's dtype (:meth:`router_logits`).
        """
        logits = self.router_logits(hidden_states, native)
        with align_module_device(self.router):
            bias = self.correction_bias
            bias = None if bias is None else bias.float().to(logits.device)
        if among is not None:
            kept = torch.as_tensor(list(among), device=logits.device)
            logits = logits[:, kept]
            bias = None if bias is None else bias[..., kept]
        return self.routing.route(logits, bias)

    def routing_disagreement(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> str | None:
        """
        How :meth:`route` differs from the routing the model itself produced for
        ``hidden_states``, or None where it agrees: the expert sets of more than
        1% of the tokens (near-ties may flip in low precision), or a weight of an
        agreeing token by more than 2% (bf16 rounding is 0.4%). The rules pass if
        they agree from fp32 logits or from logits in the router's dtype (families
        differ in which one their router computes; near-ties flip between them).
        Every method's probabilities, the pruned router and the merge checks use
        :meth:`route`, so a family whose rules are wrong must stop before its
        decisions.
        """
        problem = self._disagreement(
            *self.route(hidden_states), top_k_index, top_k_weights
        )
        if problem is None or self.router_weight.dtype == torch.float32:
            return problem
        native = self.route(hidden_states, native=True)
        if self._disagreement(*native, top_k_index, top_k_weights) is None:
            return None
        return problem

    @staticmethod
    def _disagreement(index, weights, top_k_index, top_k_weights) -> str | None:
        ours, order = index.sort(dim=-1)
        theirs, their_order = top_k_index.to(index.device).sort(dim=-1)
        same = (ours == theirs).all(dim=-1)
        differ = 1.0 - same.float().mean().item()
        if differ > 0.01:
            return f"{differ:.1%} of the tokens get other experts"
        mine = weights.float().gather(-1, order)[same]
        model = top_k_weights.to(weights.device).float().gather(-1, their_order)[same]
        if not torch.allclose(mine, model, rtol=0.02, atol=1e-3):
            gap = (mine - model).abs().max().item()
            return f"routing weights differ by up to {gap:.3g}"
        return None

    def activation(self):
        """
        ``(gate pre-activation or None, up pre-activation) -> neuron activations``
        of this layer's experts, exactly as their forward applies it.
        """
        expert = self.expert(0)
        if getattr(expert, "gate_proj", None) is not None:
            apply_gate = expert._apply_gate
            return lambda gate, up: apply_gate(torch.cat([gate, up], dim=-1))
        act_fn = expert.act_fn
        return lambda gate, up: act_fn(up)

    # -- weights ---------------------------------------------------------------

    @torch.no_grad()
    def stacked_weights(self, indices: Sequence[int] | None = None) -> ExpertWeights:
        """
        Stack the experts' projections into ``[E, ...]`` tensors (a copy on the
        layer's execution device, in the weights' dtype).

        :param indices: experts to stack, all by default
        """
        indices = range(self.num_experts) if indices is None else indices
        experts = [self.expert(i) for i in indices]

        def stack(proj: str, attr: str) -> torch.Tensor | None:
            # one preallocated copy filled expert by expert: no per-expert clones,
            # and an offloaded expert is on the device only while it is copied
            out = None
            for position, expert in enumerate(experts):
                linear = getattr(expert, proj, None)
                if linear is None or getattr(linear, attr, None) is None:
                    return None
                with align_module_device(linear):
                    tensor = getattr(linear, attr).detach()
                    if out is None:
                        shape = (len(experts), *tensor.shape)
                        out = tensor.new_empty(shape)
                    out[position].copy_(tensor)
            return out

        return ExpertWeights(
            gate=stack("gate_proj", "weight"),
            up=stack("up_proj", "weight"),
            down=stack("down_proj", "weight"),
            gate_bias=stack("gate_proj", "bias"),
            up_bias=stack("up_proj", "bias"),
            down_bias=stack("down_proj", "bias"),
        )

    def __repr__(self) -> str:
        return (
            f"MoELayer({self.name!r}, experts={self.num_experts}, "
            f"top_k={self.routing.top_k}, scoring={self.routing.scoring})"
        )


def _check_expert_weights_uncompressed(name: str, experts: torch.nn.Module) -> None:
    """An already-quantized checkpoint's experts hold packed integers and scales
    (compressed-tensors' ``weight_packed``) where every method reads ``weight``."""
    with disable_onloading():
        for linear_name, linear in next(iter(experts.children())).named_children():
            weight = getattr(linear, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                continue
            stored = sorted(n for n, _ in linear.named_parameters(recurse=False))
            raise MoEModelError(
                f"{name}: expert {linear_name} holds no full-precision weight "
                f"(it stores {stored}): the checkpoint is already quantized, and "
                "expert reduction reads and rewrites full-precision expert "
                "weights. Start from the model's unquantized (bf16) release, or "
                "decompress this checkpoint to bf16 first; add the quantization "
                "back in the recipe (e.g. recipes/ream_w4a16.yaml)."
            )


def find_moe_layers(
    model: PreTrainedModel, ignore: Sequence[str] = ()
) -> list[MoELayer]:
    """
    Every MoE block of ``model`` that has linearized experts and a router.

    :param model: a transformers MoE model whose experts are linearized (loaded with
        :func:`ream_modifiers.moe.load.load_moe_model` or already passed through
        ``oneshot``'s post-load linearization)
    :param ignore: module-name regexes (``re:`` prefix optional) of blocks to skip
    :raises MoEModelError: if the model has no MoE layers, or fused experts
    """
    spec = get_arch_spec(model.config)
    routing = RoutingSpec.from_config(model.config, spec)
    if fused := get_non_linearized_moes(model):
        raise MoEModelError(
            f"{len(fused)} experts modules (first: {fused[0][0]}) are still fused 3D "
            "tensors. Load the model with ream_modifiers.load_moe_model(), or call "
            "llmcompressor.modeling.moe.linearize.linearize_moe(model) first."
        )
    if spec.input_weighted:
        from ream_modifiers.moe.input_weighted import adapt_input_weighted_blocks

        adapt_input_weighted_blocks(model)
    adapt_forward_module(model)
    patterns = [re.compile(p.removeprefix("re:")) for p in ignore]
    layers = []
    for name, module in model.named_modules():
        experts = getattr(module, spec.experts_attr, None)
        router = _resolve(module, spec.router_attr)
        if not isinstance(experts, LinearExperts2D) or router is None:
            continue
        with disable_onloading():  # a type check; no need to read it from disk
            router_weight = getattr(router, "weight", None)
        if not isinstance(router_weight, torch.Tensor):
            raise MoEModelError(
                f"{name}.{spec.router_attr} has no `weight` tensor; the "
                f"{spec.model_type!r} router layout is not supported. Add a row to "
                "ream_modifiers/moe/architectures.yaml naming its router."
            )
        if not spec.in_scope(name) or any(p.search(name) for p in patterns):
            continue
        _check_expert_weights_uncompressed(name, experts)
        owner = None
        if spec.expert_sets and name.rsplit(".", 1)[-1] in spec.expert_sets:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
        layers.append(MoELayer(name, module, spec, routing, owner))
    if not layers:
        raise MoEModelError(
            f"No MoE layers found in {type(model).__name__} "
            f"(model_type={model.config.model_type!r}): no module has both a "
            f"`{spec.experts_attr}` experts list and a `{spec.router_attr}` router"
            + (", after applying `ignore`" if ignore else "")
            + ". Expert pruning and merging need a Mixture-of-Experts model."
        )
    _check_counts(model, layers, routing.num_experts)
    return layers


def _check_counts(model, layers: list[MoELayer], configured: int) -> None:
    """One count in every layer, the config's; or, for a non-uniform budget's
    output loaded back, the per-layer counts its config lists."""
    declared = per_layer_counts(text_config(model.config))
    if declared is not None:
        stored = [(layer.name, layer.num_experts) for layer in layers]
        if wrong := mismatched_counts(stored, declared):
            raise MoEModelError(
                f"MoE layers hold other expert counts than config.{PER_LAYER_KEY} "
                f"lists {declared} ({{name: (stored, listed)}}: {wrong}); load the "
                "checkpoint with load_moe_model"
            )
        return
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise MoEModelError(
            f"MoE layers have different expert counts {sorted(counts)}; this "
            "package needs a uniform count (vLLM cannot load anything else)."
        )
    if counts != {configured}:
        raise MoEModelError(
            f"The model has {counts.pop()} experts per layer but config."
            f"{layers[0].spec.num_experts_key}={configured}; was it pruned without "
            "updating its config?"
        )


def _resolve(module: nn.Module | None, path: str) -> nn.Module | None:
    """``module.a.b`` for the dotted ``path`` ``"a.b"``, None where absent."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
