# ruff: noqa: F401
from ream_modifiers.moe.architectures import ARCHITECTURES, MoEArchSpec, get_arch_spec
from ream_modifiers.moe.edit import (
    keep_experts,
    patch_saved_config,
    set_router_rows,
    sync_config,
    write_expert,
)
from ream_modifiers.moe.layer import (
    ExpertWeights,
    MoELayer,
    MoEModelError,
    find_moe_layers,
)
from ream_modifiers.moe.load import load_moe_model
from ream_modifiers.moe.offload import OffloadOptionError, write_parameter
from ream_modifiers.moe.routing import RoutingSpec
