"""
Calibration cost of our statistics collector against llm-compressor's own REAP,
measured side by side in one process on the same random Qwen3-MoE and data, plus
AIMER's data-free scoring time.

    .venv/bin/python benchmarks/bench_calibration.py [--layers 4 --experts 32]

Writes benchmarks/results/calibration.json and prints a Markdown table. Timings
are the best of ``--repeats`` alternating runs, so machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
from loguru import logger
from transformers import AutoTokenizer

import ream_modifiers  # noqa: F401
from ream_modifiers import AIMERModifier, REAPModifier
from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.moe import load_moe_model
from ream_modifiers.tiny import build_tiny_moe

RESULTS = Path(__file__).parent / "results"


def run(model_dir, dataset, tokenizer, modifier, args, all_experts: bool) -> float:
    reset_session()
    model = load_moe_model(model_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
        moe_calibrate_all_experts=all_experts,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_moe(
            "qwen3_moe",
            model_dir,
            num_hidden_layers=args.layers,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            hidden_size=args.hidden,
            moe_intermediate_size=args.hidden,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dataset = build_calibration_dataset(
            "bundled", tokenizer, args.samples, args.seq_len
        )
        rows = []
        for all_experts in (True, False):
            best = {"upstream REAPPruningModifier": [], "ours REAPModifier": []}
            for _ in range(args.repeats):
                best["upstream REAPPruningModifier"].append(
                    run(
                        model_dir,
                        dataset,
                        tokenizer,
                        REAPPruningModifier(sparsity=0.25),
                        args,
                        all_experts,
                    )
                )
                best["ours REAPModifier"].append(
                    run(
                        model_dir,
                        dataset,
                        tokenizer,
                        REAPModifier(sparsity=0.25),
                        args,
                        all_experts,
                    )
                )
            upstream = min(best["upstream REAPPruningModifier"])
            ours = min(best["ours REAPModifier"])
            rows.append(
                {
                    "moe_calibrate_all_experts": all_experts,
                    "upstream_s": round(upstream, 3),
                    "ours_s": round(ours, 3),
                    "ours_over_upstream": round(ours / upstream, 3),
                }
            )
        aimer = min(
            run(model_dir, dataset, tokenizer, AIMERModifier(sparsity=0.25), args, True)
            for _ in range(args.repeats)
        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "model": {
            k: getattr(args, k) for k in ("layers", "experts", "top_k", "hidden")
        },
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "reap": rows,
        "aimer_oneshot_s": round(aimer, 3),
        "peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        "\n| calibrate all experts | upstream REAP (s) | ours (s) | ours / upstream |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['moe_calibrate_all_experts']} | {row['upstream_s']} | "
            f"{row['ours_s']} | {row['ours_over_upstream']} |"
        )


if __name__ == "__main__":
    main()
