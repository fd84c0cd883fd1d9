"""
Memory of an in-memory run (issue 16 §1), by phase: REAM 50% + GPTQ W4A16 on a
random Qwen3-MoE, loaded two ways side by side, each in a fresh process:

- ``fused``: transformers' ``from_pretrained`` (experts fused), then
  llm-compressor's ``linearize_moe`` (what ``load_moe_model`` did without
  ``load_context()`` before 2026-12-04);
- ``direct``: ``load_moe_model`` (per-expert modules built at construction and
  filled from the checkpoint).

    .venv/bin/python benchmarks/bench_memory.py [--layers 6 --experts 32]
        [--loads fused direct] [--allocators default eager] [--output memory.json]

Per phase (load, oneshot, save): peak anonymous memory above the runtime and
peak file-backed pages (the memory-mapped safetensors), both over the model's
bytes, and the whole process's peak RSS over the model's bytes. Writes
results/memory.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    PeakSampler,
    gptq_stage,
    memory_status,
    print_result,
    quiet,
    run_measured,
)

HERE = Path(__file__).parent


def _load(model_dir: str, how: str):
    import torch

    if how == "direct":
        from ream_modifiers.moe import load_moe_model

        return load_moe_model(model_dir, dtype=torch.float32, use_load_context=False)
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linearize_moe(model)
    return model


def child(args) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    from ream_modifiers import REAMModifier
    from ream_modifiers.data import build_calibration_dataset

    quiet()
    if args.allocator == "default":
        import ream_modifiers.allocator

        ream_modifiers.allocator.ENABLED = False  # glibc's defaults throughout
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = build_calibration_dataset(
        "bundled", tokenizer, args.samples, args.seq_len
    )
    runtime_rss = memory_status("VmRSS")
    runtime_anon = memory_status("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    sampler.enter("load")
    model = _load(args.model_dir, args.load)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sampler.enter("oneshot")
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        processor=tokenizer,
        recipe=[REAMModifier(sparsity=0.5), GPTQModifier(**gptq_stage())],
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
    )
    oneshot_seconds = time.perf_counter() - start
    sampler.enter("save")
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
    phases = sampler.stop()
    phases.pop("start", None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print_result(
        {
            "load": args.load,
            "allocator": args.allocator,
            "oneshot_seconds": round(oneshot_seconds, 1),
            "model_bytes": model_bytes,
            "peak_rss_over_model": round(peak / model_bytes, 3),
            "peak_rss_above_runtime_over_model": round(
                (peak - runtime_rss) / model_bytes, 3
            ),
            "phases": {
                phase: {
                    "anon_above_runtime_over_model": round(
                        (peaks["anon"] - runtime_anon) / model_bytes, 3
                    ),
                    "file_over_model": round(peaks["file"] / model_bytes, 3),
                    "rss_above_runtime_over_model": round(
                        (peaks["rss"] - runtime_rss) / model_bytes, 3
                    ),
                }
                for phase, peaks in phases.items()
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model-dir")
    parser.add_argument("--load", choices=["fused", "direct"], default="direct")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--loads", nargs="+", choices=["fused", "direct"], default=["fused", "direct"]
    )
    parser.add_argument(
        "--allocators",
        nargs="+",
        choices=["default", "eager"],
        default=["eager"],
        help="eager: freed memory returned during the save, as our save hook does "
        "(ream_modifiers.allocator); default: glibc's defaults throughout",
    )
    parser.add_argument("--allocator", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="memory.json")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.build:
        from bench_scale import build_model

        build_model(Path(args.build), args.experts, args)
        return
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        # built in a process of its own: Linux keeps a process's peak RSS across
        # fork and exec, so children forked by a parent that had held the model
        # would report the parent's peak as theirs (1.83 instead of 1.35 once)
        build = [sys.executable, __file__, "--build", str(model_dir)]
        for key in ("layers", "experts", "hidden", "width", "top_k"):
            build += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        subprocess.run(build, check=True, cwd=HERE)
        runs = []
        for how, allocator in itertools.product(args.loads, args.allocators):
            command = [sys.executable, __file__, "--child", "--load", how]
            command += ["--allocator", allocator]
            command += ["--model-dir", str(model_dir), "--samples", str(args.samples)]
            command += ["--seq-len", str(args.seq_len)]
            runs.append(run_measured(command, HERE))
    result = {
        "model": {
            k: getattr(args, k)
            for k in ("layers", "experts", "hidden", "width", "top_k")
        },
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
