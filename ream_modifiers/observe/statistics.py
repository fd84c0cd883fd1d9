"""
Streaming per-expert statistics fed by :class:`LayerStatsCollector`.

Each statistic holds running fp64 sums (or maxima) on the layer's execution device
and exposes them as named tensors, so that a distributed run can reduce them and
a method can read them without knowing how they were gathered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import distributed as dist

if TYPE_CHECKING:
    from ream_modifiers.observe.collector import BatchRouting, ExpertBatch

__all__ = [
    "Statistic",
    "RoutedExpertSums",
    "MeanExpertOutput",
    "RouterLogitGram",
    "ActivationSamples",
]


class Statistic:
    """
    Base class of a streaming statistic.

    Subclasses declare their accumulators in :meth:`_allocate` and update them in
    :meth:`update_routing` / :meth:`update_expert`. ``reduce_ops`` names the
    ``torch.distributed`` reduction of each accumulator (sum unless listed).
    """

    name: str = ""
    needs_all_tokens: bool = False  # needs expert outputs on every token
    needs_intermediate: bool = False  # needs neuron activations (down_proj input)
    reduce_ops: dict[str, str] = {}

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._tensors: dict[str, torch.Tensor] | None = None

    def _allocate(
        self, device: torch.device, hidden_size: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _ensure(
        self, device: torch.device, hidden_size: int
    ) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._allocate(device, hidden_size)
        return self._tensors

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
        if self._tensors is None:
            raise RuntimeError(f"statistic {self.name!r} has seen no batch")
        return self._tensors

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Reduce every accumulator across ranks (through CPU, for gloo groups)."""
        if self._tensors is None:
            raise RuntimeError(
                f"statistic {self.name!r} has no accumulators to reduce; call "
                "ensure_allocated() on ranks that saw no batch"
            )
        for key in sorted(self._tensors):
            tensor = self._tensors[key]
            op = (
                dist.ReduceOp.MAX
                if self.reduce_ops.get(key) == "max"
                else dist.ReduceOp.SUM
            )
            host = tensor.cpu()
            dist.all_reduce(host, op=op, group=group)
            self._tensors[key] = host.to(tensor.device)

    def ensure_allocated(self, device: torch.device, hidden_size: int) -> None:
        self._ensure(device, hidden_size)


class RoutedExpertSums(Statistic):
    """
    Per expert, over the tokens routed to it (padding excluded):

    - ``count``: number of routed tokens
    - ``weighted_norm``: sum of g_j(x)·‖f_j(x)‖₂ (REAP numerator)
    - ``norm``: sum of ‖f_j(x)‖₂ (EAN)
    - ``weight``: sum of g_j(x)
    - ``max_activation``: largest |f_j(x)| element (super-expert detection)

    g_j is the weight the model multiplies expert j's output by.
    """

    name = "routed"
    reduce_ops = {"max_activation": "max"}
    _SUMS = ("count", "weighted_norm", "norm", "weight")

    def _allocate(self, device, hidden_size):
        zeros = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        # one batch's per-expert values, folded into the sums in end_batch():
        # one small write per expert instead of one per accumulator
        self._batch = torch.zeros(
            5, self.num_experts, dtype=torch.float64, device=device
        )
        return {key: zeros.clone() for key in (*self._SUMS, "max_activation")}

    def update_expert(self, batch: ExpertBatch) -> None:
        if batch.token_index.numel() == 0:
            return
        norms = torch.linalg.vector_norm(batch.outputs, dim=-1, dtype=torch.float32)
        norms = norms.double()
        weights = batch.weights.double()
        self._batch[:, batch.expert] = torch.stack(
            [
                # a fill kernel, not a host-to-device copy
                torch.full((), norms.numel(), dtype=torch.float64, device=norms.device),
                (weights * norms).sum(),
                norms.sum(),
                weights.sum(),
                batch.outputs.abs().amax().double(),
            ]
        )

    def end_batch(self) -> None:
        acc = self.tensors
        for row, key in enumerate(self._SUMS):
            acc[key] += self._batch[row]
        torch.maximum(acc["max_activation"], self._batch[4], out=acc["max_activation"])
        self._batch.zero_()


class MeanExpertOutput(Statistic):
    """
    ``output_sum[j]``: sum over **all** valid tokens of f_j(x) (``[E, H]``, fp64) and
    ``tokens``: the number of those tokens; their ratio is the characteristic
    activation of HC-SMoE. With ``gated=True`` each output is first multiplied by
    the routing probability p_j(x) (REAM's gated outputs). Needs
    ``moe_calibrate_all_experts=True``.
    """

    name = "mean_output"
    needs_all_tokens = True

    def __init__(self, num_experts: int, gated: bool = False):
        super().__init__(num_experts)
        self.gated = gated

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
        acc = self.tensors
        outputs = batch.all_outputs.double()
        if self.gated:
            routing = batch.routing
            gate = routing.probabilities()[routing.valid_tokens(), batch.expert]
            outputs = outputs * gate.double().unsqueeze(-1)
        acc["output_sum"][batch.expert] += outputs.sum(dim=0)
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
        acc = self.tensors
        acc["gram"] += logits.T @ logits
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
    activations' dtype), and ``filled``, the number of tokens sampled so far.

    Each batch contributes up to ``ceil(capacity / num_batches)`` valid tokens,
    drawn with a generator seeded by ``(seed, batch index)``, so the sample is
    deterministic and spread over the whole calibration set. Memory is
    ``E * capacity * D * bytes`` whatever the number of calibration tokens.
    """

    name = "activations"
    needs_all_tokens = True
    needs_intermediate = True

    def __init__(self, num_experts: int, intermediate_size: int, capacity: int, seed=0):
        super().__init__(num_experts)
        self.intermediate_size = intermediate_size
        self.capacity = capacity
        self.seed = seed
        self.filled = 0
        self._positions: torch.Tensor | None = None
        self._start = 0

    def _samples(self, tokens: int, dtype, device) -> dict[str, torch.Tensor]:
        shape = (self.num_experts, tokens, self.intermediate_size)
        return {"samples": torch.zeros(shape, dtype=dtype, device=device)}

    def update_routing(self, routing: BatchRouting) -> None:
        hidden = routing.hidden_states
        if self._tensors is None:  # sized here, in the activations' dtype
            self._tensors = self._samples(self.capacity, hidden.dtype, hidden.device)
        valid = routing.valid_tokens()
        quota = -(-self.capacity // max(routing.num_batches, 1))
        take = min(quota, self.capacity - self.filled, valid.numel())
        self._start = self.filled
        if take <= 0:
            self._positions = None
            return
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + routing.batch_index
        )
        pick = torch.randperm(valid.numel(), generator=generator)[:take]
        self._positions = valid[pick.to(valid.device)]
        self.filled += take

    def update_intermediate(self, expert, activations, routing) -> None:
        if self._positions is None:
            return
        rows = activations[self._positions]
        end = self._start + rows.shape[0]
        self.tensors["samples"][expert, self._start : end] = rows.to(
            self.tensors["samples"].dtype
        )

    def ensure_allocated(self, device, hidden_size) -> None:
        if self._tensors is None:  # a rank that saw no batch contributes nothing
            self._tensors = self._samples(0, torch.float32, device)

    def all_reduce(self, group=None) -> None:
        """Concatenate every rank's samples (up to ``capacity``)."""
        from torch import distributed as dist

        mine = self.tensors["samples"][:, : self.filled].float().cpu()
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        joined = torch.cat(gathered, dim=1)[:, : self.capacity]
        device = self.tensors["samples"].device
        self._tensors["samples"] = joined.to(device)
        self.filled = joined.shape[1]

    def result(self) -> torch.Tensor:
        """``[E, filled, D]`` sampled activations."""
        return self.tensors["samples"][:, : self.filled]
