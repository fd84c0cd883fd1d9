"""
REAM merging cost on a random Qwen3-MoE, side by side with REAP pruning on the
same model and data: whole-calibration wall time, per-layer merge/alignment time
from the report, and the activation-sample memory bound.

    .venv/bin/python benchmarks/bench_merge.py [--experts 64 --hidden 256]

Writes benchmarks/results/merge.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from loguru import logger
from transformers import AutoTokenizer

import ream_modifiers  # noqa: F401
from ream_modifiers import REAMModifier, REAPModifier
from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.moe import load_moe_model
from ream_modifiers.tiny import build_tiny_moe

RESULTS = Path(__file__).parent / "results"


def run(model_dir, dataset, tokenizer, modifier, args) -> tuple[float, dict]:
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
    )
    seconds = time.perf_counter() - start
    return seconds, json.loads(Path(modifier.report_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--activation-tokens", type=int, default=1024)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
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
        reap_s, _ = run(
            model_dir,
            dataset,
            tokenizer,
            REAPModifier(sparsity=0.5, report_path=f"{work}/reap.json"),
            args,
        )
        ream_s, report = run(
            model_dir,
            dataset,
            tokenizer,
            REAMModifier(
                sparsity=0.5,
                max_activation_tokens=args.activation_tokens,
                report_path=f"{work}/ream.json",
            ),
            args,
        )
    layers = report["layers"].values()
    samples_bytes = args.experts * args.activation_tokens * args.hidden * 4
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "model": {
            k: getattr(args, k) for k in ("layers", "experts", "top_k", "hidden")
        },
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "reap_50_s": round(reap_s, 3),
        "ream_50_s": round(ream_s, 3),
        "ream_over_reap": round(ream_s / reap_s, 3),
        "ream_layer_seconds": [e["seconds"] for e in layers],
        "ream_alignment_seconds": [e["alignment_seconds"] for e in layers],
        "merged_group_sizes": [
            sorted((len(m) + 1 for m in e["groups"].values()), reverse=True)
            for e in layers
        ],
        "activation_samples_mib_per_layer": round(samples_bytes / 2**20, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
