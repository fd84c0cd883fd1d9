"""
Quality of every method on the trained fixture, side by side, with identical
calibration data (issue 5 §2, without quantization for now).

    .venv/bin/python benchmarks/quality.py [--ratios 0.25 0.5] [--methods REAP ...]

Metrics, per domain of the fixture's held-out split:
- ``ppl``: perplexity on 64 packed rows of 128 tokens;
- ``mc``: choose the true 32-token continuation of a 64-token context (12 after
  20 for math) among 4 (three spans of other held-out documents), by summed
  log-likelihood;
- ``gen``: greedy exact match, on the arithmetic answer (math) and on the next
  line of held-out code (code).

Writes benchmarks/results/quality.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, quiet
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from transformers import AutoTokenizer

import ream_modifiers
from ream_modifiers.data.calibration import pack_rows, rows_dataset
from ream_modifiers.evaluation import perplexity, read_jsonl_texts
from ream_modifiers.moe import load_moe_model

FIXTURE = Path(__file__).parent / "fixture"
sys.path.insert(0, str(FIXTURE))
from corpus import build_corpus  # noqa: E402

METHODS = {
    "REAP": ream_modifiers.REAPModifier,
    "REAM": ream_modifiers.REAMModifier,
    "HC-SMoE": ream_modifiers.HCSMoEModifier,
    "M-SMoE": ream_modifiers.MSMoEModifier,
    "Frequency": ream_modifiers.FrequencyPruningModifier,
    "EAN": ream_modifiers.EANPruningModifier,
    "AIMER": ream_modifiers.AIMERModifier,
    "DERN": ream_modifiers.DERNModifier,
    "MoEITS": ream_modifiers.MoEITSModifier,
}


# (context, continuation) tokens; arithmetic documents are short
MC_WINDOW = {"math": (20, 12)}


def mc_items(tokenizer, texts, count, seed, context=64, continuation=32):
    rng = random.Random(seed)
    pieces = [
        ids
        for ids in (tokenizer(t)["input_ids"] for t in texts)
        if len(ids) >= context + continuation
    ]
    items = []
    for _ in range(count):
        doc = rng.randrange(len(pieces))
        ids = pieces[doc]
        start = rng.randrange(len(ids) - context - continuation + 1)
        others = rng.sample([i for i in range(len(pieces)) if i != doc], 3)
        candidates = [ids[start + context : start + context + continuation]]
        for other in others:
            o = pieces[other]
            s = rng.randrange(len(o) - continuation + 1)
            candidates.append(o[s : s + continuation])
        items.append((ids[start : start + context], candidates))
    return items


@torch.no_grad()
def mc_accuracy(model, items) -> float:
    correct = 0
    for context, candidates in items:
        batch = torch.tensor([context + c for c in candidates])
        logits = model(input_ids=batch).logits.float().log_softmax(-1)
        targets = batch[:, len(context) :]
        scores = (
            logits[:, len(context) - 1 : -1].gather(-1, targets[..., None]).sum((1, 2))
        )
        correct += int(scores.argmax()) == 0
    return correct / len(items)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new: int, stop: str) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, ids.shape[1] :])
    return text.split(stop)[0]


def gen_items(texts, domain, count, seed):
    rng = random.Random(seed)
    items = []
    if domain == "math":
        for text in rng.sample(texts, count):
            question, answer = text.split("\nAnswer:")
            final = answer.rsplit("The answer is", 1)[1].strip().rstrip(".")
            prompt = question + "\nAnswer:" + answer.rsplit("The answer is", 1)[0]
            items.append((prompt + "The answer is", " " + final))
    else:
        lines = [t.splitlines() for t in texts if len(t.splitlines()) > 8]
        while len(items) < count:
            doc = rng.choice(lines)
            i = rng.randrange(4, len(doc))
            if doc[i].strip():
                items.append(("\n".join(doc[:i]) + "\n", doc[i]))
    return items


def gen_accuracy(model, tokenizer, items, domain) -> float:
    stop = "." if domain == "math" else "\n"
    hits = 0
    for prompt, truth in items:
        got = greedy(model, tokenizer, prompt, 12 if domain == "math" else 24, stop)
        hits += got.strip() == truth.strip().rstrip(".")
    return hits / len(items)


def evaluate(model, tokenizer, heldout, tasks) -> dict:
    model.eval()
    result = {}
    for domain, texts in heldout.items():
        result[f"{domain}_ppl"] = round(perplexity(model, tokenizer, texts), 3)
        result[f"{domain}_mc"] = round(mc_accuracy(model, tasks["mc"][domain]), 3)
        if domain in tasks["gen"]:
            score = gen_accuracy(model, tokenizer, tasks["gen"][domain], domain)
            result[f"{domain}_gen"] = round(score, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--calibration-rows", type=int, default=64)
    args = parser.parse_args()
    quiet()
    model_dir = FIXTURE / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = {
        d: read_jsonl_texts(FIXTURE / "data" / f"{d}_heldout.jsonl")
        for d in ("general", "code", "math")
    }
    tasks = {
        "mc": {
            d: mc_items(tokenizer, t, args.items, 1, *MC_WINDOW.get(d, (64, 32)))
            for d, t in heldout.items()
        },
        "gen": {
            d: gen_items(heldout[d], d, args.items // 2, seed=2)
            for d in ("math", "code")
        },
    }
    # identical calibration for every method: equal thirds of the training split
    train = build_corpus()
    per_domain = args.calibration_rows // 3
    rows = []
    for domain in ("general", "code", "math"):
        rows += pack_rows(train[domain]["train"], tokenizer, per_domain, 128)
    calibration = rows_dataset(rows)

    def load():
        return load_moe_model(model_dir, dtype=torch.float32)

    table = [
        {
            "method": "original",
            "ratio": 0.0,
            **evaluate(load(), tokenizer, heldout, tasks),
        }
    ]
    print(table[-1], flush=True)
    for ratio in args.ratios:
        for name in args.methods:
            reset_session()
            model = load()
            start = time.perf_counter()
            oneshot(
                model=model,
                dataset=calibration,
                processor=tokenizer,
                recipe=[METHODS[name](sparsity=ratio)],
                num_calibration_samples=len(rows),
                max_seq_length=128,
            )
            seconds = time.perf_counter() - start
            row = {"method": name, "ratio": ratio, "seconds": round(seconds, 1)}
            row.update(evaluate(model, tokenizer, heldout, tasks))
            table.append(row)
            print(row, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "items": args.items, "rows": table}
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = [k for k in table[0] if k not in ("method", "ratio")]
    print("\n| method | removed | " + " | ".join(keys) + " | time (s) |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for row in table:
        values = " | ".join(str(row[k]) for k in keys)
        seconds = row.get("seconds", "")
        print(f"| {row['method']} | {row['ratio']:.0%} | {values} | {seconds} |")


if __name__ == "__main__":
    main()
