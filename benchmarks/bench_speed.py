"""
Speed ratios of issue 5 §4, each measured side by side in one process:

1. AIMER scoring time / the memory-read floor, on one layer of Qwen3-30B-A3B
   shape (128 experts, hidden 2048, expert width 768, bf16). The floor is a plain
   reduction (``w.sum(dtype=float32)``) over the same weight tensors. Goal <= 1.5.
   Also reported: the bytes' raw read time (an int16 max, which needs no
   conversion), against which the bf16 -> fp32 conversion itself is compute.
2. Calibration overhead: a REAP, REAM or DERN ``oneshot`` / the same ``oneshot``
   with a do-nothing modifier that still requires calibration (so llm-compressor
   runs the identical sequential pipeline and forward passes). Goal <= 1.25 for
   REAP; REAM and DERN are reported.

    .venv/bin/python benchmarks/bench_speed.py [--repeats 3]

Timings are the best of ``--repeats``, with the contenders alternating inside
each repeat so machine noise hits all of them. Writes results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, build, header, model_arguments, quiet, timed_oneshot
from llmcompressor.modifiers import Modifier

from ream_modifiers import DERNModifier, REAMModifier, REAPModifier
from ream_modifiers.modifiers.aimer import score as aimer_kernel
from ream_modifiers.modifiers.aimer.score import aimer_score, aimer_score_experts


class NoOpCalibrationModifier(Modifier):
    """Asks for calibration data and does nothing with it: the baseline pass."""

    requires_calibration_data: bool = True

    def on_initialize(self, state, **kwargs) -> bool:
        return True


def best_of(repeats: int, contenders: dict) -> dict[str, float]:
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def aimer_ratio(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    shapes = [(args.width, args.layer_hidden)] * 2 + [(args.layer_hidden, args.width)]
    experts = [
        [torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in shapes]
        for _ in range(args.layer_experts)
    ]
    flat = [w for weights in experts for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in flat)

    def floor():
        return [w.sum(dtype=torch.float32) for w in flat]

    def raw_read():  # the bytes alone: an integer max, vectorised, no conversion
        return [w.view(torch.int16).max() for w in flat]

    def streamed():
        return aimer_score_experts(experts)

    def stacked():  # what the modifier did before: stack copies, then score
        return aimer_score([torch.stack(ws) for ws in zip(*experts, strict=True)])

    def with_block(elements: int):  # the CPU kernel at another block size
        def run():
            default = aimer_kernel._CPU_BLOCK
            aimer_kernel._CPU_BLOCK = elements
            try:
                return streamed()
            finally:
                aimer_kernel._CPU_BLOCK = default

        return run

    blocks = {f"aimer_block_{n // 1024}k": with_block(n) for n in (1 << 16, 1 << 20)}
    timings = best_of(
        args.repeats,
        {"floor": floor, "raw_read": raw_read, "aimer": streamed, **blocks},
    )
    stacked_s = best_of(1, {"stacked": stacked})["stacked"]
    return {
        "layer": {
            "experts": args.layer_experts,
            "hidden": args.layer_hidden,
            "width": args.width,
            "dtype": "bfloat16",
            "weight_gib": round(nbytes / 2**30, 3),
        },
        "floor_s": round(timings["floor"], 4),
        "aimer_s": round(timings["aimer"], 4),
        "aimer_over_floor": round(timings["aimer"] / timings["floor"], 3),
        "raw_read_s": round(timings["raw_read"], 4),
        "aimer_over_raw_read": round(timings["aimer"] / timings["raw_read"], 3),
        "aimer_s_by_block": {
            f"{aimer_kernel._CPU_BLOCK // 1024}k (default)": round(timings["aimer"], 4),
            **{
                name.removeprefix("aimer_block_"): round(timings[name], 4)
                for name in blocks
            },
        },
        "stack_then_score_s": round(stacked_s, 4),
        "stack_then_score_over_floor": round(stacked_s / timings["floor"], 3),
        "goal": 1.5,
    }


def calibration_overhead(args) -> dict:
    modifiers = {
        "no-op": lambda: NoOpCalibrationModifier(),
        "REAP": lambda: REAPModifier(sparsity=0.25),
        "REAM": lambda: REAMModifier(sparsity=0.25),
        "DERN": lambda: DERNModifier(sparsity=0.25),
    }
    with tempfile.TemporaryDirectory() as model_dir:
        tokenizer, dataset = build(Path(model_dir), args)

        def run(make):
            return lambda: timed_oneshot(model_dir, dataset, tokenizer, make(), args)

        run(modifiers["no-op"])()  # warm-up: first-call imports and allocations
        timings = best_of(args.repeats, {n: run(m) for n, m in modifiers.items()})
    base = timings["no-op"]
    return {
        "seconds": {n: round(t, 3) for n, t in timings.items()},
        "over_no_op": {n: round(t / base, 3) for n, t in timings.items()},
        "goal_reap": 1.25,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    model_arguments(parser, experts=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-experts", type=int, default=128)
    parser.add_argument("--layer-hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument(
        "--only", choices=["aimer", "calibration"], help="run one of the two parts"
    )
    args = parser.parse_args()
    quiet()
    result = dict(header(args))
    if args.only != "calibration":
        result["aimer"] = aimer_ratio(args)
    if args.only != "aimer":
        result["calibration_overhead"] = calibration_overhead(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"speed_{args.only}.json" if args.only else "speed.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
