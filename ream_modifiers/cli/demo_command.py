"""``ream-compress demo``: the whole path on the embedded default model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from loguru import logger

from ream_modifiers.cli.compress_command import compress
from ream_modifiers.cli.summary import SUMMARY_FILENAME
from ream_modifiers.output import refuse_existing
from ream_modifiers.resources import demo_fixture

__all__ = ["demo"]


def _demo_model(scratch: str) -> tuple[Path, list[Path]]:
    """
    The demo's model folder and held-out files: the trained fixture's, or where
    it is not installed (a wheel install), a small random Qwen3-MoE and none.

    :param scratch: folder for the random model
    """
    from ream_modifiers.tiny import build_tiny_moe

    fixture = demo_fixture()
    if fixture is not None:
        return fixture / "model", sorted((fixture / "data").glob("*_heldout.jsonl"))
    logger.warning(
        "the trained demo fixture (benchmarks/fixture) is not installed (wheels "
        "leave it out): compressing a small random Qwen3-MoE instead, whose "
        "perplexities would mean nothing; clone the repository for the trained "
        "fixture"
    )
    model_dir = build_tiny_moe(
        "qwen3_moe",
        scratch,
        num_hidden_layers=4,
        num_experts=16,
        num_experts_per_tok=4,
        dtype=torch.bfloat16,
    )
    return model_dir, []


def demo(
    output: str = "demo-output", recipe: str = "reap_w4a16", overwrite: bool = False
):
    """
    The whole path on the embedded default: the trained fixture MoE shipped in
    ``benchmarks/fixture/model`` (Qwen3-MoE, 32 experts, top-4; a small random
    Qwen3-MoE is built instead where the fixture is absent, as in a wheel
    install), the bundled calibration text and a recipe; then reload the
    checkpoint with transformers and print held-out perplexity per domain before
    and after (skipped without the fixture's held-out data).

    :param overwrite: replace a non-empty ``output``; an earlier ream-compress
        output there is replaced anyway, so the demo can be run again
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ream_modifiers.evaluation import perplexity, read_jsonl_texts

    overwrite = overwrite or (Path(output) / SUMMARY_FILENAME).is_file()
    refuse_existing(Path(output), overwrite)
    with tempfile.TemporaryDirectory(prefix="ream-demo-model-") as scratch:
        model_dir, heldout_files = _demo_model(scratch)
        heldout = {
            path.name.removesuffix("_heldout.jsonl"): read_jsonl_texts(path)
            for path in heldout_files
        }
        if not heldout:
            logger.info("no held-out data: skipping the before/after perplexity")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def evaluate(path) -> dict[str, float]:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return {d: perplexity(model, tokenizer, t) for d, t in heldout.items()}

        before = evaluate(model_dir) if heldout else {}
        summary = compress(
            recipe,
            str(model_dir),
            "bundled",
            output,
            num_samples=64,
            max_seq_len=128,
            overwrite=overwrite,
        )
        after = evaluate(output)
    if heldout:
        print("\nheld-out perplexity   before -> after")
        for domain in heldout:
            print(
                f"  {domain:10s}         {before[domain]:8.2f} -> {after[domain]:8.2f}"
            )
        (Path(output) / "demo_perplexity.json").write_text(
            json.dumps({"before": before, "after": after}, indent=2) + "\n"
        )
    print(f"reloaded {output} with transformers")
    return summary
