"""
Calibrate once, then compress many times; uniform against per-layer budgets
(issue 17), on the trained fixture, side by side in one run.

    cd benchmarks && ../.venv/bin/python budget.py [--ratios 0.375 0.5]
        [--methods REAP REAM]

For each method and ratio, four rows, each scored in memory (fp32) on the
held-out texts of ``quality.py``:

- ``direct``: one oneshot that calibrates layer L after layers < L were
  reduced (what ``quality.py`` reports);
- ``from original stats, uniform``: decided from statistics recorded once on
  the unreduced model (``ExpertStatisticsModifier``), no forward pass;
- ``... saliency_fraction`` and ``... saliency_mass``: the same statistics,
  the same total number of experts, spread over the layers by
  :mod:`ream_modifiers.engines.allocation`.

It also records the statistics round trip: a direct run that saves its own
statistics, compressed again from them, must give bit-identical weights.
Writes ``results/budget.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, quiet
from heldout import heldout_perplexity, ppl_recovery
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from quality import FIXTURE, METHODS, calibration_rows
from transformers import AutoTokenizer

from ream_modifiers import ExpertStatisticsModifier
from ream_modifiers.data.calibration import rows_dataset
from ream_modifiers.moe import load_moe_model

BUDGETS = ("uniform", "saliency_fraction", "saliency_mass")


def run(recipe: list, calibration=None, rows: int = 0):
    """The fixture in fp32 after one oneshot of ``recipe``; (model, seconds)."""
    reset_session()
    model = load_moe_model(FIXTURE / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    start = time.perf_counter()
    data = dict(dataset=calibration, num_calibration_samples=rows) if rows else {}
    oneshot(model=model, recipe=recipe, processor=tokenizer, max_seq_length=128, **data)
    return model, time.perf_counter() - start


def kept_per_layer(model) -> list[int]:
    from ream_modifiers.moe import find_moe_layers

    return [layer.num_experts for layer in find_moe_layers(model)]


def score(model, tokenizer, original: dict | None) -> dict:
    model.eval()
    with torch.no_grad():
        scores = heldout_perplexity(model, tokenizer)
    if original is not None:
        scores["heldout_recovery"] = ppl_recovery(scores, original)
    return scores


def same_weights(a, b) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(
        torch.equal(left[k], right[k]) for k in left
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.375, 0.5])
    parser.add_argument("--methods", nargs="+", default=["REAP", "REAM"])
    parser.add_argument("--calibration-rows", type=int, default=64)
    args = parser.parse_args()
    quiet()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    rows = calibration_rows(tokenizer, args.calibration_rows)
    calibration = rows_dataset(rows)
    n = len(rows)
    work = Path(tempfile.mkdtemp(prefix="ream-budget-"))
    original_model = load_moe_model(FIXTURE / "model", dtype=torch.float32)
    original = score(original_model, tokenizer, None)
    del original_model
    table: list[dict] = []
    result = {"date": time.strftime("%Y-%m-%d"), "original": original, "rows": table}

    stats = work / "original"
    recorder = ExpertStatisticsModifier(
        save_statistics=str(stats), methods={m: {} for m in args.methods}
    )
    _, seconds = run([recorder], calibration, n)
    result["calibrate_seconds"] = round(seconds, 1)

    for method in args.methods:
        cls = METHODS[method]
        for ratio in args.ratios:
            # the direct run saves its own statistics: compressing again from
            # them must reproduce it bit for bit
            saved = work / f"{method}-{ratio}-direct"
            direct, direct_seconds = run(
                [cls(sparsity=ratio, save_statistics=str(saved))], calibration, n
            )
            replay, _ = run([cls(sparsity=ratio, from_statistics=str(saved))])
            identical = result.setdefault("round_trip_bit_identical", {})
            identical[f"{method} {ratio}"] = same_weights(direct, replay)
            del replay
            rows_here = [("direct", direct, direct_seconds)]
            for budget in BUDGETS:
                modifier = cls(
                    sparsity=ratio, from_statistics=str(stats), budget=budget
                )
                model, seconds = run([modifier])
                rows_here.append((f"original stats, {budget}", model, seconds))
            for variant, model, seconds in rows_here:
                row = {
                    "method": method,
                    "ratio": ratio,
                    "variant": variant,
                    "kept_per_layer": kept_per_layer(model),
                    "seconds": round(seconds, 1),
                    **score(model, tokenizer, original),
                }
                table.append(row)
                print(json.dumps(row), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "budget.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


def render(result: dict) -> str:
    lines = [
        "| method | removed | variant | kept per layer | held-out recovery "
        "(mean) | general | code | math | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        rec = row["heldout_recovery"]
        lines.append(
            f"| {row['method']} | {row['ratio']:.1%} | {row['variant']} | "
            f"{row['kept_per_layer']} | **{rec['mean']:.3f}** | {rec['general']:.3f} "
            f"| {rec['code']:.3f} | {rec['math']:.3f} | {row['seconds']} |"
        )
    lines.append(
        f"\ncalibration once: {result['calibrate_seconds']} s; round trip "
        f"bit-identical: {result.get('round_trip_bit_identical')}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
