"""
Saliency and merge ablations on the trained fixture, scored by held-out
perplexity recovery (issue 12 §1 and §3).

    cd benchmarks && ../.venv/bin/python ablation.py [--ratio 0.5]
        [--only LABEL ...] [--resume]

Every row compresses the fixture in fp32 with one modifier, on the calibration
rows of ``quality.py``, and scores the compressed model in memory on the held-out
rows of ``heldout.py``. Rows:

- ``<saliency> prune``: ``REAPModifier(saliency=...)``, pruning by that score;
- ``<saliency> merge``: ``REAMModifier(saliency=..., verify_merges=False)``,
  merging every group with it (the reference's behaviour);
- ``<saliency> merge+verify``: the same, keeping only the merges that reduce the
  replayed layer's output error (``verify_merges=True``);
- ``REAM default``: ``REAMModifier()``; extra rows from ``--extra``.

Writes ``results/ablation_<pct>.json`` after every row and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time

import render
import torch
from common import RESULTS, quiet
from heldout import heldout_perplexity, heldout_texts, ppl_recovery
from quality import FIXTURE, calibration_rows, compress_fixture
from transformers import AutoTokenizer

import ream_modifiers
from ream_modifiers.data.calibration import rows_dataset
from ream_modifiers.moe import load_moe_model

SALIENCIES = ("reap", "ream", "ream_tokens", "frequency", "ean", "weighted_frequency")


def rows() -> dict[str, tuple[type, dict]]:
    """``{label: (modifier class, fields)}`` of every ablation row."""
    table: dict[str, tuple[type, dict]] = {}
    for name in SALIENCIES:
        table[f"{name} prune"] = (ream_modifiers.REAPModifier, {"saliency": name})
        merge = {"saliency": name, "verify_merges": False}
        table[f"{name} merge"] = (ream_modifiers.REAMModifier, merge)
        verify = {"saliency": name, "verify_merges": True}
        table[f"{name} merge+verify"] = (ream_modifiers.REAMModifier, verify)
    table["REAM default"] = (ream_modifiers.REAMModifier, {})
    return table


def run(modifier, calibration, tokenizer, count: int, texts) -> dict:
    model, seconds = compress_fixture([modifier], calibration, tokenizer, count)
    scores = heldout_perplexity(model, tokenizer, texts)
    return {**scores, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument(
        "--extra",
        default=None,
        help="JSON {label: [class name, {fields}]} of extra rows to run",
    )
    args = parser.parse_args()
    quiet()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    ids = calibration_rows(tokenizer, args.calibration_rows)
    calibration = rows_dataset(ids)
    texts = heldout_texts()
    output = RESULTS / f"ablation_{round(args.ratio * 1000):d}.json"
    result = {"ratio": args.ratio, "calibration_rows": len(ids), "rows": {}}
    if args.resume and output.is_file():
        result = json.loads(output.read_text())
    original = load_moe_model(FIXTURE / "model", dtype=torch.float32)
    result["original"] = heldout_perplexity(original, tokenizer, texts)
    del original
    table = rows()
    if args.extra:
        for label, (cls, fields) in json.loads(args.extra).items():
            table[label] = (getattr(ream_modifiers, cls), fields)
    for label, (cls, fields) in table.items():
        if args.only and label not in args.only:
            continue
        if args.resume and label in result["rows"]:
            continue
        modifier = cls(sparsity=args.ratio, **fields)
        row = run(modifier, calibration, tokenizer, len(ids), texts)
        row["modifier"], row["fields"] = cls.__name__, fields
        row["recovery"] = ppl_recovery(row, result["original"])
        result["rows"][label] = row
        result["date"] = time.strftime("%Y-%m-%d")
        RESULTS.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(label, json.dumps(row["recovery"]), f"{row['seconds']}s", flush=True)
    print("\n" + render.ablation())


if __name__ == "__main__":
    main()
