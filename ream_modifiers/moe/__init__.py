"""
Model access: the architecture table, MoE layers, structural edits, loading and
offloading. Names load on first use (PEP 562), so that the light modules here
(the architecture table, the stacked-weights type) can be imported without the
ones that import llm-compressor.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ARCHITECTURES": "architectures",
    "MoEArchSpec": "architectures",
    "get_arch_spec": "architectures",
    "keep_experts": "edit",
    "patch_saved_config": "saved_config",
    "write_row_config_keys": "saved_config",
    "set_router_rows": "edit",
    "sync_config": "edit",
    "write_expert": "edit",
    "MoELayer": "layer",
    "MoEModelError": "layer",
    "find_moe_layers": "layer",
    "load_moe_model": "load",
    "OffloadOptionError": "offload",
    "write_parameter": "offload",
    "RoutingSpec": "routing",
    "ExpertWeights": "weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
