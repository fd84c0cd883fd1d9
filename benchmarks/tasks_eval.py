"""
Run the ``mini_moe_*`` lm-eval tasks (``benchmarks/tasks/``) on a model held in
memory, and turn lm-eval's results into the flat metrics the tables use.

The task YAMLs are the definitions; this module only calls lm-eval on them, so a
row of our tables is what ``lm_eval --include_path benchmarks/tasks --tasks
mini_moe`` reports for the same model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

TASKS = Path(__file__).parent / "tasks"
DOMAINS = ("general", "code", "math")

# metric name in our tables -> (task, lm-eval metric key); ``up`` = higher is better
METRICS = {
    **{f"{d}_ppl": (f"mini_moe_ppl_{d}", "byte_perplexity,none") for d in DOMAINS},
    **{f"{d}_mc": (f"mini_moe_mc_{d}", "acc,none") for d in DOMAINS},
    "math_gen": ("mini_moe_gen_math", "exact_match,final_answer"),
    "code_gen": ("mini_moe_gen_code", "exact_match,none"),
}
HIGHER_IS_BETTER = {name: not name.endswith("_ppl") for name in METRICS}


def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


@torch.no_grad()
def evaluate(model, tokenizer, tasks: list[str] | None = None) -> dict[str, float]:
    """
    :param model: a causal LM in memory (compressed or not)
    :param tokenizer: its tokenizer
    :param tasks: metric names from ``METRICS``; all of them by default
    :return: ``{metric: value}`` rounded to 4 decimals
    """
    _offline()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = list(tasks or METRICS)
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=64,
        device=str(next(model.parameters()).device),
    )
    output = simple_evaluate(
        model=lm,
        tasks=sorted({METRICS[n][0] for n in names}),
        task_manager=TaskManager(include_path=str(TASKS), verbosity="ERROR"),
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    results = output["results"]
    return {n: round(float(results[METRICS[n][0]][METRICS[n][1]]), 4) for n in names}


def recovery(row: dict, original: dict) -> dict[str, float]:
    """Per metric, the row relative to the original in % (100 = unchanged;
    for perplexities original / row, so lower perplexity also scores higher)."""
    out = {}
    for name in METRICS:
        if name not in row or not original.get(name):
            continue
        value, base = row[name], original[name]
        ratio = value / base if HIGHER_IS_BETTER[name] else base / value
        out[name] = round(100 * ratio, 1)
    return out
