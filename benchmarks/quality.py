"""
Quality of every method on the trained fixture, side by side, with identical
calibration data, without and with W4A16 GPTQ (issue 5 §2).

    cd benchmarks && ../.venv/bin/python quality.py [--ratios 0.25 0.5]
        [--methods REAP ...] [--no-quant] [--resume]

Every row is compressed from the fixture in fp32, saved with llm-compressor
(compressed-tensors), reloaded with ``AutoModelForCausalLM`` (the checkpoint a
user would serve) and scored by lm-eval on the ``mini_moe`` tasks in
``benchmarks/tasks/`` (see ``tasks_eval.py``). Checkpoint size is counted as a
bf16 checkpoint (floating tensors at 2 bytes, packed integers as stored), the
fixture's own dtype. The W4A16 rows use the GPTQ stage of ``recipes/*_w4a16.yaml``
after the method at its default settings, so plain and W4A16 rows differ only by
quantization.

Writes ``results/quality.json`` after every row (``--resume`` skips rows already
there), ``results/quality.png``, and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import render
import torch
from common import RESULTS, gptq_stage, quiet
from heldout import heldout_perplexity, ppl_recovery
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open
from tasks_eval import evaluate, recovery
from transformers import AutoModelForCausalLM, AutoTokenizer

from ream_modifiers.data.calibration import pack_rows, rows_dataset
from ream_modifiers.moe import load_moe_model
from ream_modifiers.registry import methods

FIXTURE = Path(__file__).parent / "fixture"
sys.path.insert(0, str(FIXTURE))
from corpus import build_corpus  # noqa: E402

# every registered method, by its display name
METHODS = {method.label: method.modifier for method in methods()}


def calibration_rows(tokenizer, count: int, seq_len: int = 128) -> list:
    """Equal thirds of the fixture's training split, packed (identical for all)."""
    train = build_corpus()
    rows = []
    for domain in ("general", "code", "math"):
        rows += pack_rows(train[domain]["train"], tokenizer, count // 3, seq_len)
    return rows


def checkpoint_mib(directory: Path) -> float:
    """Size as a bf16 checkpoint: floating tensors at 2 bytes, others as stored."""
    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                numel = 1
                for size in tensor.get_shape():
                    numel *= size
                dtype = tensor.get_dtype()
                width = 2 if dtype in ("F32", "F16", "BF16", "F64") else None
                if width is None:
                    width = handle.get_tensor(name).element_size()
                total += numel * width
    return round(total / 2**20, 2)


def score_checkpoint(directory: Path, tokenizer, lm_eval: bool = True) -> dict:
    """Held-out perplexity per domain (the headline), then the lm-eval tasks."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    scores = heldout_perplexity(model, tokenizer)
    if lm_eval:
        scores.update(evaluate(model, tokenizer))
    return scores


def compress_fixture(recipe: list, calibration, tokenizer, count: int) -> tuple:
    """``(model, seconds)``: the fixture in fp32 after one ``oneshot`` of
    ``recipe`` on ``count`` calibration rows of 128 tokens."""
    reset_session()
    model = load_moe_model(FIXTURE / "model", dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=calibration,
        processor=tokenizer,
        recipe=recipe,
        num_calibration_samples=count,
        max_seq_length=128,
    )
    return model, time.perf_counter() - start


def compress_and_score(
    recipe: list, calibration, tokenizer, count: int, lm_eval: bool = True
) -> dict:
    """Compress the fixture with ``recipe``, save, reload and score the checkpoint."""
    model, seconds = compress_fixture(recipe, calibration, tokenizer, count)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        row = {"mib": checkpoint_mib(Path(out)), "seconds": round(seconds, 1)}
        row.update(score_checkpoint(Path(out), tokenizer, lm_eval))
    return row


def method_recipe(
    name: str, ratio: float, quant: bool, settings: dict | None = None
) -> list:
    """
    The recipe of one row: the method at ``ratio`` (with ``settings``, its
    fields beyond the defaults) and, with ``quant``, the W4A16 GPTQ stage.
    """
    recipe = [METHODS[name](sparsity=ratio, **(settings or {}))]
    if quant:
        recipe.append(GPTQModifier(**gptq_stage()))
    return recipe


def label(row: dict) -> str:
    return f"{row['method']}|{row['ratio']}|{row['quant']}"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    variants = sorted(
        {(r["ratio"], r["quant"]) for r in rows if r["method"] != "original"}
    )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / max(len(variants), 1)
    for i, (ratio, quant) in enumerate(variants):
        by_method = {
            r["method"]: r for r in rows if (r["ratio"], r["quant"]) == (ratio, quant)
        }
        xs = [j + i * width for j, m in enumerate(methods) if m in by_method]
        present = [m for m in methods if m in by_method]
        text = f"{ratio:.0%} removed, {quant}"
        top.bar(
            xs,
            [by_method[m]["heldout_recovery"]["mean"] for m in present],
            width,
            label=text,
        )
        bottom.bar(xs, [by_method[m]["mib"] for m in present], width, label=text)
    original = next(r for r in rows if r["method"] == "original")
    top.axhline(1.0, color="black", linewidth=0.8)
    bottom.axhline(original["mib"], color="black", linewidth=0.8)
    top.set_ylabel("held-out perplexity recovery (mean of 3 domains)")
    bottom.set_ylabel("checkpoint size (MiB, bf16)")
    bottom.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
    top.legend(fontsize=8, ncol=2)
    top.set_title("Fixture (Qwen3-MoE, 32 experts, top-4): quality and size per method")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--no-quant", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--tag",
        default="",
        help="write results/quality_<tag>.json instead (e.g. a variant run)",
    )
    parser.add_argument("--only-quant", choices=["bf16", "W4A16"], default=None)
    parser.add_argument(
        "--no-lm-eval",
        action="store_true",
        help="score held-out perplexity only (the headline; minutes faster a row)",
    )
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument(
        "--settings",
        type=json.loads,
        default={},
        help='JSON {method: {field: value}}, e.g. \'{"REAM": {"pca_method": '
        '"exact"}}\' (a variant run: use with --tag)',
    )
    args = parser.parse_args()
    quiet()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    rows_ids = calibration_rows(tokenizer, args.calibration_rows)
    calibration = rows_dataset(rows_ids)
    done = {}
    output = RESULTS / f"quality{'_' + args.tag if args.tag else ''}.json"
    if args.resume and output.is_file():
        done = {label(r): r for r in json.loads(output.read_text())["rows"]}
    table = []

    def record(row: dict) -> None:
        original = table[0] if table else row
        row["recovery"] = recovery(row, original)
        values = row["recovery"].values()
        row["recovery_mean"] = (
            round(sum(values) / len(values), 1) if row["recovery"] else None
        )
        row["heldout_recovery"] = ppl_recovery(row, original)
        table.append(row)
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "calibration": {"rows": len(rows_ids), "seq_len": 128},
            "rows": table,
        }
        output.write_text(json.dumps(result, indent=2) + "\n")

    base = {"method": "original", "ratio": 0.0, "quant": "bf16"}
    if label(base) in done:
        record(done[label(base)])
    else:
        scores = score_checkpoint(FIXTURE / "model", tokenizer, not args.no_lm_eval)
        record({**base, "mib": checkpoint_mib(FIXTURE / "model"), **scores})
    quants = ("bf16",) if args.no_quant else ("bf16", "W4A16")
    if args.only_quant:
        quants = (args.only_quant,)
    for quant in quants:
        for ratio in args.ratios:
            for name in args.methods:
                key = {"method": name, "ratio": ratio, "quant": quant}
                if label(key) in done:
                    record(done[label(key)])
                    continue
                recipe = method_recipe(
                    name, ratio, quant == "W4A16", args.settings.get(name)
                )
                row = compress_and_score(
                    recipe, calibration, tokenizer, len(rows_ids), not args.no_lm_eval
                )
                record({**key, **row})
    if not args.tag:
        chart(table, RESULTS / "quality.png")
    print("\n" + render.quality(output.stem))


if __name__ == "__main__":
    main()
