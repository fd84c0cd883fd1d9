"""
The stacked weights of a layer's experts: what the pure tensor math
(:mod:`ream_modifiers.engines` and the methods' own math) reads and returns. It
imports torch only, so that math never imports llm-compressor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertWeights"]


@dataclass
class ExpertWeights:
    """
    Stacked weights of a layer's routed experts.

    ``gate`` and ``up`` are ``[E, I, H]``; ``down`` is ``[E, H, I]`` (the
    ``nn.Linear`` layout). Biases are ``None`` unless the family has them.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def matrices(self) -> list[torch.Tensor]:
        return [w for w in (self.gate, self.up, self.down) if w is not None]
