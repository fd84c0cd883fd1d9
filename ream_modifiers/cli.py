"""
``ream-compress``: run a recipe on a Hugging Face MoE model and write a
compressed-tensors checkpoint, its tokenizer and the per-layer report.

    ream-compress compress recipes/reap_w4a16.yaml --model Qwen/Qwen3-30B-A3B \\
        --dataset c4 --num-samples 512 --max-seq-len 2048 --output out/
    ream-compress demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loguru import logger

__all__ = ["main", "compress", "CompressionSummary"]

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = REPO_ROOT / "recipes"
FIXTURE = REPO_ROOT / "benchmarks" / "fixture"
SUMMARY_FILENAME = "compression_summary.json"
CALIBRATION_FILENAME = "calibration.json"


@dataclass
class CompressionSummary:
    model: str
    recipe: str
    experts_per_layer_before: int | None
    experts_per_layer_after: int | None
    moe_layers: int
    parameters_before: int
    parameters_after: int
    gib_before: float
    gib_after: float
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"model            {self.model}",
            f"recipe           {self.recipe}",
            f"experts/layer    {self.experts_per_layer_before} -> "
            f"{self.experts_per_layer_after} ({self.moe_layers} MoE layers)",
            f"parameters       {self.parameters_before:,} -> {self.parameters_after:,}",
            f"size (GiB)       {self.gib_before:.4f} -> {self.gib_after:.4f} "
            f"({self.gib_after / self.gib_before:.1%})",
            f"time             {self.seconds:.1f} s",
        ]


def resolve_recipe(recipe: str) -> Path:
    """A recipe path, or the name of one in the repository's ``recipes/``."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (REPO_RECIPES / recipe, REPO_RECIPES / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in REPO_RECIPES.glob("*.yaml"))
    raise SystemExit(f"error: recipe {recipe!r} not found; known recipes: {known}")


def _checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _checkpoint_parameters(directory: Path) -> int:
    """Logical parameter count of a saved (possibly packed) checkpoint."""
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                if name.endswith("weight_shape"):  # a packed weight's logical shape
                    total += math.prod(handle.get_tensor(name).tolist())
                elif name.endswith(("weight", "bias")):
                    total += math.prod(handle.get_slice(name).get_shape())
    return total


def compress(
    recipe: str,
    model: str,
    dataset: str | None,
    output: str,
    num_samples: int = 512,
    max_seq_len: int = 2048,
    dtype: str = "auto",
    text_field: str = "text",
    overwrite: bool = False,
    calibrate_all_experts: bool = True,
    mix: str | None = None,
    mix_sources: dict[str, str] | None = None,
    packing: bool = True,
    chat_template: bool = False,
    seed: int = 42,
) -> CompressionSummary:
    """
    Compress ``model`` with ``recipe`` into ``output``. The output directory is
    written under a temporary name and renamed when complete, so it is either
    complete or absent.

    Calibration text comes from ``dataset`` (one source), or from a general / math
    / code ``mix`` such as ``"general=0.2,math=0.3,code=0.5"`` (see
    :func:`ream_modifiers.data.build_mix`), whose per-source counts are written to
    ``calibration.json``.
    """
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe
    from transformers import AutoTokenizer

    import ream_modifiers  # noqa: F401  (registers the modifiers)
    from ream_modifiers.data import build_calibration_dataset, build_mix
    from ream_modifiers.moe import find_moe_layers, load_moe_model
    from ream_modifiers.saving import REPORT_FILENAME

    recipe_path = resolve_recipe(recipe)
    if (dataset is None) == (mix is None):
        raise SystemExit("error: give exactly one of --dataset and --mix")
    output_dir = Path(output)
    if output_dir.exists() and not overwrite:
        raise SystemExit(f"error: {output_dir} exists; pass --overwrite to replace it")
    # parse the recipe now: a typo must fail before the model is even loaded
    Recipe.create_instance(str(recipe_path))

    start = time.perf_counter()
    logger.info(f"Loading {model}")
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    moe_model = load_moe_model(model, dtype=torch_dtype)
    layers = find_moe_layers(moe_model)
    experts_before = layers[0].num_experts
    parameters_before = sum(p.numel() for p in moe_model.parameters())
    bytes_before = _model_bytes(moe_model)
    logger.info(f"Building {num_samples} x {max_seq_len} calibration rows")
    if mix is not None:
        calibration, mix_report = build_mix(
            tokenizer,
            mix,
            num_samples,
            max_seq_len,
            sources=mix_sources,
            packing=packing,
            chat_template=chat_template,
            seed=seed,
        )
        calibration_info = mix_report.to_dict()
    else:
        calibration = build_calibration_dataset(
            dataset, tokenizer, num_samples, max_seq_len, text_field=text_field
        )
        calibration_info = {
            "source": dataset,
            "rows": len(calibration),
            "max_seq_length": max_seq_len,
        }

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent)
    )
    try:
        oneshot(
            model=moe_model,
            dataset=calibration,
            recipe=str(recipe_path),
            processor=tokenizer,
            num_calibration_samples=num_samples,
            max_seq_length=max_seq_len,
            moe_calibrate_all_experts=calibrate_all_experts,
            output_dir=str(partial),
        )
        report_file = partial / REPORT_FILENAME
        reports = json.loads(report_file.read_text()) if report_file.exists() else []
        summary = CompressionSummary(
            model=str(model),
            recipe=str(recipe_path),
            experts_per_layer_before=experts_before,
            experts_per_layer_after=reports[-1]["num_experts_after"]
            if reports
            else None,
            moe_layers=len(layers),
            parameters_before=parameters_before,
            parameters_after=_checkpoint_parameters(partial),
            gib_before=bytes_before / 2**30,
            gib_after=_checkpoint_bytes(partial) / 2**30,
            seconds=time.perf_counter() - start,
        )
        (partial / SUMMARY_FILENAME).write_text(
            json.dumps(asdict(summary), indent=2) + "\n"
        )
        (partial / CALIBRATION_FILENAME).write_text(
            json.dumps(calibration_info, indent=2) + "\n"
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(
        "\n".join(
            [
                "",
                "== ream-compress summary ==",
                *summary.lines(),
                f"output           {output_dir}",
            ]
        )
    )
    return summary


def demo(
    output: str = "demo-output", recipe: str = "reap_w4a16", overwrite: bool = True
):
    """
    The whole path on the embedded default: the trained fixture MoE shipped in
    ``benchmarks/fixture/model`` (Qwen3-MoE, 32 experts, top-4; a small random
    Qwen3-MoE is built instead where the repository's benchmarks are absent),
    the bundled calibration text and a recipe; then reload the checkpoint with
    transformers and print held-out perplexity per domain before and after.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ream_modifiers.evaluation import perplexity, read_jsonl_texts
    from ream_modifiers.tiny import build_tiny_moe

    with tempfile.TemporaryDirectory(prefix="ream-demo-model-") as scratch:
        model_dir = FIXTURE / "model"
        if not (model_dir / "config.json").is_file():
            logger.warning(f"{model_dir} not found; using a random Qwen3-MoE instead")
            model_dir = build_tiny_moe(
                "qwen3_moe",
                scratch,
                num_hidden_layers=4,
                num_experts=16,
                num_experts_per_tok=4,
                dtype=torch.bfloat16,
            )
        heldout = {
            path.name.removesuffix("_heldout.jsonl"): read_jsonl_texts(path)
            for path in sorted((FIXTURE / "data").glob("*_heldout.jsonl"))
        }
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def evaluate(path) -> dict[str, float]:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return {d: perplexity(model, tokenizer, t) for d, t in heldout.items()}

        before = evaluate(model_dir)
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


METHODS = {
    "REAPModifier": "REAP: prune lowest router-weighted activation saliency",
    "REAMModifier": "REAM: merge groups of experts after aligning neurons",
    "DERNModifier": "DERN: drop experts, recombine their neurons into kept ones",
    "AIMERModifier": "AIMER: data-free, prune by mean|w| / RMS(w)",
    "MoEITSModifier": "MoEITS: data-free, prune redundant experts (weight NMI)",
    "HCSMoEModifier": "HC-SMoE baseline: cluster mean outputs, average",
    "MSMoEModifier": "M-SMoE baseline: frequency-dominant experts, weight matching",
    "FrequencyPruningModifier": "frequency pruning baseline",
    "EANPruningModifier": "EAN pruning baseline",
}


def _methods_help() -> str:
    recipes = ", ".join(sorted(p.stem for p in REPO_RECIPES.glob("*.yaml")))
    lines = ["methods (recipe modifier names):"]
    lines += [f"  {name:26s}{text}" for name, text in METHODS.items()]
    lines.append(f"recipes in recipes/: {recipes}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ream-compress",
        description="Prune or merge MoE experts, then quantize, with a recipe.",
        epilog=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("compress", help="run a recipe on a model")
    run.add_argument(
        "recipe", help="recipe YAML path, or a name in recipes/ (reap_w4a16)"
    )
    run.add_argument(
        "--model", required=True, help="local path or Hugging Face model ID"
    )
    run.add_argument(
        "--dataset",
        help="calibration text: 'bundled', a local .txt/.jsonl file or folder, "
        "c4 / ultrachat / numinamath / the-stack-smol, or a Hugging Face dataset ID",
    )
    run.add_argument(
        "--mix",
        help="general/math/code mix instead of --dataset, e.g. "
        "general=0.2,math=0.3,code=0.5 (c4, NuminaMath-1.5, the-stack-smol)",
    )
    run.add_argument(
        "--mix-source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="replace a mix source by a local .txt/.jsonl file or folder, or "
        "bundled:<domain> (repeatable)",
    )
    run.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="one document per row instead of packed rows",
    )
    run.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap mix texts in the tokenizer's chat template",
    )
    run.add_argument("--seed", type=int, default=42, help="mix sampling seed")
    run.add_argument("--output", required=True, help="output directory")
    run.add_argument("--num-samples", type=int, default=512)
    run.add_argument("--max-seq-len", type=int, default=2048)
    run.add_argument(
        "--dtype", default="auto", help="auto, bfloat16, float16 or float32"
    )
    run.add_argument(
        "--text-field", default="text", help="text column of JSONL / HF data"
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing output"
    )
    run.add_argument(
        "--no-calibrate-all-experts",
        dest="calibrate_all_experts",
        action="store_false",
        help="run experts on routed tokens only (faster; REAP/AIMER do not need all)",
    )
    show = commands.add_parser("demo", help="compress a small locally built MoE")
    show.add_argument("--output", default="demo-output")
    show.add_argument("--recipe", default="reap_w4a16")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        demo(args.output, args.recipe)
        return 0
    mix_sources = {}
    for item in args.mix_source:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --mix-source {item!r} is not NAME=PATH")
        mix_sources[name] = path
    compress(
        args.recipe,
        args.model,
        args.dataset,
        args.output,
        num_samples=args.num_samples,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        text_field=args.text_field,
        overwrite=args.overwrite,
        calibrate_all_experts=args.calibrate_all_experts,
        mix=args.mix,
        mix_sources=mix_sources,
        packing=args.packing,
        chat_template=args.chat_template,
        seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
