"""
GPU figures of issue 16 §4, one JSON on standard output (and results/gpu.json):

1. **Per layer**, for REAM, DERN, MoEITS and AIMER at 50%: a random model with
   one MoE layer of Qwen3-30B-A3B's shape (128 experts, hidden 2048, expert
   width 768, top-8) and one of DeepSeek-V3's (256 experts in 8 groups, hidden
   7168, width 2048, top-8), bf16 on the accelerator; the oneshot's wall time,
   the layer's decide and apply seconds from the report, and the peak
   accelerator memory over the layer's weight bytes.
2. **Whole model**: REAM 50% + GPTQ W4A16 (the shipped recipe's GPTQ settings)
   on a random Qwen3-30B-A3B-shaped model of ``--model-layers`` decoder layers
   (8 of its 48 by default, about 10 GB: the lent machine has 64 GiB of disk),
   written shard by shard and loaded with ``offload="disk"`` (attention is
   ``bench_offload``'s small one: the experts are what is measured); load, oneshot and
   save seconds, peak accelerator memory and peak host RSS, and the oneshot
   time per layer, from which 48 layers scale linearly.

    .venv/bin/python benchmarks/bench_gpu.py --workdir /path/with/space
    .venv/bin/python benchmarks/bench_gpu.py --tiny   # CPU check at tiny shapes

Sized to finish well inside 10 minutes on one H200. Without an accelerator it
runs on CPU, where only ``--tiny`` is practical (the test suite runs that).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import RESULTS, gptq_stage, quiet

SPARSITY = 0.5
METHODS = ("ream", "dern", "moeits", "aimer")


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's shape, built as a one-layer model of ``family``."""

    name: str
    family: str
    experts: int
    hidden: int
    width: int
    top_k: int
    groups: int = 1
    topk_groups: int = 1

    def config_kwargs(self) -> dict:
        shared = dict(
            vocab_size=512,
            hidden_size=self.hidden,
            moe_intermediate_size=self.width,
            intermediate_size=self.width,
            num_hidden_layers=1,
            num_experts_per_tok=self.top_k,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        if self.family == "qwen3_moe":
            return dict(
                shared,
                num_experts=self.experts,
                norm_topk_prob=True,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return dict(  # deepseek_v3: MLA with the released model's ranks
            shared,
            n_routed_experts=self.experts,
            n_shared_experts=1,
            n_group=self.groups,
            topk_group=self.topk_groups,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_attention_heads=max(1, self.hidden // 56),
            num_key_value_heads=max(1, self.hidden // 56),
            kv_lora_rank=min(512, self.hidden),
            q_lora_rank=min(1536, self.hidden),
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
        )


SHAPES = (
    LayerShape("qwen3_30b_a3b", "qwen3_moe", 128, 2048, 768, 8),
    LayerShape("deepseek_v3", "deepseek_v3", 256, 7168, 2048, 8, 8, 4),
)
TINY_SHAPES = (
    LayerShape("qwen3_30b_a3b", "qwen3_moe", 8, 128, 128, 2),
    LayerShape("deepseek_v3", "deepseek_v3", 8, 128, 128, 2, 2, 1),
)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None  # host memory is reported for the whole-model run only


def _modifier(method: str, report: Path):
    from ream_modifiers import (
        AIMERModifier,
        DERNModifier,
        MoEITSModifier,
        REAMModifier,
    )

    classes = {
        "ream": REAMModifier,
        "dern": DERNModifier,
        "moeits": MoEITSModifier,
        "aimer": AIMERModifier,
    }
    return classes[method](sparsity=SPARSITY, report_path=str(report))


def _calibration(vocab: int, samples: int, seq_len: int):
    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocab)
    return tokenizer, build_calibration_dataset("bundled", tokenizer, samples, seq_len)


def layer_case(shape: LayerShape, method: str, args, work: Path) -> dict:
    """One oneshot of ``method`` on a fresh one-layer model of ``shape``."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from transformers import AutoConfig, AutoModelForCausalLM

    device = _device()
    reset_session()
    config = AutoConfig.for_model(shape.family, **shape.config_kwargs())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    # oneshot re-reads the config from the model's path; the weights are never
    # written (a DeepSeek-V3 layer is 22 GB)
    model_dir = work / f"{shape.name}-config"
    config.save_pretrained(model_dir)
    model.name_or_path = model.config._name_or_path = str(model_dir)
    expert_bytes = 3 * shape.experts * shape.hidden * shape.width
    expert_bytes *= model.dtype.itemsize
    tokenizer, dataset = _calibration(config.vocab_size, args.samples, args.seq_len)
    report = work / f"{shape.name}-{method}.json"
    _reset_peak(device)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[_modifier(method, report)],
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = _peak_bytes(device)
    layer = next(iter(json.loads(report.read_text())["layers"].values()))
    del model
    return {
        "shape": shape.name,
        "method": method,
        "oneshot_s": round(wall, 3),
        "decide_s": layer["decide_seconds"],
        "apply_s": layer["apply_seconds"],
        "kept": len(layer["kept"]),
        "expert_bytes": expert_bytes,
        "peak_device_bytes": peak,
        "peak_device_over_layer": None
        if peak is None
        else round(peak / expert_bytes, 3),
    }


def whole_model(args, work: Path) -> dict:
    """REAM 50% + GPTQ W4A16 on a disk-offloaded random 30B-A3B-shaped model."""
    from bench_offload import build_model
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    from ream_modifiers import REAMModifier
    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model

    shape = args.shapes[0]
    model_dir, offload_dir = work / "model", work / "offload"
    build_args = argparse.Namespace(
        layers=args.model_layers,
        experts=shape.experts,
        hidden=shape.hidden,
        width=shape.width,
        top_k=shape.top_k,
        dtype=str(args.dtype).removeprefix("torch."),
        seed=0,
    )
    start = time.perf_counter()
    model_bytes = build_model(model_dir, build_args)
    build_s = time.perf_counter() - start
    reset_session()
    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(
        "bundled", tokenizer, args.samples, args.seq_len
    )
    _reset_peak(device)
    start = time.perf_counter()
    model = load_moe_model(model_dir, offload="disk", offload_folder=offload_dir)
    load_s = time.perf_counter() - start
    recipe = [
        REAMModifier(sparsity=SPARSITY, report_path=str(work / "whole.json")),
        GPTQModifier(**gptq_stage()),
    ]
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
    )
    oneshot_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(work / "output")
    save_s = time.perf_counter() - start
    peak = _peak_bytes(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "layers": args.model_layers,
        "shape": shape.name,
        "model_bytes": model_bytes,
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 1),
        "oneshot_s": round(oneshot_s, 1),
        "save_s": round(save_s, 1),
        "oneshot_s_per_layer": round(oneshot_s / args.model_layers, 2),
        "oneshot_s_48_layers_linear": round(48 * oneshot_s / args.model_layers, 1),
        "peak_device_bytes": peak,
        "peak_host_rss_bytes": rss,
        "peak_host_rss_over_model": round(rss / model_bytes, 3),
    }


def run(args) -> dict:
    device = _device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "dtype": str(args.dtype).removeprefix("torch."),
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "shapes": [asdict(shape) for shape in args.shapes],
        "layers": [],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        for shape in args.shapes:
            for method in args.methods:
                case = layer_case(shape, method, args, work)
                print(json.dumps(case), flush=True)
                result["layers"].append(case)
        if args.model_layers:
            result["whole_model"] = whole_model(args, work)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch (model, offload)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for CPU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--model-layers", type=int, default=None)
    parser.add_argument(
        "--output", default=None, help="JSON path (results/gpu.json by default)"
    )
    args = parser.parse_args(argv)
    args.shapes = TINY_SHAPES if args.tiny else SHAPES
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    defaults = (8, 32, 2) if args.tiny else (64, 512, 8)
    for key, value in zip(
        ("samples", "seq_len", "model_layers"), defaults, strict=True
    ):
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet()
    result = run(args)
    default = RESULTS / ("gpu_tiny.json" if args.tiny else "gpu.json")
    output = Path(args.output) if args.output else default
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
