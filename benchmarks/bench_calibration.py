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
import resource
import tempfile
from pathlib import Path

from common import RESULTS, build, header, model_arguments, quiet, timed_oneshot
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

from ream_modifiers import AIMERModifier, REAPModifier


def main() -> None:
    parser = argparse.ArgumentParser()
    model_arguments(parser, experts=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as model_dir:
        tokenizer, dataset = build(Path(model_dir), args)
        rows = []
        for all_experts in (True, False):
            upstream, ours = [], []
            for _ in range(args.repeats):
                for times, modifier in (
                    (upstream, REAPPruningModifier(sparsity=0.25)),
                    (ours, REAPModifier(sparsity=0.25)),
                ):
                    times.append(
                        timed_oneshot(
                            model_dir,
                            dataset,
                            tokenizer,
                            modifier,
                            args,
                            moe_calibrate_all_experts=all_experts,
                        )
                    )
            rows.append(
                {
                    "moe_calibrate_all_experts": all_experts,
                    "upstream_s": round(min(upstream), 3),
                    "ours_s": round(min(ours), 3),
                    "ours_over_upstream": round(min(ours) / min(upstream), 3),
                }
            )
        aimer = min(
            timed_oneshot(
                model_dir, dataset, tokenizer, AIMERModifier(sparsity=0.25), args
            )
            for _ in range(args.repeats)
        )
    result = {
        **header(args),
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
