"""
Streaming per-expert statistics fed by :class:`LayerStatsCollector`.

Each statistic holds running fp64 sums (or maxima) on the layer's execution device
and exposes them as named tensors, so that a distributed run can reduce them and
a method can read them without knowing how they were gathered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import distributed as dist

from ream_modifiers.observe.token_keys import EMPTY_KEY, reseeded

if TYPE_CHECKING:
    from ream_modifiers.observe.collector import BatchRouting, ExpertBatch

__all__ = [
    "LayerStatistics",
    "RoutedStatistics",
    "Statistic",
    "RoutedExpertSums",
    "MeanExpertOutput",
    "RouterLogitGram",
    "ActivationSamples",
    "InputSamples",
]


class Statistic:
    """
    Base class of a streaming statistic.

    Subclasses declare their accumulators in :meth:`_allocate` and update them in
    :meth:`update_routing` / :meth:`update_expert`. ``reduce_ops`` names the
    ``torch.distributed`` reduction of each accumulator (sum unless listed).

    Real-valued sums listed in ``compensated`` are kept as fp64 (high, low) pairs
    updated by Knuth's two-sum (:meth:`_add`), so each reads as the exact sum
    rounded once: the same bits whatever the batch order or the split across
    ranks, and a distributed run decides exactly as a single one.
    """

    name: str = ""
    needs_all_tokens: bool = False  # needs expert outputs on every token
    needs_intermediate: bool = False  # needs neuron activations (down_proj input)
    needs_token_keys: bool = False  # samples tokens by their content keys
    reduce_ops: dict[str, str] = {}
    compensated: tuple[str, ...] = ()

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._tensors: dict[str, torch.Tensor] | None = None
        self._low: dict[str, torch.Tensor] = {}

    def _allocate(
        self, device: torch.device, hidden_size: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _ensure(
        self, device: torch.device, hidden_size: int
    ) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._allocate(device, hidden_size)
            self._low = {
                key: torch.zeros_like(self._tensors[key]) for key in self.compensated
            }
        return self._tensors

    def _add(self, key: str, value: torch.Tensor, index=None) -> None:
        """``accumulator[index] += value``, with the rounding error kept aside."""
        high, low = self._tensors[key], self._low[key]
        if index is not None:
            high, low = high[index], low[index]
        _two_sum_into(high, low, value)

    def update_routing(self, routing: BatchRouting) -> None:
        """Called once per batch, before any expert runs."""
        hidden = routing.hidden_states
        self._ensure(hidden.device, hidden.shape[-1])

    def update_expert(self, batch: ExpertBatch) -> None:
        """Called once per expert per batch."""

    def update_intermediate(
        self, expert: int, activations: torch.Tensor, routing: BatchRouting
    ) -> None:
        """Called per expert per batch with its ``[T, D]`` neuron activations."""

    def end_batch(self) -> None:
        """Called once per batch, after every expert ran."""

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The accumulators; a compensated sum reads as ``high + low``."""
        if self._tensors is None:
            raise RuntimeError(f"statistic {self.name!r} has seen no batch")
        if not self._low:
            return self._tensors
        return {
            key: tensor + self._low[key] if key in self._low else tensor
            for key, tensor in self._tensors.items()
        }

    def reduce_to_source(
        self, group: dist.ProcessGroup | None = None, source: int = 0
    ) -> None:
        """
        Reduce every accumulator onto rank ``source`` (through host memory, so a
        gloo group serves any device). Only ``source`` decides, so only it needs
        the totals, as in upstream REAP.
        """
        if self._tensors is None:
            raise RuntimeError(
                f"statistic {self.name!r} has no accumulators to reduce; call "
                "ensure_allocated() on ranks that saw no batch"
            )
        for key in sorted(self._tensors):
            tensor = self._tensors[key]
            if key in self._low:
                self._gather_compensated(key, group, source)
                continue
            op = (
                dist.ReduceOp.MAX
                if self.reduce_ops.get(key) == "max"
                else dist.ReduceOp.SUM
            )
            host = tensor.cpu()
            dist.reduce(host, dst=source, op=op, group=group)
            self._tensors[key] = host.to(tensor.device)

    def _gather_compensated(self, key: str, group, source: int) -> None:
        # a plain SUM would round once per rank: gather the pairs, two-sum them
        tensor = self._tensors[key]
        pair = torch.stack([tensor, self._low[key]]).cpu()
        is_source = dist.get_rank() == source
        parts = (
            [torch.empty_like(pair) for _ in range(dist.get_world_size())]
            if is_source
            else None
        )
        dist.gather(pair, parts, dst=source, group=group)
        if not is_source:
            return
        high, low = torch.zeros_like(pair[0]), torch.zeros_like(pair[0])
        for part in parts:
            _two_sum_into(high, low, part[0])
            low += part[1]
        self._tensors[key] = high.to(tensor.device)
        self._low[key] = low.to(tensor.device)

    def ensure_allocated(self, device: torch.device, hidden_size: int) -> None:
        self._ensure(device, hidden_size)

    # -- saving and restoring (see ream_modifiers.observe.stats_file) ------------

    def settings(self) -> dict[str, Any]:
        """What, besides the expert count, decides this statistic's values."""
        return {}

    def accepts(self, name: str, settings: dict[str, Any]) -> bool:
        """Whether a statistic recorded as ``name`` with ``settings`` can stand in
        for this one (the same values for every key this one reads)."""
        return name == self.name and settings == self.settings()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The accumulators as they stand, rounding-error halves as ``low.KEY``
        (empty if no batch reached this statistic)."""
        if self._tensors is None:
            return {}
        state = dict(self._tensors)
        state.update({f"low.{key}": low for key, low in self._low.items()})
        return state

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        """Become the statistic :meth:`export_state` returned ``state`` from."""
        self._tensors = {k: v for k, v in state.items() if not k.startswith("low.")}
        # only the sums this statistic compensates: a superset's extra halves
        # (RoutedExpertSums with probabilities) are not read
        self._low = {
            key: state[f"low.{key}"]
            for key in self.compensated
            if f"low.{key}" in state
        }


def _two_sum_into(high: torch.Tensor, low: torch.Tensor, value: torch.Tensor):
    """high + low += value, in place: Knuth's error-free two-sum, any magnitudes."""
    total = high + value
    virtual = total - high
    error = (high - (total - virtual)) + (value - virtual)
    high.copy_(total)
    low.add_(error)


class RoutedExpertSums(Statistic):
    """
    Per expert, over the tokens routed to it (padding excluded):

    - ``count``: number of routed tokens
    - ``weighted_norm``: sum of g_j(x)·‖f_j(x)‖₂ (REAP numerator)
    - ``norm``: sum of ‖f_j(x)‖₂ (EAN)
    - ``weight``: sum of g_j(x)
    - ``max_activation``: largest |f_j(x)| element (super-expert detection)

    g_j is the weight the model multiplies expert j's output by. With
    ``probabilities=True`` also, with p_j(x) the router's unrenormalised score
    (see :mod:`ream_modifiers.engines.saliency`):

    - ``prob_sq_norm``: sum of p_j(x)²·‖f_j(x)‖₂
    - ``prob_sq_norm_batch_means``: sum over batches of that batch's mean of
      p_j(x)²·‖f_j(x)‖₂ over its routed tokens (0 where none)
    - ``batches``: number of batches seen (the same for every expert)

    Every entry is a sum over batches, so ranks combine by summing.
    """

    name = "routed"
    reduce_ops = {"max_activation": "max"}
    _SUMS = ("count", "weighted_norm", "norm", "weight")
    _PROBABILITY_SUMS = ("prob_sq_norm", "prob_sq_norm_batch_means")

    def __init__(self, num_experts: int, probabilities: bool = False):
        super().__init__(num_experts)
        self.probabilities = probabilities
        self.compensated = ("weighted_norm", "norm", "weight") + (
            self._PROBABILITY_SUMS if probabilities else ()
        )

    def settings(self) -> dict[str, Any]:
        return {"probabilities": self.probabilities}

    def accepts(self, name: str, settings: dict[str, Any]) -> bool:
        # the probability sums are extra keys: the others are computed alike
        return name == self.name and (
            settings.get("probabilities", False) or not self.probabilities
        )

    def _allocate(self, device, hidden_size):
        zeros = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        keys = (*self._SUMS, "max_activation")
        if self.probabilities:
            keys += (*self._PROBABILITY_SUMS, "batches")
        # one batch's per-expert values, folded into the sums in end_batch():
        # one small write per expert instead of one per accumulator
        self._batch = torch.zeros(
            6 if self.probabilities else 5,
            self.num_experts,
            dtype=torch.float64,
            device=device,
        )
        return {key: zeros.clone() for key in keys}

    def update_expert(self, batch: ExpertBatch) -> None:
        if batch.token_index.numel() == 0:
            return
        norms = torch.linalg.vector_norm(batch.outputs, dim=-1, dtype=torch.float32)
        norms = norms.double()
        weights = batch.weights.double()
        values = [
            # a fill kernel, not a host-to-device copy
            torch.full((), norms.numel(), dtype=torch.float64, device=norms.device),
            (weights * norms).sum(),
            norms.sum(),
            weights.sum(),
            batch.outputs.abs().amax().double(),
        ]
        if self.probabilities:
            routing = batch.routing
            p = routing.probabilities()[batch.token_index, batch.expert].double()
            values.append((p * p * norms).sum())
        self._batch[:, batch.expert] = torch.stack(values)

    def end_batch(self) -> None:
        acc = self._tensors
        batch = self._batch
        acc["count"] += batch[0]  # whole numbers: exact in fp64
        for row, key in enumerate(self._SUMS[1:], start=1):
            self._add(key, batch[row])
        torch.maximum(acc["max_activation"], batch[4], out=acc["max_activation"])
        if self.probabilities:
            self._add("prob_sq_norm", batch[5])
            routed = batch[0]
            mean = torch.where(routed > 0, batch[5] / routed.clamp(min=1), 0.0)
            self._add("prob_sq_norm_batch_means", mean)
            acc["batches"] += 1.0
        batch.zero_()


class MeanExpertOutput(Statistic):
    """
    ``output_sum[j]``: sum over **all** valid tokens of f_j(x) (``[E, H]``, fp64) and
    ``tokens``: the number of those tokens; their ratio is the characteristic
    activation of HC-SMoE. With ``gated=True`` each output is first multiplied by
    the routing probability p_j(x) (REAM's gated outputs). Needs
    ``moe_calibrate_all_experts=True``.
    """

    name = "mean_output"
    compensated = ("output_sum",)
    needs_all_tokens = True

    def __init__(self, num_experts: int, gated: bool = False):
        super().__init__(num_experts)
        self.gated = gated

    def settings(self) -> dict[str, Any]:
        return {"gated": self.gated}

    def _allocate(self, device, hidden_size):
        return {
            "output_sum": torch.zeros(
                self.num_experts, hidden_size, dtype=torch.float64, device=device
            ),
            "tokens": torch.zeros(self.num_experts, dtype=torch.float64, device=device),
        }

    def update_expert(self, batch: ExpertBatch) -> None:
        if batch.all_outputs is None:
            raise RuntimeError(
                "MeanExpertOutput needs every expert's output on every token: run "
                "oneshot with moe_calibrate_all_experts=True"
            )
        acc = self._tensors  # raw accumulators: no high + low sum per update
        outputs = batch.all_outputs.double()
        if self.gated:
            routing = batch.routing
            gate = routing.probabilities()[routing.valid_tokens(), batch.expert]
            outputs = outputs * gate.double().unsqueeze(-1)
        self._add("output_sum", outputs.sum(dim=0), index=batch.expert)
        acc["tokens"][batch.expert] += outputs.shape[0]

    def mean(self) -> torch.Tensor:
        acc = self.tensors
        return acc["output_sum"] / acc["tokens"].clamp(min=1).unsqueeze(-1)


class RouterLogitGram(Statistic):
    """
    ``gram``: sum over valid tokens of l(x) l(x)^T, the ``[E, E]`` fp64 Gram matrix
    of the router logits, and ``tokens``. The cosine similarity of two experts'
    logit columns over *every* calibration token follows exactly from it, so no
    logit samples need to be kept (the reference keeps all T x E logits).
    """

    name = "logit_gram"
    compensated = ("gram",)

    def _allocate(self, device, hidden_size):
        return {
            "gram": torch.zeros(
                self.num_experts, self.num_experts, dtype=torch.float64, device=device
            ),
            "tokens": torch.zeros((), dtype=torch.float64, device=device),
        }

    def update_routing(self, routing: BatchRouting) -> None:
        super().update_routing(routing)
        logits = routing.logits()[routing.valid_tokens()].double()
        acc = self._tensors
        self._add("gram", logits.T @ logits)
        acc["tokens"] += logits.shape[0]

    def cosine(self) -> torch.Tensor:
        """``[E, E]`` cosine similarity of the experts' logit columns."""
        gram = self.tensors["gram"]
        norms = gram.diagonal().clamp(min=1e-30).sqrt()
        return gram / (norms.unsqueeze(0) * norms.unsqueeze(1))


class ActivationSamples(Statistic):
    """
    ``samples``: neuron activations h_j(x) = act(W_gate x) * (W_up x) of every
    expert on the **same** sampled tokens (``[E, capacity, D]``, in the
    activations' dtype), and ``keys``: the sampled tokens' keys.

    The sample is the ``capacity`` calibration tokens with the smallest content
    keys (:mod:`ream_modifiers.observe.token_keys`, re-mixed with ``seed``): a
    uniform sample of every valid calibration token that does not depend on
    batching, order or how ranks split the data, so a distributed run samples
    exactly the tokens of a single run. Each batch replaces the held tokens whose
    keys its own tokens beat. Memory is ``E * capacity * D * bytes`` whatever the
    number of calibration tokens.
    """

    name = "activations"
    needs_all_tokens = True
    needs_intermediate = True
    needs_token_keys = True

    def __init__(self, num_experts: int, intermediate_size: int, capacity: int, seed=0):
        super().__init__(num_experts)
        self.intermediate_size = intermediate_size
        self.capacity = capacity
        self.seed = seed
        self._slots: torch.Tensor | None = None  # buffer rows this batch writes
        self._positions: torch.Tensor | None = None  # their tokens in the batch
        self._canonical = False

    def settings(self) -> dict[str, Any]:
        return {
            "width": self.intermediate_size,
            "capacity": self.capacity,
            "seed": self.seed,
        }

    def export_state(self) -> dict[str, torch.Tensor]:
        self._canonicalise()  # what decide() reads: the kept rows in key order
        return super().export_state()

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        super().restore_state(state)
        self._canonical = True

    def _buffers(self, tokens: int, dtype, device) -> dict[str, torch.Tensor]:
        shape = (self.num_experts, tokens, self.intermediate_size)
        return {
            # rows are zeroed as tokens take them: with fewer calibration tokens
            # than ``capacity`` the untouched rows never take memory
            "samples": torch.empty(shape, dtype=dtype, device=device),
            "keys": torch.full((tokens,), EMPTY_KEY, dtype=torch.long, device=device),
        }

    def update_routing(self, routing: BatchRouting) -> None:
        hidden = routing.hidden_states
        if self._tensors is None:  # sized here, in the activations' dtype
            self._tensors = self._buffers(self.capacity, hidden.dtype, hidden.device)
        self._canonical = False
        valid = routing.valid_tokens()
        incoming = reseeded(routing.keys()[valid], self.seed)
        held = self.tensors["keys"]
        candidates = torch.cat([held, incoming])
        chosen = torch.topk(candidates, self.capacity, largest=False).indices
        new = chosen[chosen >= self.capacity] - self.capacity
        if new.numel() == 0:
            self._slots = self._positions = None
            return
        stays = torch.zeros(self.capacity, dtype=torch.bool, device=held.device)
        stays[chosen[chosen < self.capacity]] = True
        # as many rows are freed (evicted or still empty) as new tokens enter
        self._slots = (~stays).nonzero().flatten()
        self._positions = valid[new]
        held[self._slots] = incoming[new]
        self.tensors["samples"][:, self._slots] = 0

    def update_intermediate(self, expert, activations, routing) -> None:
        if self._positions is None:
            return
        samples = self.tensors["samples"]
        samples[expert, self._slots] = activations[self._positions].to(samples.dtype)

    def ensure_allocated(self, device, hidden_size) -> None:
        if self._tensors is None:  # a rank that saw no batch contributes nothing
            self._tensors = self._buffers(0, torch.float32, device)

    @property
    def filled(self) -> int:
        """Number of tokens sampled so far."""
        return int((self.tensors["keys"] != EMPTY_KEY).sum())

    def _canonicalise(self) -> None:
        """Keep the sampled rows only, sorted by key: one order for any run."""
        if self._canonical:
            return
        keys, samples = self.tensors["keys"], self.tensors["samples"]
        order = torch.argsort(keys, stable=True)[: self.filled]
        # in place, one expert at a time: no second [E, capacity, D] buffer
        for expert in range(samples.shape[0]):
            samples[expert, : order.numel()] = samples[expert, order]
        self._tensors = {"samples": samples[:, : order.numel()], "keys": keys[order]}
        self._canonical = True

    def reduce_to_source(self, group=None, source: int = 0) -> None:
        """Merge every rank's sample on ``source``: the smallest keys of the union."""
        mine = tuple(tensor.cpu() for tensor in self.sample())
        is_source = (
            dist.get_rank(group) == source
            if group is not None
            else (dist.get_rank() == source)
        )
        gathered = [None] * dist.get_world_size(group) if is_source else None
        dist.gather_object(mine, gathered, dst=source, group=group)
        device = self.tensors["samples"].device
        if not is_source:
            self._tensors = self._buffers(0, self.tensors["samples"].dtype, device)
            return
        keys, samples = self.smallest_keys(gathered, self.capacity)
        self._tensors = {"samples": samples.to(device), "keys": keys.to(device)}

    @staticmethod
    def smallest_keys(
        parts: list[tuple[torch.Tensor, torch.Tensor]], capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Merge ``(keys [S_i], samples [E, S_i, D])`` parts into the ``capacity``
        smallest keys of their union, in key order: what one run over all the
        parts' tokens would have sampled.
        """
        keys = torch.cat([k for k, _ in parts])
        # a rank that saw no batch sends an empty fp32 part: keep the data's dtype
        dtype = max(parts, key=lambda part: part[0].numel())[1].dtype
        samples = torch.cat([s.to(dtype) for _, s in parts], dim=1)
        order = torch.argsort(keys, stable=True)[:capacity]
        return keys[order], samples[:, order]

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [filled], activations [E, filled, D])``, in key order."""
        self._canonicalise()
        return self.tensors["keys"], self.tensors["samples"]

    def result(self) -> torch.Tensor:
        """``[E, filled, D]`` sampled activations, in key order."""
        return self.sample()[1]


class InputSamples(ActivationSamples):
    """
    ``samples``: the MoE block's input x on the same content-keyed token sample as
    :class:`ActivationSamples` with the same ``seed`` (``[1, capacity, H]``, in the
    hidden states' dtype), so a method can replay the layer on calibration tokens.
    Memory is ``capacity * H * bytes``.
    """

    name = "inputs"
    needs_all_tokens = False
    needs_intermediate = False

    def __init__(self, hidden_size: int, capacity: int, seed=0):
        super().__init__(1, hidden_size, capacity, seed)

    def update_routing(self, routing: BatchRouting) -> None:
        super().update_routing(routing)
        if self._positions is not None:
            samples = self.tensors["samples"]
            hidden = routing.hidden_states[self._positions]
            samples[0, self._slots] = hidden.to(samples.dtype)

    def result(self) -> torch.Tensor:
        """``[filled, H]`` sampled MoE inputs, in key order."""
        return super().result()[0]


@dataclass
class LayerStatistics:
    """
    Base of a method's typed statistics for one layer: every field is a
    :class:`Statistic` (or None where a setting turns it off). The method builds
    one per layer in ``statistics()``, the collector feeds its fields, and
    ``decide()`` reads the same fields by attribute, so a statistic a method
    reads but never asked for is an error when the class is written, not after
    a layer has calibrated.
    """

    def collected(self) -> list[Statistic]:
        """The statistics to feed, in field order."""
        found = [getattr(self, f.name) for f in fields(self)]
        return [statistic for statistic in found if statistic is not None]


@dataclass
class RoutedStatistics(LayerStatistics):
    """Per-expert sums over the routed tokens (REAP, DERN and the pruning
    baselines)."""

    routed: RoutedExpertSums
