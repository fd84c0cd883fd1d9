"""
``ream-compress check``: verify that a saved MoE checkpoint has what vLLM needs.

Only ``config.json`` and the safetensors headers (and index) are read, never the
weights, so checking a trillion-parameter checkpoint takes seconds. The rules:

- every MoE layer stores the same number of experts, N, as indices ``0..N-1``,
  each with the same complete set of per-expert tensors (names from the
  architecture table, hub renames such as Mixtral's ``w1/w2/w3`` included), or,
  for a family whose hub layout is fused (``MoEArchSpec.fused_experts``, gpt-oss)
  and unquantized experts, exactly those fused tensors with N experts first;
- router rows, router bias and score-correction bias have N entries (the bias
  found where the row puts it on disk), and the bias is present where vLLM
  creates one (``MoEArchSpec.bias_required``);
- ``N % n_group == 0`` and top-k is reachable (``top_k <= N`` and, when the
  router uses groups (``MoEArchSpec.groups``), ``top_k <= topk_group * N /
  n_group``);
- every config key of the family that stores the expert count equals N;
- routers are stored unquantized and covered by ``quantization_config.ignore``;
- the compressed-tensors ``quantization_config`` matches the tensors present.
"""

from ream_modifiers.check.checkpoint import check_checkpoint
from ream_modifiers.check.layout import INDEX_FILENAME
from ream_modifiers.check.report import CheckpointCheckError, CheckReport, Violation

__all__ = [
    "INDEX_FILENAME",
    "CheckReport",
    "CheckpointCheckError",
    "Violation",
    "check_checkpoint",
]
