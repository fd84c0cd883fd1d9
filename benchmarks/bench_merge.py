"""
REAM merging cost on a random Qwen3-MoE, side by side with REAP pruning on the
same model and data: whole-calibration wall time, per-layer merge/alignment time
from the report, and the activation-sample memory bound.

    .venv/bin/python benchmarks/bench_merge.py [--experts 64 --hidden 256]

Writes benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, build, header, model_arguments, quiet, timed_oneshot

from ream_modifiers import REAMModifier, REAPModifier


def main() -> None:
    parser = argparse.ArgumentParser()
    model_arguments(parser, experts=64)
    parser.add_argument("--activation-tokens", type=int, default=1024)
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        tokenizer, dataset = build(model_dir, args)
        reap = REAPModifier(sparsity=0.5)
        reap_s = timed_oneshot(model_dir, dataset, tokenizer, reap, args)
        ream = REAMModifier(
            sparsity=0.5,
            max_activation_tokens=args.activation_tokens,
            report_path=f"{work}/ream.json",
        )
        ream_s = timed_oneshot(model_dir, dataset, tokenizer, ream, args)
        layers = list(json.loads(Path(ream.report_path).read_text())["layers"].values())
    samples_bytes = args.experts * args.activation_tokens * args.hidden * 4
    result = {
        **header(args),
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
