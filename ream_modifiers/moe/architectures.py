"""
Facts about each MoE family, as data keyed by ``model_type``.

Everything that differs between Qwen, Mixtral, DeepSeek, GLM, ... lives in
:data:`ARCHITECTURES`. The rest of the package reads an :class:`MoEArchSpec` and
never branches on a model name. Unknown model types fall back to
:func:`detect_spec`, which inspects the config and warns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import yaml
from loguru import logger

if TYPE_CHECKING:  # the checker imports this table without transformers
    from transformers import PretrainedConfig

__all__ = [
    "ARCHITECTURES",
    "LOADED_AS",
    "PACKED_PARAMS",
    "MoEArchSpec",
    "UNSUPPORTED_FAMILIES",
    "UnsupportedFamily",
    "UnsupportedFamilyError",
    "get_arch_spec",
    "detect_spec",
    "text_config",
    "text_config_entry",
]

# what vLLM's loader reads per quantized expert of a family with
# ``packed_expert_names`` (the gate/up pair interleaved row by row, down renamed);
# anything else cannot be served
PACKED_PARAMS = ("weight_packed", "weight_scale", "bias")

Scoring = Literal["softmax", "sigmoid", "sparsemixer"]
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
    :param scoring: ``softmax`` over all experts, independent ``sigmoid`` scores,
        or PhiMoE's ``sparsemixer`` (each of the top-k picked in turn by logit,
        weighted by a softmax over the logits within a relative margin of it)
    :param scoring_key: config key whose value (``softmax`` or ``sigmoid``) selects
        the scoring per checkpoint, overriding ``scoring`` (Cohere2-MoE's
        ``expert_selection_fn``)
    :param topk_before_scoring: the router takes the top-k of the raw logits and
        scores only those: a softmax over k logits is the renormalised softmax
        (whatever ``renormalize_key`` says); sigmoid is unaffected (monotonic)
    :param sparsemixer_eps_key: config key of sparsemixer's margin (half the
        relative logit gap it keeps, PhiMoE's ``router_jitter_noise``)
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
    :param keep_load_converters: whether saving keeps the ``WeightConverter``
        entries of transformers' own conversion mapping for the family (less
        those into the fused experts) beside ``linear_save_renames``: for
        families whose load also splits or concatenates other tensors
        (Kimi-Linear's q/k/v conv1d, Kimi-K2.5's vision wqkv), which a save must
        reverse. transformers' renames are not kept: their reverses are
        unanchored (Kimi-Linear's ``.mlp.`` -> ``.block_sparse_moe.`` would also
        rename the dense layers' MLP), so such a row lists its renames itself
    :param hub_block_attr: name of the MoE block in hub checkpoints, when it
        differs from the in-memory ``mlp`` (Mixtral's ``block_sparse_moe``)
    :param hub_projections: hub names of the gate, up and down projections of
        one expert (``experts.{i}.<name>``)
    :param fused_experts: names (under ``experts_attr``) of the tensors that
        hold all experts of a layer, expert index first, in the family's hub
        layout (gpt-oss); empty where the hub stores one tensor per expert and
        projection. An unquantized result is saved in this layout; a quantized
        one keeps compressed-tensors' per-expert tensors
    :param hub_fused_experts: for a family whose hub checkpoints store all
        experts of a layer in a few tensors that vLLM reads, while results are
        saved per expert (which vLLM reads too): those tensors' names after the
        block as stored (Granite-MoE's ``input_linear.weight``, Qwen3-VL-MoE's
        ``experts.gate_up_proj``). The checker accepts either layout
    :param mtp_layers_key: config key of the number of MTP layers stored after
        the trunk as ``model.layers.{num_hidden_layers + i}`` (DeepSeek-V3's
        ``num_nextn_predict_layers``), which :mod:`ream_modifiers.moe.mtp`
        carries into the output; None where the family has none
    :param mtp_module: prefix of a separate MTP module holding
        ``{mtp_module}.layers.{i}`` (Qwen3-Next's ``mtp``), carried the same way
        and found from the stored names (the config has no key for it)
    :param packed_expert_names: for a family whose vLLM loader reads quantized
        experts only under fused per-expert names, their (gate/up, down) prefixes:
        gpt-oss's ``experts.{i}.w13_weight_packed`` (gate and up rows interleaved)
        and ``experts.{i}.w2_weight_packed``
        (:mod:`ream_modifiers.moe.packed_names`); None where vLLM reads
        compressed-tensors' per-projection names
    :param intermediate_size_key: config key of one routed expert's width, which
        vLLM sizes every expert tensor from
    :param per_expert_load: whether transformers needs per-expert converters to
        load what is saved here (``<block>.experts.{i}.gate_proj.weight``, which
        vLLM reads): its own mapping for the family only renames or transposes
        the hub's fused tensors (Granite-MoE's ``input_linear``, Qwen3-VL-MoE).
        ``load_moe_model`` adds them while loading
        (:func:`ream_modifiers.moe.conversions.per_expert_checkpoints`)
    :param hub_architectures: the config's ``architectures`` as hub checkpoints
        name them, when transformers' class name differs and vLLM's registry
        knows only the hub's (PhiMoE's ``PhiMoEForCausalLM``; transformers saves
        ``PhimoeForCausalLM``, which vLLM would serve through its slower
        Transformers backend). Written back on every save
    :param reload_ignore: ``quantization_config.ignore`` entries added to a
        saved quantized checkpoint for transformers: compressed-tensors writes
        the ignore list under hub names, while transformers matches it against
        its own (renamed) modules on reload, so a router that is an
        ``nn.Linear`` under another name there would be rebuilt quantized
        (PhiMoE's ``mlp.router``, stored as ``block_sparse_moe.gate``)
    :param input_weighted: the router scales each expert's input rather than its
        output (Llama-4: ``f_e(s x)``, vLLM's ``apply_router_weight_on_input``);
        the block is adapted to the standard experts interface
        (:mod:`ream_modifiers.moe.input_weighted`) and statistics read an
        expert's output as ``f_e(s x) / s``
    :param fused_gate_up_interleaved: for a family with :attr:`fused_experts`,
        whether gate and up alternate along the fused tensor's last dim
        (gpt-oss) rather than gate filling its first half (Llama-4)
    :param router_quantizable_in_vllm: whether vLLM builds the router as a
        linear layer that a quantization config can target (Qwen3-MoE's gate,
        Hunyuan's ``gate.wg``); elsewhere it is always unquantized
    :param moe_scope: name prefix of the MoE blocks this row describes, where
        the checkpoint holds other MoE blocks that are left as they are
        (Qwen3-Omni's ``thinker.``: its talker has its own MoE, with its own
        routing and expert count, which vLLM does not serve); None for all
    :param saved_renames: ``(regex, replacement)`` pairs applied to the stored
        tensor names after a save (:mod:`ream_modifiers.moe.saved_names`), where
        transformers writes a name the hub and vLLM do not use and its save
        conversions cannot give it back (ERNIE-4.5-VL's ``model.vision_model.``
        -> ``vision_model.``); transformers loads both
    :param expert_sets: attributes, under each MoE layer's block, of sparse
        blocks that are expert sets sharing one count (ERNIE-4.5-VL's
        ``text_moe`` and ``vision_moe``, of different widths); every set is an
        MoE layer here, reduced to the same count, and a set that no
        calibration token reaches is pruned by AIMER's weight-only score
        (:mod:`ream_modifiers.moe.expert_sets`); empty elsewhere
    :param forward_module: attribute of a submodule whose ``forward`` is the
        model's for calibration and evaluation, where the whole model has none
        (Qwen3-Omni's ``thinker``: the whole model only generates speech)
    """

    model_type: str
    num_experts_keys: tuple[str, ...]
    top_k_key: str = "num_experts_per_tok"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    scoring: Scoring = "softmax"
    scoring_key: str | None = None
    topk_before_scoring: bool = False
    sparsemixer_eps_key: str | None = None
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
    keep_load_converters: bool = False
    hub_block_attr: str | None = None
    hub_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_experts: tuple[str, ...] = ()
    hub_fused_experts: tuple[str, ...] = ()
    mtp_layers_key: str | None = None
    mtp_module: str | None = None
    packed_expert_names: tuple[str, str] | None = None
    intermediate_size_key: str = "moe_intermediate_size"
    router_quantizable_in_vllm: bool = False
    input_weighted: bool = False
    fused_gate_up_interleaved: bool = False
    per_expert_load: bool = False
    hub_architectures: tuple[str, ...] = ()
    reload_ignore: tuple[str, ...] = ()
    moe_scope: str | None = None
    expert_sets: tuple[str, ...] = ()
    saved_renames: tuple[tuple[str, str], ...] = ()
    forward_module: str | None = None

    @property
    def sets_per_layer(self) -> int:
        """Expert sets stored in one list per MoE layer (ERNIE-4.5-VL: 2)."""
        return max(1, len(self.expert_sets))

    def saved_name(self, name: str) -> str:
        """A stored tensor's (or module's) name after :attr:`saved_renames`."""
        for pattern, replacement in self.saved_renames:
            name = re.sub(pattern, replacement, name)
        return name

    def in_scope(self, name: str) -> bool:
        """Whether the module or tensor ``name`` lies in :attr:`moe_scope`."""
        return self.moe_scope is None or name.startswith(self.moe_scope)

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

    def memory_name(self, disk_name: str) -> str:
        """The in-memory (linearized) name of a tensor stored under a hub name."""
        for disk, memory in self.linear_save_renames:
            disk_name = re.sub(disk, memory, disk_name)
        return disk_name

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


def _as_tuples(value: Any) -> Any:
    """YAML lists as the tuples the frozen spec holds (hashable, immutable)."""
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


def _load_table() -> tuple[dict[str, MoEArchSpec], dict[str, str]]:
    """The rows of ``architectures.yaml``, and its ``loaded_as`` model types."""
    text = resources.files(__package__).joinpath(TABLE_FILENAME).read_text()
    table: dict[str, MoEArchSpec] = {}
    loaded_as: dict[str, str] = {}
    for model_type, row in yaml.safe_load(text).items():
        fields = {key: _as_tuples(value) for key, value in row.items()}
        same_as = fields.pop("same_as", None)
        if "loaded_as" in fields:
            loaded_as[model_type] = fields.pop("loaded_as")
        if "quantization_ignore" in fields:
            fields["quantization_ignore"] = _BASE_IGNORE + fields["quantization_ignore"]
        if same_as is None:
            table[model_type] = MoEArchSpec(model_type=model_type, **fields)
        else:
            table[model_type] = replace(table[same_as], model_type=model_type, **fields)
    return table, loaded_as


TABLE_FILENAME = "architectures.yaml"
UNSUPPORTED_FILENAME = "unsupported.yaml"
# routers of a family not in the table: every name its kind uses
_DETECTED_IGNORE = _BASE_IGNORE + ("re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$")
ARCHITECTURES, LOADED_AS = _load_table()


@dataclass(frozen=True)
class UnsupportedFamily:
    """
    An MoE family that cannot be reduced here (``unsupported.yaml``).

    :param model_type: ``config.model_type``
    :param name: the family's name as users know it
    :param reason: why its result could not be served
    :param fix: what to do instead
    """

    model_type: str
    name: str
    reason: str
    fix: str


def _load_unsupported() -> dict[str, UnsupportedFamily]:
    text = resources.files(__package__).joinpath(UNSUPPORTED_FILENAME).read_text()
    return {
        model_type: UnsupportedFamily(model_type=model_type, **row)
        for model_type, row in yaml.safe_load(text).items()
    }


UNSUPPORTED_FAMILIES = _load_unsupported()


class UnsupportedFamilyError(ValueError):
    """A model of a family in :data:`UNSUPPORTED_FAMILIES`."""

    def __init__(self, family: UnsupportedFamily):
        self.family = family
        super().__init__(
            f"{family.name} (model_type {family.model_type!r}) cannot be reduced: "
            f"{family.reason}. Fix: {family.fix}"
        )


# where a wrapper's config nests the language model's (the first that exists):
# a vision-language wrapper's text_config, Qwen3-Omni's thinker's
TEXT_CONFIG_PATHS = (("text_config",), ("thinker_config", "text_config"))


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config that carries the MoE keys (the text config of wrappers)."""
    for path in TEXT_CONFIG_PATHS:
        nested = config
        for key in path:
            nested = getattr(nested, key, None)
        if nested is not None:
            return nested
    return config


def text_config_entry(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """
    The language model's part of a ``config.json`` (a wrapper's nested one, or
    the whole) and its key path as a prefix (``thinker_config.text_config.``).
    """
    for path in TEXT_CONFIG_PATHS:
        nested: Any = config
        for key in path:
            nested = nested.get(key) if isinstance(nested, dict) else None
        if isinstance(nested, dict):
            return nested, "".join(f"{key}." for key in path)
    return config, ""


def get_arch_spec(config: PretrainedConfig) -> MoEArchSpec:
    """
    Look up the family of ``config``; unknown families are detected from the config
    keys, with a warning.

    :param config: the model's config; a vision-language wrapper's own row is
        used where the table has one (its vision tower's quantization ignore
        entries, its save names), else its text config's
    :raises UnsupportedFamilyError: a family that cannot be reduced, with why
    """
    model_types = list(
        dict.fromkeys([config.model_type, text_config(config).model_type])
    )
    # a refused wrapper is refused whatever its language model
    for model_type in model_types:
        if model_type in UNSUPPORTED_FAMILIES:
            raise UnsupportedFamilyError(UNSUPPORTED_FAMILIES[model_type])
    for model_type in model_types:
        if model_type in ARCHITECTURES:
            return ARCHITECTURES[model_type]
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
            "row for it to ream_modifiers/moe/architectures.yaml."
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
        quantization_ignore=_DETECTED_IGNORE,
        # unknown family: assume vLLM may quantize the router (the safe side)
        router_quantizable_in_vllm=True,
    )
    logger.warning(
        f"No architecture row for model_type={config.model_type!r}; detected "
        f"expert count key(s) {count_keys}, top-k key {top_k_key!r}, "
        f"scoring={spec.scoring}. Check the result, and consider adding a row to "
        "ream_modifiers/moe/architectures.yaml."
    )
    return spec


def _raw(config: PretrainedConfig, key: str):
    """A config value that is really set (attribute aliases resolve too)."""
    try:
        return getattr(config, key)
    except AttributeError:
        return None
