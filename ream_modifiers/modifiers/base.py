"""
The lifecycle shared by every expert-reduction modifier.

A concrete modifier declares the statistics it needs per layer as a typed
:class:`~ream_modifiers.observe.statistics.LayerStatistics`, decides which experts
survive (:meth:`ExpertReductionModifier.decide`) and, if it does more than prune,
reads (:meth:`~ExpertReductionModifier.read`) and writes
(:meth:`~ExpertReductionModifier.write`) the layer. This base class does the
rest: fail-fast validation, hook management, distributed reduction, the barrier
between every rank's reads and any rank's writes, structural edits at the
layer's ``SEQUENTIAL_EPOCH_END``, config sync, router protection for later
quantization, and the per-layer report.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.offload import get_execution_device
from llmcompressor.core import Event, State, active_session
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator
from torch import distributed as dist

from ream_modifiers.distributed import (
    broadcast_from_source,
    check_sharded,
    is_distributed,
    is_source_process,
)
from ream_modifiers.engines.allocation import allocate_kept, removal_costs
from ream_modifiers.engines.selection import (
    ExpertBudget,
    fewest_kept,
    plan_budget,
    select_kept,
)
from ream_modifiers.modifiers.sequential import check_sequential_targets
from ream_modifiers.moe.architectures import text_config
from ream_modifiers.moe.edit import expert_count_values, keep_experts, sync_config
from ream_modifiers.moe.layer import MoELayer, find_moe_layers
from ream_modifiers.moe.load import ensure_hub_save_names
from ream_modifiers.moe.per_layer import (
    PER_LAYER_FAMILIES,
    PER_LAYER_KEY,
    per_layer_entry,
    per_layer_family,
)
from ream_modifiers.observe.collector import LayerStatsCollector
from ream_modifiers.observe.padding import padding_masks_from_dataloader
from ream_modifiers.observe.statistics import LayerStatistics, RoutedExpertSums
from ream_modifiers.observe.stats_file import StatisticsFile, StatisticsWriter
from ream_modifiers.observe.token_keys import TokenKeyRecorder
from ream_modifiers.registry import Kind
from ream_modifiers.saving import install_save_hook, record_for_save

__all__ = ["ExpertReductionModifier", "LayerDecision"]


# how a layer that no calibration token reached is reduced (report "rule")
WEIGHT_ONLY_RULE = "aimer (no calibration token reached this expert set)"


@dataclass
class LayerDecision:
    """What a method decided for one layer."""

    kept: list[int]
    scores: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # goes into the report
    plan: Any = None  # what apply() needs beyond ``kept``; not reported


class ExpertReductionModifier(Modifier):
    """
    Base class of the modifiers that remove or merge routed experts.

    :param num_experts: experts to keep per layer (exactly one of this and
        ``sparsity``)
    :param sparsity: share of routed experts to remove per layer, in (0, 1)
    :param ignore: regexes of MoE block names to leave untouched
    :param report_path: optional ``.json`` path for the per-layer report (the report
        is also written next to every saved checkpoint)
    :param protect_routers: add the architecture's router and shared-expert-gate
        patterns to the ``ignore`` list of every quantization modifier that follows
        in the recipe, so routers stay unquantized without model-specific recipes
    :param save_statistics: a new directory to save every layer's calibration
        statistics to, as the method decided on them; compressing from it with
        the same settings (``from_statistics``) reproduces this run bit for bit
        (:mod:`ream_modifiers.observe.stats_file`)
    :param from_statistics: a statistics directory (``ream-compress calibrate``
        or ``save_statistics``) to decide from instead of calibrating: no
        forward pass runs for this modifier
    :param budget: ``uniform`` (every layer keeps ``num_experts``, or loses
        ``sparsity``), or spread the same total unevenly over the layers, the
        cheapest removals first (:mod:`ream_modifiers.engines.allocation`), by
        each expert's share of its layer's routed output mass
        (``saliency_fraction``) or that mass per token (``saliency_mass``).
        Needs ``from_statistics``: every layer is allocated before any is
        reduced
    """

    num_experts: int | None = None
    sparsity: float | None = None
    ignore: list[str] = Field(default_factory=list)
    report_path: str | None = None
    protect_routers: bool = True
    save_statistics: str | None = None
    from_statistics: str | None = None
    budget: Literal["uniform", "saliency_fraction", "saliency_mass"] = "uniform"

    method: ClassVar[str] = ""  # display name, as reports write it
    paper: ClassVar[str] = ""  # the paper's URL
    paper_title: ClassVar[str] = ""
    # prune: experts removed; merge: groups averaged into one expert;
    # recombine: removed experts' neurons folded into kept ones
    kind: ClassVar[Kind] = "prune"
    # what save_statistics records as the hidden states the statistics saw
    statistics_mode: ClassVar[str] = "sequential"

    _layers: list[MoELayer] = PrivateAttr(default_factory=list)
    _budget: ExpertBudget | None = PrivateAttr(default=None)
    # layer name -> its own budget, when ``budget`` spreads the ratio unevenly
    _layer_budgets: dict[str, ExpertBudget] = PrivateAttr(default_factory=dict)
    # per layer: the collector feeding the method's typed statistics, and them
    _collectors: dict[str, tuple[LayerStatsCollector, LayerStatistics]] = PrivateAttr(
        default_factory=dict
    )
    _done: set[str] = PrivateAttr(default_factory=set)
    _report: dict[str, Any] = PrivateAttr(default_factory=dict)
    _group: Any = PrivateAttr(default=None)
    _statistics_in: StatisticsFile | None = PrivateAttr(default=None)
    _statistics_out: StatisticsWriter | None = PrivateAttr(default=None)

    # -- validation (runs when the recipe is parsed) ---------------------------

    def uniform_budget(self) -> bool:
        """Whether every layer keeps the same, configured number of experts."""
        return True

    @model_validator(mode="after")
    def _validate_budget_fields(self):
        if not self.uniform_budget():
            if self.num_experts is not None or self.sparsity is not None:
                raise ValueError(
                    f"{type(self).__name__}: with a per-layer adaptive budget, give "
                    "neither num_experts nor sparsity"
                )
        elif (self.num_experts is None) == (self.sparsity is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of `num_experts` (experts "
                f"to keep per layer) and `sparsity` (share to remove); got "
                f"num_experts={self.num_experts}, sparsity={self.sparsity}"
            )
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise ValueError(
                f"{type(self).__name__}: sparsity must be in (0, 1), got "
                f"{self.sparsity} (0.25 removes a quarter of the experts)"
            )
        if self.num_experts is not None and self.num_experts < 1:
            raise ValueError(
                f"{type(self).__name__}: num_experts must be >= 1, got "
                f"{self.num_experts}"
            )
        if self.save_statistics is not None and self.from_statistics is not None:
            raise ValueError(
                f"{type(self).__name__}: give at most one of save_statistics and "
                "from_statistics (statistics read from a directory are already "
                "saved there)"
            )
        if self.budget != "uniform" and not self.uniform_budget():
            raise ValueError(
                f"{type(self).__name__}: budget {self.budget!r} spreads a global "
                "num_experts or sparsity over the layers; this setting decides "
                "each layer's count itself"
            )
        if self.budget != "uniform" and self.from_statistics is None:
            raise ValueError(
                f"{type(self).__name__}: budget {self.budget!r} allocates every "
                "layer before the first is reduced, so it needs every layer's "
                "statistics first: calibrate once (`ream-compress calibrate`, or "
                "ExpertStatisticsModifier) and give that directory as "
                "from_statistics"
            )
        if self.from_statistics is not None:
            # decided from recorded statistics: this modifier runs no data
            self.requires_calibration_data = False
        if self.report_path is not None and not self.report_path.endswith(".json"):
            raise ValueError(
                f"{type(self).__name__}: report_path must end with .json, got "
                f"{self.report_path!r}"
            )
        return self

    # -- what subclasses provide -----------------------------------------------

    def statistics(self, layer: MoELayer) -> LayerStatistics | None:
        """
        The statistics to collect for ``layer``, as the method's own typed
        :class:`LayerStatistics` (None for data-free methods). :meth:`decide`
        receives the same object, reduced across ranks.
        """
        return None

    @abstractmethod
    def decide(self, layer: MoELayer, stats: LayerStatistics | None) -> LayerDecision:
        """Choose the experts of ``layer`` that survive (runs on the source rank)."""

    def read(self, layer: MoELayer, decision: LayerDecision) -> Any:
        """
        Copy what :meth:`write` needs from ``layer`` (every rank, before any rank
        writes); pruning needs nothing.
        """
        return None

    def write(self, layer: MoELayer, decision: LayerDecision, read: Any) -> None:
        """
        Edit ``layer`` in place from what :meth:`read` returned, never reading the
        layer's weights again; pruning keeps the chosen experts.
        """
        keep_experts(layer, decision.kept)

    def apply(self, layer: MoELayer, decision: LayerDecision) -> None:
        """
        Carry out ``decision``: :meth:`read`, a barrier across ranks, then
        :meth:`write`. Under torchrun the offloaded weights may live in CPU memory
        shared by all ranks, so no rank may write before every rank has read.
        Subclasses override ``read`` and ``write``, never this.
        """
        snapshot = self.read(layer, decision)
        self._sync_ranks()
        self.write(layer, decision, snapshot)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "apply" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides apply(); override read() (copies, before "
                "the barrier across ranks) and write() (edits, after it) instead"
            )

    def validate_model(self, state: State, layers: list[MoELayer]) -> None:
        """Extra method-specific checks before calibration (raise ValueError)."""

    def min_experts_per_group(self, layers: list[MoELayer]) -> int:
        routing = layers[0].routing
        # group scores that sum the top-2 experts need two per group
        return (
            2
            if routing.n_group is not None and routing.group_score == "top2_sum"
            else 1
        )

    # -- lifecycle ---------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._layers = find_moe_layers(model, self.ignore)
        if len({layer.num_experts for layer in self._layers}) > 1:
            raise ValueError(
                f"{type(self).__name__}: this model's MoE layers already keep "
                f"different expert counts ({PER_LAYER_KEY}); reduce the original "
                "model instead (a non-uniform budget is planned from one count)"
            )
        check_sequential_targets(model, self._layers, kwargs.get("sequential_targets"))
        if self.uniform_budget():
            self._plan_uniform_budget()
        self._report = {
            "method": self.method,
            "paper": self.paper,
            "model_type": self._layers[0].spec.model_type,
            "num_experts_before": self._layers[0].num_experts,
            "num_experts_after": None if self._budget is None else self._budget.kept,
            "settings": {
                key: value
                for key, value in self.model_dump(mode="json").items()
                if key not in Modifier.model_fields
            },
            "layers": {},
        }
        self._open_statistics()
        if self.budget != "uniform":
            self._allocate_layer_budgets()
        self.validate_model(state, self._layers)
        if is_distributed():
            # statistics and decisions travel through host memory on every backend
            self._group = dist.new_group(backend="gloo")
        install_save_hook(model)
        ensure_hub_save_names(model)
        if self.protect_routers:
            self._protect_routers_from_quantization()
        return True

    def layer_budget(self, layer: MoELayer) -> ExpertBudget:
        """The budget of ``layer``: its own under a non-uniform ``budget``."""
        return self._layer_budgets.get(layer.name, self._budget)

    def _allocate_layer_budgets(self) -> None:
        """Spread the uniform plan's total over the layers by ``budget``."""
        recorded, layers = self._statistics_in, self._layers
        routing, uniform = layers[0].routing, self._budget
        if recorded.match(RoutedExpertSums(routing.num_experts)) is None:
            raise ValueError(
                f"{type(self).__name__}: budget {self.budget!r} reads routed sums, "
                f"which {self.from_statistics} lacks; calibrate with a method "
                "that records them (REAP, REAM, any calibrating method)"
            )
        costs = []
        for index, layer in enumerate(layers):
            sums = RoutedExpertSums(layer.num_experts)
            recorded.restore(index, [sums], torch.device("cpu"))
            tokens = recorded.layer_entry(index).get("tokens_seen", 0)
            costs.append(
                removal_costs(sums.tensors["weighted_norm"], tokens, self.budget)
            )
        fewest = fewest_kept(
            routing.num_experts,
            routing.top_k,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            min_per_group=self.min_experts_per_group(layers),
        )
        try:
            counts = allocate_kept(
                costs,
                uniform.kept * len(layers),
                min_kept=[fewest] * len(layers),
                groups=routing.n_group or 1,
            )
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self._layer_budgets = {
            layer.name: replace(uniform, kept=count)
            for layer, count in zip(layers, counts, strict=True)
        }
        self._report["budget"] = {"signal": self.budget, "kept_per_layer": counts}
        logger.info(
            f"{self.method}: {self.budget} budget, {uniform.kept * len(layers)} "
            f"experts kept in all as {counts} per layer (uniform: {uniform.kept})"
        )

    def _plan_uniform_budget(self) -> None:
        routing = self._layers[0].routing
        try:
            self._budget = plan_budget(
                routing.num_experts,
                routing.top_k,
                target=self.num_experts,
                sparsity=self.sparsity,
                n_group=routing.n_group,
                topk_group=routing.topk_group,
                min_per_group=self.min_experts_per_group(self._layers),
            )
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        budget = self._budget
        logger.info(
            f"{self.method}: {len(self._layers)} MoE layers, {budget.num_experts} "
            f"experts/layer -> {budget.kept} (removing {budget.dropped}, "
            f"{budget.dropped / budget.num_experts:.0%})"
            + (f", {budget.kept_per_group} per group" if budget.n_group else "")
        )

    def _open_statistics(self) -> None:
        """Open ``from_statistics`` (checked against this model and method before
        anything runs) or start writing ``save_statistics``."""
        layers = self._layers
        if self.from_statistics is not None:
            recorded = StatisticsFile(self.from_statistics)
            requested = [
                statistic
                for layer in layers
                for statistic in self._requested_statistics(layer)
            ]
            recorded.check(
                layers[0].spec.model_type,
                [(layer.name, layer.num_experts) for layer in layers],
                requested,
                type(self).__name__,
            )
            recorder = recorded.recorded_by
            if recorded.mode == "sequential" and recorder != self._recorder():
                logger.warning(
                    f"{self.method}: {self.from_statistics} was recorded while "
                    f"{recorder and recorder.get('method')} reduced the layers with "
                    "other settings, so each layer's statistics saw earlier layers "
                    "reduced differently than this run will; the result is not "
                    "what a direct run of these settings gives"
                )
            self._statistics_in = recorded
            self._report["statistics_from"] = {
                "path": str(self.from_statistics),
                "mode": recorded.mode,
                "recorded_by": recorder,
            }
        elif self.save_statistics is not None and is_source_process():
            self._statistics_out = StatisticsWriter(
                self.save_statistics,
                model_type=layers[0].spec.model_type,
                layers=[layer.name for layer in layers],
                num_experts=[layer.num_experts for layer in layers],
                mode=self.statistics_mode,
                recorded_by=self._recorder(),
            )

    def _recorder(self) -> dict[str, Any]:
        """The method and the settings that decide its result, for the manifest."""
        settings = {
            key: value
            for key, value in self._report["settings"].items()
            if key not in ("report_path", "save_statistics", "from_statistics")
        }
        return {"method": self.method, "settings": settings}

    def _check_all_expert_outputs(self) -> None:
        """Statistics over every expert's output on every token (mean outputs,
        neuron activations) need llm-compressor to run all experts."""
        needs_all = [
            statistic.name
            for statistic in self._requested_statistics(self._layers[0])
            if statistic.needs_all_tokens
        ]
        if needs_all and not get_calibrate_all_experts_flag():
            raise ValueError(
                f"{self.method} ({type(self).__name__}) needs every expert's output "
                f"on every calibration token ({', '.join(needs_all)}): run oneshot "
                "with moe_calibrate_all_experts=True (the default)"
            )

    def _requested_statistics(self, layer: MoELayer) -> list:
        stats = self.statistics(layer)
        return [] if stats is None else stats.collected()

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self._statistics_in is not None:
            return  # decided from recorded statistics: nothing to observe
        self._check_all_expert_outputs()
        if self.requires_calibration_data and self._group is not None:
            check_sharded(getattr(state.data.calib, "dataset", None), self._group)
        masks = (
            padding_masks_from_dataloader(state.data.calib)
            if self.requires_calibration_data
            else []
        )
        recorder = None
        for layer in self._layers:
            stats = self.statistics(layer)
            if stats is None:
                continue
            statistics = stats.collected()
            if recorder is None and any(s.needs_token_keys for s in statistics):
                # token samples are chosen by content, not by batch or rank
                recorder = TokenKeyRecorder(masks)
                recorder.attach(state.model.get_input_embeddings(), self.register_hook)
            collector = LayerStatsCollector(layer, statistics, masks, recorder)
            collector.attach(self.register_hook)
            self._collectors[layer.name] = (collector, stats)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        modules = kwargs.get("modules")
        finished = (
            set(map(id, modules))
            if modules is not None
            else {id(m) for m in state.model.modules()}
        )
        # model order, identical on every rank
        for layer in self._layers:
            if layer.name not in self._done and id(layer.block) in finished:
                self._reduce_layer(layer)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        missing = [layer.name for layer in self._layers if layer.name not in self._done]
        if missing:
            raise RuntimeError(
                f"{self.method}: MoE layers {missing} never finished calibration; "
                "the pipeline did not run them. Use the sequential or basic pipeline."
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        model = state.model
        spec = self._layers[0].spec
        counts = [layer.num_experts for layer in self._layers]
        config_values = expert_count_values(spec, max(counts))
        if len(set(counts)) > 1:
            entry = config_values[PER_LAYER_KEY] = self._per_layer_config_entry(model)
            # the model in memory says so too (find_moe_layers reads it)
            setattr(text_config(model.config), PER_LAYER_KEY, entry)
        self._report["num_experts_after"] = (
            counts[0] if len(set(counts)) == 1 else counts
        )
        if self._statistics_out is not None:
            path = self._statistics_out.close()
            self._statistics_out = None
            logger.info(f"{self.method}: calibration statistics saved to {path}")
        sync_config(model, spec, max(counts))
        # quantization schemes are attached by now: pick the save layout that
        # fits them (gpt-oss: fused when unquantized, per expert when packed)
        ensure_hub_save_names(model)
        record_for_save(model, config_values=config_values, report=self._report)
        if self.report_path is not None and is_source_process():
            path = Path(self.report_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._report, indent=2) + "\n")
            logger.info(f"{self.method}: report written to {path}")
        self._collectors.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
        return True

    def _per_layer_config_entry(self, model) -> list[int | None]:
        """The saved config's per-decoder-layer counts, and what loads them."""
        spec = self._layers[0].spec
        counts = [(layer.name, layer.num_experts) for layer in self._layers]
        entry = per_layer_entry(counts, text_config(model.config).num_hidden_layers)
        if per_layer_family(spec.model_type) is not None:
            logger.info(
                f"{self.method}: per-layer expert counts {entry} ({PER_LAYER_KEY} "
                "in config.json); the checkpoint loads with "
                "ream_modifiers.load_moe_model, and in vLLM with ream-modifiers "
                "installed beside it (its plugin builds each layer's count)"
            )
        else:
            logger.warning(
                f"{self.method}: layers now have different expert counts {entry}; "
                f"neither vLLM nor transformers can load such a {spec.model_type} "
                f"checkpoint (per-layer builds exist for {sorted(PER_LAYER_FAMILIES)})"
            )
        return entry

    # -- per layer ---------------------------------------------------------------

    def _reduce_layer(self, layer: MoELayer) -> None:
        start = time.perf_counter()
        collector, _ = self._collectors.get(layer.name, (None, None))
        stats, tokens_seen, unobserved = self._layer_statistics(layer)
        if not is_source_process():
            decision = None
        elif unobserved:
            decision = self._weight_only_decision(layer)
        else:
            decision = self.decide(layer, stats)
        if self._group is not None:
            # every rank applies the source's decision, so all edit identically
            decision = broadcast_from_source(decision, self._group)
        decided = time.perf_counter()
        before = layer.num_experts
        if decision.extra.get("rule") == WEIGHT_ONLY_RULE:
            self._sync_ranks()
            keep_experts(layer, decision.kept)
        else:
            self.apply(layer, decision)
        # no rank runs the layer again until every rank's writes landed
        self._sync_ranks()
        applied = time.perf_counter()
        seconds = applied - start
        removed = sorted(set(range(before)) - set(decision.kept))
        entry = {
            "experts_before": before,
            "kept": decision.kept,
            "removed": removed,
            "scores": decision.scores,
            "seconds": round(seconds, 4),
            # statistics reduction + decision, then the structural edit
            "decide_seconds": round(decided - start, 4),
            "apply_seconds": round(applied - decided, 4),
            **decision.extra,
        }
        if tokens_seen is not None:
            entry["calibration_tokens"] = tokens_seen
        self._report["layers"][layer.name] = entry
        self._done.add(layer.name)
        # the hooks hold the collector: drop both so a layer's statistics (e.g.
        # REAM's [E, capacity, D] activation samples) are freed before the next
        if collector is not None:
            self.remove_hooks(collector.handles)
        self._collectors.pop(layer.name, None)
        logger.info(
            f"{self.method} {layer.name}: kept {len(decision.kept)}/{before}, "
            f"removed {removed} ({seconds:.2f}s)"
        )

    def _layer_statistics(
        self, layer: MoELayer
    ) -> tuple[LayerStatistics | None, int | None, bool]:
        """
        ``(stats, tokens, unobserved)``: the layer's statistics, reduced onto the
        source rank or read from ``from_statistics`` (and saved to
        ``save_statistics``), the calibration tokens they counted, and whether
        no token reached this expert set (it is then pruned by weight alone).
        """
        index = self._layers.index(layer)
        if self._statistics_in is not None:
            stats, tokens = self._restored_statistics(layer, index)
            return stats, tokens, bool(layer.spec.expert_sets) and tokens == 0
        collector, stats = self._collectors.get(layer.name, (None, None))
        if collector is None:
            return stats, None, False
        if self._group is not None:
            collector.reduce_to_source(self._group)  # totals on the source
        unobserved = False
        if layer.spec.expert_sets:
            # an expert set the rows never use (ERNIE-4.5-VL's vision set)
            unobserved = is_source_process() and collector.tokens_seen == 0
        elif self._group is None and collector.batches_seen == 0:
            raise RuntimeError(
                f"{self.method}: {layer.name} received no calibration batch"
            )
        if self._statistics_out is not None:
            self._statistics_out.write_layer(
                index,
                stats.collected(),
                tokens_seen=collector.tokens_seen,
                batches_seen=collector.batches_seen,
            )
        return stats, collector.tokens_seen, unobserved

    def _restored_statistics(
        self, layer: MoELayer, index: int
    ) -> tuple[LayerStatistics | None, int]:
        """This layer's statistics from ``from_statistics`` on the layer's
        execution device (source rank only), and the tokens they counted."""
        recorded = self._statistics_in
        tokens = recorded.layer_entry(index).get("tokens_seen", 0)
        stats = self.statistics(layer)
        if stats is None or not is_source_process():
            return stats, tokens
        device = get_execution_device(layer.router)
        recorded.restore(index, stats.collected(), device)
        return stats, tokens

    def _weight_only_decision(self, layer: MoELayer) -> LayerDecision:
        """
        The documented rule for an expert set that no calibration token can
        reach (ERNIE-4.5-VL's vision experts under text-only calibration):
        prune by AIMER's weight-only score, highest removed, as for MTP layers.
        """
        from ream_modifiers.modifiers.aimer.score import aimer_score_layer

        scores = aimer_score_layer(layer)
        kept = select_kept(scores, self.layer_budget(layer), remove="highest")
        logger.warning(
            f"{self.method}: no calibration token reached {layer.name} (an "
            "expert set that text rows do not use); pruned by the weight-only "
            "AIMER score instead"
        )
        return LayerDecision(
            kept=kept, scores=scores.cpu().tolist(), extra={"rule": WEIGHT_ONLY_RULE}
        )

    def _sync_ranks(self) -> None:
        """
        A barrier across ranks (a no-op in one process): compressed-tensors
        shares offloaded CPU weights between ranks, so a write must never
        overtake another rank's read of the same storage.
        """
        if self._group is not None:
            dist.barrier(group=self._group)

    def _protect_routers_from_quantization(self) -> None:
        patterns = list(self._layers[0].spec.quantization_ignore)
        try:
            modifiers = active_session().lifecycle.recipe.modifiers
        except AttributeError:
            return
        after_self = False
        for modifier in modifiers:
            if modifier is self:
                after_self = True
                continue
            if not isinstance(modifier, QuantizationMixin):
                continue
            if not after_self:
                logger.warning(
                    f"{type(modifier).__name__} runs before {type(self).__name__}; "
                    "put expert reduction first so only kept experts are quantized"
                )
                continue
            added = [p for p in patterns if p not in modifier.ignore]
            if added:
                modifier.ignore = [*modifier.ignore, *added]
                # the mixin caches its resolved config; resolve again with the ignores
                modifier._resolved_config = None
                logger.info(
                    f"{type(modifier).__name__}: not quantizing {added} (what "
                    f"{self._layers[0].spec.model_type} keeps unquantized: routers, "
                    "gates, modules vLLM builds without a quant_config)"
                )
