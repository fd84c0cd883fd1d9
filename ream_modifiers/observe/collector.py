"""
One hook-based statistics collector per MoE layer.

Hooks (all registered through the owning modifier, so llm-compressor disables them
during its propagation passes):

- a forward-pre hook on the experts list reads the model's *actual* routing, the
  ``(hidden_states, top_k_index, top_k_weights)`` arguments the block passes to its
  experts: group-limited selection, correction bias, renormalisation and scaling
  factor are already applied exactly as the model applies them;
- a forward hook on each expert reads its output, for the routed tokens (and for
  every token when ``moe_calibrate_all_experts`` is on);
- a forward-pre hook on each expert's ``down_proj`` reads its intermediate
  (neuron) activations, only when a statistic asks for them;
- a forward hook on the experts list closes the batch.

Statistics are pluggable :class:`Statistic` objects that only keep running sums or
capped buffers, so memory does not grow with the number of calibration tokens,
and every tensor they hold can be reduced across ``torch.distributed`` ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from compressed_tensors.distributed import get_source_rank
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from torch import distributed as dist

from ream_modifiers.moe.layer import MoELayer, MoEModelError
from ream_modifiers.observe.statistics import Statistic
from ream_modifiers.observe.token_keys import TokenKeyRecorder, positional_keys

__all__ = ["BatchRouting", "ExpertBatch", "LayerStatsCollector", "HookRegistrar"]

HookRegistrar = Callable[[torch.nn.Module, Callable, str], object]


@dataclass
class BatchRouting:
    """The routing of one calibration batch through a layer."""

    hidden_states: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    valid: torch.Tensor | None  # [T] bool, None when no token is padding
    # (slot * T + token) of every routed pair, grouped by expert in slot-major
    # order (the order LinearExperts2D feeds its experts), and each expert's range
    order: torch.Tensor
    offsets: list[int]
    layer: MoELayer
    batch_index: int = 0
    # [T] content keys of the tokens (see token_keys), None where not recorded
    token_keys: torch.Tensor | None = None
    _logits: torch.Tensor | None = None
    _probabilities: torch.Tensor | None = None
    _valid_index: torch.Tensor | None = None

    @classmethod
    def build(cls, hidden_states, top_k_index, top_k_weights, valid, layer, **kw):
        flat = top_k_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # one host sync per batch (not per expert) to slice the ranges
        counts = torch.bincount(flat, minlength=layer.num_experts).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        return cls(
            hidden_states,
            top_k_index,
            top_k_weights,
            valid,
            order,
            offsets,
            layer,
            **kw,
        )

    def valid_tokens(self) -> torch.Tensor:
        """Positions of the real (non-padding) tokens."""
        if self._valid_index is None:
            tokens = self.hidden_states.shape[0]
            if self.valid is None:
                index = torch.arange(tokens, device=self.hidden_states.device)
            else:
                index = self.valid.nonzero().flatten()
            self._valid_index = index
        return self._valid_index

    def logits(self) -> torch.Tensor:
        """``[T, E]`` fp32 router logits, computed once per batch on demand."""
        if self._logits is None:
            self._logits = self.layer.router_logits(self.hidden_states)
        return self._logits

    def probabilities(self) -> torch.Tensor:
        """``[T, E]`` routing probabilities before top-k (softmax or sigmoid)."""
        if self._probabilities is None:
            self._probabilities = self.layer.routing.scores(self.logits())
        return self._probabilities

    def keys(self) -> torch.Tensor:
        """
        ``[T]`` keys of this batch's tokens: content keys when recorded, else keys
        from the batch index and position (deterministic in one process only).
        """
        if self.token_keys is None:
            self.token_keys = positional_keys(
                self.hidden_states.shape[0],
                self.batch_index,
                self.hidden_states.device,
            )
        return self.token_keys

    def routed(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot, token)`` of the pairs routed to ``expert``, slot-major."""
        pairs = self.order[self.offsets[expert] : self.offsets[expert + 1]]
        tokens = self.hidden_states.shape[0]
        return pairs // tokens, pairs % tokens


@dataclass
class ExpertBatch:
    """One expert's view of a batch: the tokens routed to it and its outputs."""

    expert: int
    token_index: torch.Tensor  # [R] routed token positions (padding removed)
    weights: torch.Tensor  # [R] routing weight of this expert for those tokens
    outputs: torch.Tensor  # [R, H] expert outputs on those tokens (unweighted)
    all_outputs: torch.Tensor | None  # [T', H] outputs on every valid token, or None
    routing: BatchRouting


class LayerStatsCollector:
    """
    Streams calibration statistics of one MoE layer.

    :param layer: the MoE layer to observe
    :param statistics: statistics to feed; each declares what it needs
    :param padding_masks: per-batch ``[tokens]`` bool masks of real tokens (None
        for a batch without padding), in calibration order
    :param token_keys: where the batches' content keys are recorded, for
        statistics that sample tokens (``needs_token_keys``)
    """

    def __init__(
        self,
        layer: MoELayer,
        statistics: Sequence[Statistic],
        padding_masks: Sequence[torch.Tensor | None] = (),
        token_keys: TokenKeyRecorder | None = None,
    ):
        self.layer = layer
        self.token_keys = token_keys
        self.statistics = list(statistics)
        self.padding_masks = list(padding_masks)
        self.batches_seen = 0
        self.tokens_seen = 0
        self._routing: BatchRouting | None = None
        # what ``attach`` registered, to remove exactly these hooks (and free the
        # statistics they reference) once the layer is decided
        self.handles: set = set()

    def __getitem__(self, name: str) -> Statistic:
        for statistic in self.statistics:
            if statistic.name == name:
                return statistic
        raise KeyError(f"{self.layer.name} collects no statistic {name!r}")

    # -- hooks -------------------------------------------------------------------

    def attach(self, register: HookRegistrar) -> None:
        """
        Register this collector's hooks through ``register(module, fn, kind)``,
        keeping the handles ``register`` returns in :attr:`handles`.
        """
        experts = self.layer.experts
        handles = self.handles
        handles.add(register(experts, self._on_experts_input, "forward_pre"))
        intermediate = any(s.needs_intermediate for s in self.statistics)
        for index, expert in enumerate(self.layer.expert_modules()):
            handles.add(
                register(expert, partial(self._on_expert_output, index), "forward")
            )
            if intermediate:
                hook = partial(self._on_expert_intermediate, index)
                handles.add(register(expert.down_proj, hook, "forward_pre"))
        handles.add(register(experts, self._on_experts_output, "forward"))

    @torch.no_grad()
    def _on_experts_input(self, module, args) -> None:
        hidden_states, top_k_index, top_k_weights = args[:3]
        valid = self._padding_mask(hidden_states.shape[0], hidden_states.device)
        if self.batches_seen == 0:
            self._check_routing(hidden_states, top_k_index, top_k_weights, valid)
        self._routing = BatchRouting.build(
            hidden_states,
            top_k_index,
            top_k_weights,
            valid,
            self.layer,
            batch_index=self.batches_seen,
            token_keys=self._batch_keys(hidden_states),
        )
        for statistic in self.statistics:
            statistic.update_routing(self._routing)

    def _check_routing(self, hidden_states, top_k_index, top_k_weights, valid):
        """The first batch: the table's routing rules must reproduce the model's
        (an unlisted family is routed by rules detected from its config)."""
        if valid is not None:
            hidden_states = hidden_states[valid]
            top_k_index, top_k_weights = top_k_index[valid], top_k_weights[valid]
        problem = self.layer.routing_disagreement(
            hidden_states, top_k_index, top_k_weights
        )
        if problem is not None:
            spec = self.layer.spec
            raise MoEModelError(
                f"{self.layer.name}: the routing rules for model_type "
                f"{spec.model_type!r} do not reproduce the model's router on the "
                f"first calibration batch ({problem}), so every decision would "
                "rest on the wrong routing. Add or correct its row in "
                "ream_modifiers/moe/architectures.yaml (scoring, renormalisation, "
                "scaling factor, selection bias, groups)"
            )

    @torch.no_grad()
    def _on_expert_output(self, expert: int, module, args, output) -> None:
        routing = self._routing
        if routing is None:  # expert called outside its block
            return
        output = output[0] if isinstance(output, tuple) else output
        slot, token_index = routing.routed(expert)
        all_outputs = None
        if get_calibrate_all_experts_flag():
            all_outputs = output
            output = output[token_index]
        weights = routing.top_k_weights[token_index, slot]
        if routing.valid is not None:
            keep = routing.valid[token_index]
            token_index, weights, output = (
                token_index[keep],
                weights[keep],
                output[keep],
            )
            if all_outputs is not None:
                all_outputs = all_outputs[routing.valid]
        if self.layer.spec.input_weighted:
            output, all_outputs = _per_unit_weight(
                expert, output, weights, all_outputs, routing
            )
        batch = ExpertBatch(expert, token_index, weights, output, all_outputs, routing)
        for statistic in self.statistics:
            statistic.update_expert(batch)

    @torch.no_grad()
    def _on_expert_intermediate(self, expert: int, module, args) -> None:
        routing = self._routing
        if routing is None:
            return
        if not get_calibrate_all_experts_flag():
            raise RuntimeError(
                f"{self.layer.name}: neuron activations must be sampled on the same "
                "tokens for every expert; run oneshot with "
                "moe_calibrate_all_experts=True"
            )
        for statistic in self.statistics:
            if statistic.needs_intermediate:
                statistic.update_intermediate(expert, args[0], routing)

    def _on_experts_output(self, module, args, output) -> None:
        routing = self._routing
        if routing is not None:
            for statistic in self.statistics:
                statistic.end_batch()
            valid = routing.valid
            tokens = routing.hidden_states.shape[0]
            self.tokens_seen += tokens if valid is None else int(valid.sum())
        self._routing = None
        self.batches_seen += 1

    def _batch_keys(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.token_keys is None:
            return None
        keys = self.token_keys.keys_for(self.batches_seen)
        if keys is None or keys.numel() != hidden_states.shape[0]:
            return None
        return keys.to(hidden_states.device)

    def _padding_mask(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        if self.batches_seen >= len(self.padding_masks):
            return None
        mask = self.padding_masks[self.batches_seen]
        if mask is None:
            return None
        if mask.numel() != tokens:
            raise RuntimeError(
                f"{self.layer.name}: calibration batch {self.batches_seen} has "
                f"{tokens} tokens but its attention mask has {mask.numel()}; the "
                "pipeline did not feed batches in dataloader order, so padding "
                "cannot be excluded. Calibrate with batch_size=1 or without padding."
            )
        return mask.to(device)

    # -- results ---------------------------------------------------------------

    def reduce_to_source(self, group: dist.ProcessGroup | None = None) -> None:
        """
        Combine every statistic of every rank on the source rank (sums, maxima,
        merged samples). Every rank must call this for the same layers in the same
        order, also a rank that saw no batch or routed no token here: the
        collectives are the same on every rank whatever the data.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        source = get_source_rank()
        hidden = self.layer.router_weight.shape[-1]
        for statistic in self.statistics:
            # the reduction goes through host memory anyway (a gloo group)
            statistic.ensure_allocated(torch.device("cpu"), hidden)
            statistic.reduce_to_source(group, source)
        seen = torch.tensor([self.batches_seen, self.tokens_seen], dtype=torch.long)
        dist.reduce(seen, dst=source, group=group)
        self.batches_seen, self.tokens_seen = seen.tolist()


def _per_unit_weight(
    expert: int,
    output: torch.Tensor,
    weights: torch.Tensor,
    all_outputs: torch.Tensor | None,
    routing: BatchRouting,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    An input-weighted expert's outputs ``f(s x)`` as ``f(s x) / s``, so that the
    statistics' ``s * output`` is the expert's contribution to the layer; on
    every token, ``s`` is the token's score for this expert (its input scale).
    """
    # a score that underflowed to 0 scaled the input to 0, and f(0) = 0 here
    tiny = torch.finfo(torch.float32).tiny
    routed = output.float() / weights.float().clamp(min=tiny)[:, None]
    if all_outputs is None:
        return routed.to(output.dtype), None
    scores = routing.probabilities()[:, expert]
    if routing.valid is not None:
        scores = scores[routing.valid]
    every = all_outputs.float() / scores.float().clamp(min=tiny)[:, None]
    return routed.to(output.dtype), every.to(all_outputs.dtype)
