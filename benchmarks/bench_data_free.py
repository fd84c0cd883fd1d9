"""
Cost of the weight-only and neuron-level steps on one layer of realistic width:
MoEITS's NMI matrix, AIMER's scores, and DERN's segment search and k-means.

    .venv/bin/python benchmarks/bench_data_free.py [--experts 128 --hidden 512]

Writes benchmarks/results/data_free.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS

from ream_modifiers.modifiers.aimer.score import aimer_score
from ream_modifiers.modifiers.dern.recombine import assign_segments, recombine_expert
from ream_modifiers.modifiers.moeits.nmi import layer_nmi
from ream_modifiers.moe.layer import ExpertWeights


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--bins", type=int, default=64)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    e, h, m = args.experts, args.hidden, args.width
    weights = ExpertWeights(
        gate=torch.randn(e, m, h, generator=generator, dtype=torch.float32),
        up=torch.randn(e, m, h, generator=generator, dtype=torch.float32),
        down=torch.randn(e, h, m, generator=generator, dtype=torch.float32),
    )
    matrices = {"gate": weights.gate, "up": weights.up, "down": weights.down}
    nmi_s, _ = timed(
        lambda: layer_nmi(matrices, {"gate": 0.2, "up": 0.4, "down": 0.4}, args.bins)
    )
    aimer_s, _ = timed(lambda: aimer_score(weights.matrices()))
    kept, dropped = list(range(e // 2)), list(range(e // 2, e))
    search_s, transfers = timed(
        lambda: assign_segments(weights, dropped[:8], kept, threshold=-1.0)
    )
    importance = torch.rand(e, generator=generator)
    target = max(transfers, key=lambda r: len(transfers[r]))
    kmeans_s, _ = timed(
        lambda: recombine_expert(weights, target, transfers[target], importance)
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "CPU, " + str(torch.get_num_threads()) + " threads",
        "layer": {"experts": e, "hidden": h, "width": m, "bins": args.bins},
        "moeits_nmi_layer_s": round(nmi_s, 3),
        "aimer_layer_s": round(aimer_s, 4),
        "dern_search_8_dropped_vs_half_kept_s": round(search_s, 3),
        "dern_kmeans_one_expert_s": round(kmeans_s, 3),
        "dern_kmeans_points": m + len(transfers[target]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_free.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
