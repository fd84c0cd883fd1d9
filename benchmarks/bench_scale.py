"""
Scale benchmark (issue 5 §4): REAM at 50% then GPTQ W4A16, end to end with
``oneshot``, on random Qwen3-MoE models of realistic expert width; the largest has
more than 2 GB of weights. Every run is a fresh subprocess, so its peak RSS is
its own.

    .venv/bin/python benchmarks/bench_scale.py [--experts 32 64 128]
        [--token-multipliers 1 2 4]

Series: time and peak RSS / model bytes against the number of experts (at the
base calibration size), and against calibration tokens (x1, x2, x4, at the
largest expert count). Writes results/scale.json and results/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    PeakSampler,
    gptq_stage,
    header,
    memory_status,
    print_result,
    quiet,
    run_measured,
)

HERE = Path(__file__).parent


def child(args) -> None:
    """One measured run; prints a JSON line."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    from ream_modifiers import REAMModifier
    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model

    quiet()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    samples = args.samples * args.token_multiplier
    dataset = build_calibration_dataset("bundled", tokenizer, samples, args.seq_len)
    runtime_rss = memory_status("VmRSS")  # interpreter, torch, llm-compressor, data
    runtime_anon = memory_status("RssAnon")
    # RssAnon: ru_maxrss also counts the safetensors pages the memory map leaves
    # resident (reclaimable page cache); anonymous memory is what the run allocated
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = load_moe_model(args.model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    recipe = [REAMModifier(sparsity=0.5)]
    if not args.no_gptq:
        recipe.append(GPTQModifier(**gptq_stage()))
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        processor=tokenizer,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=args.seq_len,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_anon = max(phase["anon"] for phase in sampler.stop().values())
    print_result(
        {
            "tokens": samples * args.seq_len,
            "load_s": round(load_s, 1),
            "oneshot_s": round(seconds, 1),
            "model_bytes": model_bytes,
            "peak_rss_bytes": peak,
            "peak_rss_over_model": round(peak / model_bytes, 3),
            "runtime_rss_bytes": runtime_rss,
            "peak_above_runtime_over_model": round(
                (peak - runtime_rss) / model_bytes, 3
            ),
            "peak_anon_bytes": peak_anon,
            "peak_anon_above_runtime_over_model": round(
                (peak_anon - runtime_anon) / model_bytes, 3
            ),
        }
    )


def build_model(directory: Path, experts: int, args) -> None:
    import torch

    from ream_modifiers.tiny import build_tiny_moe

    build_tiny_moe(
        "qwen3_moe",
        directory,
        dtype=torch.float32,
        num_hidden_layers=args.layers,
        num_experts=experts,
        num_experts_per_tok=args.top_k,
        hidden_size=args.hidden,
        moe_intermediate_size=args.width,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
    )


def run_child(model_dir: Path, multiplier: int, args, no_gptq=False) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model-dir",
        str(model_dir),
        "--token-multiplier",
        str(multiplier),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
    ] + (["--no-gptq"] if no_gptq else [])
    return run_measured(command, HERE)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_experts = result["by_experts"]
    xs = [r["experts"] for r in by_experts]
    left.plot(xs, [r["oneshot_s"] for r in by_experts], "o-", label="time (s)")
    left.set_xlabel("experts per layer")
    left.set_ylabel("REAM 50% + GPTQ W4A16 oneshot (s)")
    twin = left.twinx()
    twin.plot(
        xs, [r["peak_rss_over_model"] for r in by_experts], "s--", color="tab:red"
    )
    twin.set_ylabel("peak RSS / model bytes", color="tab:red")
    left.set_title(f"time vs experts ({by_experts[0]['tokens']} calibration tokens)")
    by_tokens = result["by_tokens"]
    xs = [r["tokens"] for r in by_tokens]
    right.plot(xs, [r["oneshot_s"] for r in by_tokens], "o-")
    right.set_xlabel("calibration tokens")
    right.set_ylabel("oneshot (s)")
    right.set_title(f"time vs tokens ({by_tokens[0]['experts']} experts)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model-dir")
    parser.add_argument("--token-multiplier", type=int, default=1)
    parser.add_argument("--no-gptq", action="store_true")
    parser.add_argument("--experts", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--token-multipliers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    output = RESULTS / "scale.json"
    rows = []
    if args.resume and output.is_file():
        rows = json.loads(output.read_text())["rows"]
    largest = max(args.experts)
    wanted = [(e, 1, True) for e in sorted(args.experts)]
    wanted += [(largest, m, True) for m in sorted(args.token_multipliers) if m != 1]
    wanted += [(largest, 1, False)]  # REAM alone, to split REAM from GPTQ

    def key(row: dict) -> tuple:
        return row["experts"], row["token_multiplier"], row["gptq"]

    def save() -> dict:
        done = {key(r): r for r in rows}
        result = {
            **header(args),
            "model": {
                "layers": args.layers,
                "hidden": args.hidden,
                "expert_width": args.width,
                "top_k": args.top_k,
                "dtype": "float32",
            },
            "rows": rows,
            "complete": all(w in done for w in wanted),
            "by_experts": [done[w] for w in wanted if w[1:] == (1, True) and w in done],
            "by_tokens": [
                done[k]
                for k in sorted(done)
                if k[0] == largest and k[2] and k[1] in args.token_multipliers
            ],
            "ream_only_largest": done.get((largest, 1, False)),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        return result

    with tempfile.TemporaryDirectory() as tmp:
        for experts in sorted(args.experts):
            todo = [w for w in wanted if w[0] == experts]
            todo = [w for w in todo if w not in {key(r) for r in rows}]
            if not todo:
                continue
            model_dir = Path(tmp) / f"e{experts}"
            build_model(model_dir, experts, args)
            for _, multiplier, gptq in todo:
                row = {"experts": experts, "token_multiplier": multiplier, "gptq": gptq}
                load_before = os.getloadavg()[0]
                row.update(run_child(model_dir, multiplier, args, no_gptq=not gptq))
                # times are only comparable between rows run under similar load
                row["load_avg_1min"] = [
                    round(load_before, 2),
                    round(os.getloadavg()[0], 2),
                ]
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()
            shutil.rmtree(model_dir)
    result = save()
    if result["complete"]:
        plot(result, RESULTS / "scale.png")


if __name__ == "__main__":
    main()
