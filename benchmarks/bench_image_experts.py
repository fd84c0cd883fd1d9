"""
Do the experts that serve image tokens go first when a vision-language MoE is
calibrated on text alone? On tiny random Qwen3-VL-MoE models (several seeds),
REAP and REAM at 50% are run through ``compress`` twice: on text only, and with
``--images bundled`` (a quarter of the rows carry an image). For each run:

- which share of each layer's *image experts* was removed (the quarter of the
  experts whose share of top-k picks is largest on image tokens relative to
  text tokens, on held-out image rows of the original model);
- the KL divergence of the reduced model's next-token distribution from the
  original's, on held-out image rows (caption positions, after the image) and
  on held-out text rows.

    .venv/bin/python benchmarks/bench_image_experts.py [--seeds 4 --sparsity 0.5]

Writes benchmarks/results/image_experts.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import RESULTS
from llmcompressor.core import reset_session
from transformers import AutoConfig, AutoTokenizer

from ream_modifiers.cli import compress
from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.data.images import (
    build_image_rows,
    collate_calibration_row,
    load_image_processor,
)
from ream_modifiers.moe.auto import auto_model_class
from ream_modifiers.moe.conversions import per_expert_checkpoints
from ream_modifiers.tiny import build_tiny_moe

FAMILY = "qwen3_vl_moe"
METHODS = {"REAP": "REAPModifier", "REAM": "REAMModifier"}
HELD_OUT_SEED = 1234  # image order of the evaluation rows, not the calibration's


def _recipe(directory: Path, method: str, sparsity: float) -> Path:
    path = directory / f"{method}.yaml"
    path.write_text(
        f"reduce_stage:\n  reduce_modifiers:\n    {METHODS[method]}:\n"
        f"      sparsity: {sparsity}\n"
    )
    return path


def _load(directory: Path):
    config = AutoConfig.from_pretrained(directory)
    with per_expert_checkpoints(FAMILY):
        model = auto_model_class(config).from_pretrained(directory)
    return model.eval()


def _eval_rows(source: Path, rows: int, length: int) -> tuple[list, list]:
    """Held-out image rows and text rows, collated as the model's inputs."""
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    images = build_image_rows(
        config, tokenizer, load_image_processor(str(source)), "bundled", rows,
        length, seed=HELD_OUT_SEED,
    )  # fmt: skip
    # rows the calibration (the first num_samples bundled rows) did not see
    text = build_calibration_dataset("bundled", tokenizer, 8 * rows, length)
    image_inputs = [collate_calibration_row([row]) for row in images]
    text_inputs = [
        collate_calibration_row([{**row, "mm_token_type_ids": [0] * length}])
        for row in text.select(range(7 * rows, 8 * rows))
    ]
    return image_inputs, text_inputs


@torch.no_grad()
def _router_picks(model, inputs: list[dict]) -> dict[int, torch.Tensor]:
    """Per layer: (2, experts) top-k pick counts on text and image tokens."""
    config = model.config.text_config
    layers = model.model.language_model.layers
    picks = {i: torch.zeros(2, config.num_experts) for i in range(len(layers))}
    current: dict[str, torch.Tensor] = {}

    def hook(index):
        def record(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            top = logits.reshape(-1, config.num_experts).topk(
                config.num_experts_per_tok, dim=-1
            )
            is_image = current["types"].reshape(-1).bool()
            for kind in (0, 1):
                chosen = top.indices[is_image == bool(kind)].reshape(-1)
                picks[index][kind] += torch.bincount(
                    chosen, minlength=config.num_experts
                ).float()

        return record

    handles = [
        layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    for row in inputs:
        current["types"] = row["mm_token_type_ids"]
        model(**row)
    for handle in handles:
        handle.remove()
    return picks


def _image_experts(picks: dict[int, torch.Tensor], share: float) -> dict[int, set]:
    """Per layer, the experts picked most on image relative to text tokens."""
    chosen = {}
    for layer, counts in picks.items():
        shares = counts / counts.sum(dim=1, keepdim=True)
        preference = shares[1] - shares[0]
        count = max(1, round(share * counts.shape[1]))
        chosen[layer] = set(preference.topk(count).indices.tolist())
    return chosen


@torch.no_grad()
def _kl(original, reduced, inputs: list[dict], after_image: bool) -> float:
    """Mean KL(original || reduced) of next-token distributions."""
    total, positions = 0.0, 0
    for row in inputs:
        p = original(**row).logits[0].float().log_softmax(-1)
        q = reduced(**row).logits[0].float().log_softmax(-1)
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        if after_image:  # the caption, which reads the image
            types = row["mm_token_type_ids"][0]
            keep = torch.arange(p.shape[0]) > types.nonzero().max()
        kl = (p.exp() * (p - q)).sum(-1)[keep]
        total += float(kl.sum())
        positions += int(keep.sum())
    return total / positions


def _removed(out: Path) -> dict[int, list[int]]:
    report = json.loads((out / "expert_reduction.json").read_text())[-1]
    return {
        int(name.split(".layers.")[1].split(".")[0]): layer["removed"]
        for name, layer in report["layers"].items()
    }


def run_seed(seed: int, args, scratch: Path) -> list[dict]:
    source = build_tiny_moe(FAMILY, scratch / f"model-{seed}", seed=seed)
    original = _load(source)
    image_inputs, text_inputs = _eval_rows(source, args.eval_rows, args.seq_len)
    image_experts = _image_experts(_router_picks(original, image_inputs), 0.25)
    results = []
    for method in METHODS:
        recipe = _recipe(scratch, method, args.sparsity)
        for calibration in ("text", "text+images"):
            out = scratch / f"{method}-{calibration}-{seed}"
            images = {"images": "bundled"} if calibration != "text" else {}
            reset_session()
            compress(
                str(recipe), str(source), "bundled", str(out),
                num_samples=args.samples, max_seq_len=args.seq_len, **images,
            )  # fmt: skip
            reset_session()
            removed = _removed(out)
            hit = sum(len(image_experts[i] & set(r)) for i, r in removed.items())
            reduced = _load(out)
            results.append(
                {
                    "seed": seed,
                    "method": method,
                    "calibration": calibration,
                    "image_experts_removed": hit
                    / sum(len(e) for e in image_experts.values()),
                    "kl_image_rows": _kl(original, reduced, image_inputs, True),
                    "kl_text_rows": _kl(original, reduced, text_inputs, False),
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-rows", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            rows += run_seed(seed, args, Path(scratch))
    summary = {}
    for method in METHODS:
        for calibration in ("text", "text+images"):
            runs = [
                r
                for r in rows
                if r["method"] == method and r["calibration"] == calibration
            ]
            summary[f"{method} {calibration}"] = {
                key: sum(r[key] for r in runs) / len(runs)
                for key in ("image_experts_removed", "kl_image_rows", "kl_text_rows")
            }
    result = {"settings": vars(args), "mean": summary, "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "image_experts.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
