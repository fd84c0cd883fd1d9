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

__all__ = ["Statistic", "RoutedExpertSums", "MeanExpertOutput"]


class Statistic:
    """
    Base class of a streaming statistic.

    Subclasses declare their accumulators in :meth:`_allocate` and update them in
    :meth:`update_routing` / :meth:`update_expert`. ``reduce_ops`` names the
    ``torch.distributed`` reduction of each accumulator (sum unless listed).
    """

    name: str = ""
    needs_all_tokens: bool = False  # needs expert outputs on every token
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
    activation of HC-SMoE. Needs ``moe_calibrate_all_experts=True``.
    """

    name = "mean_output"
    needs_all_tokens = True

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
        acc["output_sum"][batch.expert] += batch.all_outputs.double().sum(dim=0)
        acc["tokens"][batch.expert] += batch.all_outputs.shape[0]

    def mean(self) -> torch.Tensor:
        acc = self.tensors
        return acc["output_sum"] / acc["tokens"].clamp(min=1).unsqueeze(-1)
