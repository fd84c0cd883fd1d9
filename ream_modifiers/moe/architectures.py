"""
Facts about each MoE family, as data keyed by ``model_type``.

Everything that differs between Qwen, Mixtral, DeepSeek, GLM, ... lives in
:data:`ARCHITECTURES`. The rest of the package reads an :class:`MoEArchSpec` and
never branches on a model name. Unknown model types fall back to
:func:`detect_spec`, which inspects the config and warns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from loguru import logger
from transformers import PretrainedConfig

__all__ = [
    "ARCHITECTURES",
    "MoEArchSpec",
    "get_arch_spec",
    "detect_spec",
    "text_config",
]

Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2_sum", "max"]
BiasLocation = Literal["router", "block"]

# Quantization must never touch these; each row adds its own router names.
_BASE_IGNORE = ("lm_head",)


@dataclass(frozen=True)
class MoEArchSpec:
    """
    One MoE family's layout and routing rules.

    :param model_type: ``config.model_type`` of the family
    :param num_experts_keys: every config key that stores the routed expert count;
        all of them are rewritten after a structural change (the first one is the
        key the family's config class reads)
    :param top_k_key: config key of the number of experts per token
    :param router_attr: attribute path (dotted) from the MoE block to the module
        holding the router ``weight`` (``gate``, Hunyuan's ``gate.wg``)
    :param experts_attr: attribute of the MoE block holding the routed experts
    :param scoring: ``softmax`` over all experts or independent ``sigmoid`` scores
    :param renormalize: whether the top-k weights are renormalised, when the family
        has no config switch for it
    :param renormalize_key: config key that switches renormalisation, if any
    :param n_group_key: config key of the number of expert groups, if routing is
        group-limited
    :param topk_group_key: config key of the number of groups each token may use
    :param grouped_when: ``(config key, value)`` that must hold for group-limited
        routing to apply (DeepSeek-V2 groups only with
        ``topk_method: group_limited_greedy``)
    :param group_score: how a group is scored for group-limited selection
    :param scaling_factor_key: config key of the factor applied to routed weights
    :param bias_attr: attribute path (dotted) of the selection-only
        score-correction bias, from its owner (ERNIE's
        ``moe_statics.e_score_correction_bias``)
    :param bias_location: whether that bias hangs off the router module (the
        block's ``gate``, the parent of a dotted ``router_attr``) or the block
    :param hub_bias_path: path of that bias from the MoE block in hub checkpoints,
        when it differs from the in-memory one (ERNIE stores
        ``moe_statics.e_score_correction_bias`` on the block)
    :param bias_leading_dims: dimensions of that bias before the expert dimension
        (ERNIE's is ``[1, E]``)
    :param bias_required_when: ``(config key, value)`` under which vLLM creates
        and loads that bias (DeepSeek-V3 only for ``topk_method: noaux_tc``);
        None if vLLM always does, for a family that has one
    :param shared_expert_attrs: block attributes holding shared experts (never
        touched by any method here)
    :param shared_expert_gate_attr: block attribute of the shared expert's gate
    :param quantization_ignore: default ``ignore`` patterns for quantization
        modifiers: lm_head, routers and shared-expert gates
    :param linear_save_renames: ``(on-disk regex, in-memory replacement)`` pairs
        that map the hub's per-expert tensor names to the linearized module names,
        for families whose hub names differ and llm-compressor has no mapping
        (Mixtral's ``block_sparse_moe.experts.{i}.w1/w2/w3``)
    :param hub_block_attr: name of the MoE block in hub checkpoints, when it
        differs from the in-memory ``mlp`` (Mixtral's ``block_sparse_moe``)
    :param hub_projections: hub names of the gate, up and down projections of
        one expert (``experts.{i}.<name>``)
    :param fused_experts: names (under ``experts_attr``) of the tensors that
        hold all experts of a layer, expert index first, in the family's hub
        layout (gpt-oss); empty where the hub stores one tensor per expert and
        projection. An unquantized result is saved in this layout; a quantized
        one keeps compressed-tensors' per-expert tensors
    :param packed_expert_names: for a family whose vLLM loader reads quantized
        experts only under fused per-expert names, their (gate/up, down) prefixes:
        gpt-oss's ``experts.{i}.w13_weight_packed`` (gate and up rows interleaved)
        and ``experts.{i}.w2_weight_packed``
        (:mod:`ream_modifiers.moe.packed_names`); None where vLLM reads
        compressed-tensors' per-projection names
    :param intermediate_size_key: config key of one routed expert's width, which
        vLLM sizes every expert tensor from
    :param router_quantizable_in_vllm: whether vLLM builds the router as a
        linear layer that a quantization config can target (Qwen3-MoE's gate,
        Hunyuan's ``gate.wg``); elsewhere it is always unquantized
    """

    model_type: str
    num_experts_keys: tuple[str, ...]
    top_k_key: str = "num_experts_per_tok"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    scoring: Scoring = "softmax"
    renormalize: bool = True
    renormalize_key: str | None = None
    n_group_key: str | None = None
    topk_group_key: str | None = None
    grouped_when: tuple[str, str] | None = None
    group_score: GroupScore = "top2_sum"
    scaling_factor_key: str | None = None
    bias_attr: str | None = None
    bias_location: BiasLocation | None = None
    hub_bias_path: str | None = None
    bias_leading_dims: tuple[int, ...] = ()
    bias_required_when: tuple[str, Any] | None = None
    shared_expert_attrs: tuple[str, ...] = ()
    shared_expert_gate_attr: str | None = None
    quantization_ignore: tuple[str, ...] = field(default=_BASE_IGNORE)
    linear_save_renames: tuple[tuple[str, str], ...] = ()
    hub_block_attr: str | None = None
    hub_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_experts: tuple[str, ...] = ()
    packed_expert_names: tuple[str, str] | None = None
    intermediate_size_key: str = "moe_intermediate_size"
    router_quantizable_in_vllm: bool = False

    @property
    def num_experts_key(self) -> str:
        return self.num_experts_keys[0]

    @property
    def fused_on_disk(self) -> bool:
        """Whether hub checkpoints store the experts fused (:attr:`fused_experts`)."""
        return bool(self.fused_experts)

    @property
    def router_owner_attr(self) -> str:
        """Attribute path of the module that owns a ``router``-located bias."""
        return self.router_attr.split(".")[0]

    @property
    def bias_path(self) -> str | None:
        """Path of the score-correction bias from the MoE block, in memory."""
        if self.bias_attr is None:
            return None
        if self.bias_location == "block":
            return self.bias_attr
        return f"{self.router_owner_attr}.{self.bias_attr}"

    @property
    def hub_bias(self) -> str | None:
        """Path of the score-correction bias from the MoE block, on disk."""
        return self.hub_bias_path or self.bias_path

    def bias_required(self, get: Callable[[str], Any]) -> bool:
        """
        Whether vLLM creates (and so must load) the score-correction bias.

        :param get: config lookup, ``dict.get`` of config.json or a config's
            ``getattr``
        """
        if self.bias_attr is None:
            return False
        if self.bias_required_when is None:
            return True
        key, value = self.bias_required_when
        return get(key) == value

    def groups(
        self, get: Callable[[str], Any], as_vllm: bool = False
    ) -> tuple[int | None, int | None]:
        """
        ``(n_group, topk_group)`` of group-limited routing, or ``(None, None)``
        when the router does not restrict tokens to groups (no group keys, a
        single group, or :attr:`grouped_when` does not hold).

        :param get: config lookup, ``dict.get`` of config.json or a config's
            ``getattr``
        :param as_vllm: as vLLM routes, which groups whenever ``n_group > 1``
            and ignores :attr:`grouped_when` (``models/deepseek_v2.py`` passes
            ``use_grouped_topk=True`` with the config's ``n_group``)
        """
        n_group = get(self.n_group_key) if self.n_group_key else None
        topk_group = get(self.topk_group_key) if self.topk_group_key else None
        if self.grouped_when is not None and not as_vllm:
            key, value = self.grouped_when
            if get(key) != value:
                return None, None
        if not isinstance(n_group, int) or n_group <= 1:
            return None, None
        return n_group, topk_group


def _ignore(*patterns: str) -> tuple[str, ...]:
    return _BASE_IGNORE + patterns


_QWEN_IGNORE = _ignore("re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$")
_GATE_IGNORE = _ignore("re:.*mlp.gate$")

_W123 = ("w1", "w3", "w2")
_W123_RENAMES = (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
    (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
)

_ROWS = [
    MoEArchSpec(
        model_type="qwen3_moe",
        # transformers 5 serialises `num_local_experts`; vLLM and older readers
        # look for `num_experts`, so both are written
        num_experts_keys=("num_experts", "num_local_experts"),
        renormalize_key="norm_topk_prob",
        quantization_ignore=_QWEN_IGNORE,
        # vLLM's qwen3_moe.py builds the gate with the quant_config
        router_quantizable_in_vllm=True,
    ),
    MoEArchSpec(
        model_type="qwen2_moe",
        num_experts_keys=("num_experts",),
        renormalize_key="norm_topk_prob",
        shared_expert_attrs=("shared_expert",),
        shared_expert_gate_attr="shared_expert_gate",
        quantization_ignore=_QWEN_IGNORE,
    ),
    MoEArchSpec(
        model_type="mixtral",
        num_experts_keys=("num_local_experts",),
        intermediate_size_key="intermediate_size",
        quantization_ignore=_ignore("re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"),
        linear_save_renames=_W123_RENAMES,
        hub_block_attr="block_sparse_moe",
        hub_projections=_W123,
    ),
    MoEArchSpec(
        model_type="olmoe",
        num_experts_keys=("num_experts",),
        intermediate_size_key="intermediate_size",
        renormalize_key="norm_topk_prob",
        quantization_ignore=_GATE_IGNORE,
    ),
    MoEArchSpec(
        model_type="deepseek_v2",
        num_experts_keys=("n_routed_experts",),
        renormalize=False,
        n_group_key="n_group",
        topk_group_key="topk_group",
        grouped_when=("topk_method", "group_limited_greedy"),
        group_score="max",
        scaling_factor_key="routed_scaling_factor",
        shared_expert_attrs=("shared_experts",),
        quantization_ignore=_GATE_IGNORE,
    ),
    MoEArchSpec(
        model_type="deepseek_v3",
        num_experts_keys=("n_routed_experts",),
        scoring="sigmoid",
        renormalize_key="norm_topk_prob",
        n_group_key="n_group",
        topk_group_key="topk_group",
        scaling_factor_key="routed_scaling_factor",
        bias_attr="e_score_correction_bias",
        bias_location="router",
        # vLLM's deepseek_v2.py creates the bias only for noaux_tc
        bias_required_when=("topk_method", "noaux_tc"),
        shared_expert_attrs=("shared_experts",),
        quantization_ignore=_GATE_IGNORE,
    ),
    MoEArchSpec(
        model_type="ernie4_5_moe",
        # serialised as `moe_num_experts`; `num_experts` is the class alias
        num_experts_keys=("moe_num_experts",),
        top_k_key="moe_k",
        # softmax scores + bias choose; weights are renormalised (clamped sum)
        bias_attr="moe_statics.e_score_correction_bias",
        bias_location="router",
        # the hub (and transformers' save) keeps `moe_statics` on the block
        hub_bias_path="moe_statics.e_score_correction_bias",
        bias_leading_dims=(1,),
        shared_expert_attrs=("shared_experts",),
        quantization_ignore=_GATE_IGNORE,
    ),
    MoEArchSpec(
        model_type="minimax_m2",
        num_experts_keys=("num_local_experts",),
        intermediate_size_key="intermediate_size",
        scoring="sigmoid",
        bias_attr="e_score_correction_bias",
        bias_location="block",
        bias_required_when=("use_routing_bias", True),
        quantization_ignore=_ignore("re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"),
        linear_save_renames=_W123_RENAMES,
        hub_block_attr="block_sparse_moe",
        hub_projections=_W123,
    ),
    MoEArchSpec(
        model_type="hunyuan_v1_moe",
        num_experts_keys=("num_experts",),
        top_k_key="moe_topk",
        # the router weight lives in an nn.Linear that GPTQ would quantize
        router_attr="gate.wg",
        # vLLM's Transformers backend swaps gate.wg for a quantizable linear
        router_quantizable_in_vllm=True,
        shared_expert_attrs=("shared_mlp",),
        quantization_ignore=_ignore("re:.*mlp.gate$", "re:.*mlp.gate.wg$"),
    ),
    MoEArchSpec(
        model_type="gpt_oss",
        num_experts_keys=("num_local_experts",),
        intermediate_size_key="intermediate_size",
        # top-k on biased logits, softmax over the k = renormalised softmax
        router_attr="router",
        quantization_ignore=_ignore("re:.*mlp.router$"),
        # hub layout, which vLLM loads unquantized: transposed, gate/up
        # interleaved along the last dim, with biases
        fused_experts=(
            "gate_up_proj",
            "gate_up_proj_bias",
            "down_proj",
            "down_proj_bias",
        ),
        # vLLM's models/gpt_oss.py _GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD
        packed_expert_names=("w13", "w2"),
    ),
]

ARCHITECTURES: dict[str, MoEArchSpec] = {row.model_type: row for row in _ROWS}
# Same layout and routing as an existing row under another name, with the
# fields that differ.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_next": ("qwen2_moe", {}),
    # vLLM's glm4_moe.py always creates the correction bias
    "glm4_moe": ("deepseek_v3", {"bias_required_when": None}),
    # vLLM 0.32 serves dots1 through its Transformers backend, whose router
    # always has the correction bias (transformers' modeling_dots1.py)
    "dots1": ("deepseek_v3", {"bias_required_when": None}),
    "kimi_k2": ("deepseek_v3", {}),
}
for _alias, (_row, _fields) in _ALIASES.items():
    ARCHITECTURES[_alias] = replace(ARCHITECTURES[_row], model_type=_alias, **_fields)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config that carries the MoE keys (the text config of VL wrappers)."""
    return getattr(config, "text_config", None) or config


def get_arch_spec(config: PretrainedConfig) -> MoEArchSpec:
    """
    Look up the family of ``config``; unknown families are detected from the config
    keys, with a warning.

    :param config: the model's config (a VL wrapper's text config is used)
    """
    config = text_config(config)
    spec = ARCHITECTURES.get(config.model_type)
    if spec is not None:
        return spec
    return detect_spec(config)


_COUNT_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
)
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")


def detect_spec(config: PretrainedConfig) -> MoEArchSpec:
    """
    Build a spec for a family missing from :data:`ARCHITECTURES` by probing the
    config for the usual keys. Layout is assumed to follow the common
    ``mlp.gate`` / ``mlp.experts`` convention.

    :raises ValueError: if the config names no expert count or top-k
    """
    config = text_config(config)
    count_keys = tuple(k for k in _COUNT_KEYS if isinstance(_raw(config, k), int))
    top_k_key = next((k for k in _TOP_K_KEYS if isinstance(_raw(config, k), int)), None)
    if not count_keys or top_k_key is None:
        raise ValueError(
            f"Model type {config.model_type!r} is not an MoE model this package "
            f"understands: its config has no expert count ({', '.join(_COUNT_KEYS)}) "
            f"or no top-k ({', '.join(_TOP_K_KEYS)}). If it is an MoE model, add a "
            "row for it to ream_modifiers.moe.architectures.ARCHITECTURES."
        )
    has_groups = isinstance(_raw(config, "n_group"), int)
    sigmoid = getattr(config, "scoring_func", "softmax") == "sigmoid"
    spec = MoEArchSpec(
        model_type=config.model_type,
        num_experts_keys=count_keys,
        top_k_key=top_k_key,
        scoring="sigmoid" if sigmoid else "softmax",
        renormalize_key="norm_topk_prob" if hasattr(config, "norm_topk_prob") else None,
        n_group_key="n_group" if has_groups else None,
        topk_group_key="topk_group" if has_groups else None,
        scaling_factor_key=(
            "routed_scaling_factor"
            if hasattr(config, "routed_scaling_factor")
            else None
        ),
        bias_attr="e_score_correction_bias",
        bias_location="router",
        bias_required_when=("topk_method", "noaux_tc"),
        shared_expert_attrs=("shared_expert", "shared_experts"),
        shared_expert_gate_attr="shared_expert_gate",
        quantization_ignore=_QWEN_IGNORE,
        # unknown family: assume vLLM may quantize the router (the safe side)
        router_quantizable_in_vllm=True,
    )
    logger.warning(
        f"No architecture row for model_type={config.model_type!r}; detected "
        f"expert count key(s) {count_keys}, top-k key {top_k_key!r}, "
        f"scoring={spec.scoring}. Check the result, and consider adding a row to "
        "ream_modifiers.moe.architectures.ARCHITECTURES."
    )
    return spec


def _raw(config: PretrainedConfig, key: str):
    """A config value that is really set (attribute aliases resolve too)."""
    try:
        return getattr(config, key)
    except AttributeError:
        return None
