"""
The model card (``README.md``) of a compressed checkpoint, in the Hugging Face
Hub style: YAML front matter, then what was done, to what, with which data, and
how to serve the result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from ream_modifiers.plot import PLOT_FILENAME, is_merging
from ream_modifiers.registry import method_for_report, methods

__all__ = ["CARD_FILENAME", "CardInputs", "render_card", "write_card"]

CARD_FILENAME = "README.md"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VERSIONED = ("llmcompressor", "compressed-tensors", "transformers", "torch")


@dataclass
class CardInputs:
    """
    Everything the card states.

    :param model: the base model as given (hub ID or local path)
    :param output: the final output directory (used in the serving commands)
    :param reports: the contents of ``expert_reduction.json``
    :param summary: the compression summary (experts, parameters, GiB, seconds)
    :param calibration: the contents of ``calibration.json``
    :param config: the saved ``config.json``
    :param recipe_yaml: the saved ``recipe.yaml`` text
    :param command: the command line that produced the checkpoint, if known
    :param check: one line on the checkpoint check
    :param trust_remote_code: whether the base model needed remote code
    """

    model: str
    output: str
    reports: list[dict[str, Any]]
    summary: dict[str, Any]
    calibration: dict[str, Any]
    config: dict[str, Any]
    recipe_yaml: str = ""
    command: str | None = None
    check: str | None = None
    trust_remote_code: bool = False
    plot: bool = False
    extra_tags: list[str] = field(default_factory=list)


def tool_version() -> str:
    """This package's version (installed metadata, else the module attribute)."""
    try:
        return metadata.version("ream-modifiers")
    except metadata.PackageNotFoundError:
        from ream_modifiers import __version__

        return __version__


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tags(inputs: CardInputs) -> list[str]:
    tags = ["moe"]
    for report in inputs.reports:
        method = method_for_report(report)
        # recombination always folds removed experts' neurons into kept ones;
        # a merging method only where its report has merged groups
        merged = is_merging(report) or (
            method is not None and method.kind == "recombine"
        )
        pruned = not is_merging(report)
        tags += ["expert-merging"] * merged + ["expert-pruning"] * pruned
        if report.get("method"):
            tags.append(report["method"].lower())
    quant = inputs.config.get("quantization_config") or {}
    if quant:
        tags.append("compressed-tensors")
        tags += [s.lower() for s in _schemes(inputs.recipe_yaml)]
    tags += ["llm-compressor", "ream-modifiers", *inputs.extra_tags]
    return list(dict.fromkeys(tags))


def _front_matter(inputs: CardInputs) -> str:
    meta: dict[str, Any] = {}
    # the Hub validates base_model as a repository ID; a local path goes in the text
    if _HUB_ID.match(inputs.model) and not Path(inputs.model).exists():
        meta["base_model"] = inputs.model
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = _tags(inputs)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _schemes(recipe_yaml: str) -> list[str]:
    """Preset scheme names (W4A16, FP8_DYNAMIC, ...) of the recipe's modifiers."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            scheme = node.get("scheme")
            if isinstance(scheme, str):
                found.append(scheme)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    try:
        # safe_load: a recipe is data, and must never construct Python objects
        walk(yaml.safe_load(recipe_yaml) if recipe_yaml else None)
    except yaml.YAMLError as error:
        logger.warning(f"recipe.yaml not parsed for the model card: {error}")
    return list(dict.fromkeys(found))


def _method_lines(report: dict[str, Any]) -> list[str]:
    method = report.get("method", "?")
    url = report.get("paper") or ""
    title = next((m.paper_title for m in methods() if m.paper == url), None)
    if title:
        arxiv = url.rsplit("/", 1)[-1]
        cite = f'"{title}" ([arXiv {arxiv}]({url}))'
    else:
        cite = url or "no paper"
    settings = {
        k: v for k, v in (report.get("settings") or {}).items() if v not in ([], None)
    }
    what = "merged" if is_merging(report) else "removed"
    lines = [
        f"- **Method:** {method}, {cite}; experts {what}, routers sliced to match.",
        f"- **Settings:** `{json.dumps(settings, sort_keys=True)}`",
    ]
    verified = [e for e in report["layers"].values() if "merge_errors" in e]
    if verified:
        proposed = sum(len(e["merge_errors"]) for e in verified)
        undone = sum(len(e["merges_undone"]) for e in verified)
        lines.append(
            f"- **Merges verified:** {proposed - undone} of {proposed} proposed "
            "merges kept; the others did not bring the layer's output closer to "
            "the original on calibration tokens, so their members were pruned."
        )
    return lines


def _weights_text(args: dict[str, Any] | None) -> str:
    if not args:
        return "not quantized"
    kind = f"{args.get('type', '?')}{args.get('num_bits', '?')}"
    strategy = args.get("strategy")
    if strategy == "group" and args.get("group_size"):
        strategy = f"groups of {args['group_size']}"
    sym = "symmetric" if args.get("symmetric", True) else "asymmetric"
    dynamic = ", dynamic" if args.get("dynamic") else ""
    return f"{kind}, {strategy}, {sym}{dynamic}"


def _quantization_lines(inputs: CardInputs) -> list[str]:
    quant = inputs.config.get("quantization_config")
    if not quant:
        return ["- **Quantization:** none (weights in the base model's dtype)."]
    schemes = ", ".join(_schemes(inputs.recipe_yaml)) or "custom"
    lines = [
        f"- **Quantization:** {schemes}, compressed-tensors format "
        f"`{quant.get('format')}`:"
    ]
    for name, group in (quant.get("config_groups") or {}).items():
        lines.append(
            f"  - `{name}` targets {group.get('targets')}: weights "
            f"{_weights_text(group.get('weights'))}; input activations "
            f"{_weights_text(group.get('input_activations'))}"
        )
    ignore = quant.get("ignore") or []
    shown = ", ".join(f"`{n}`" for n in ignore[:6])
    more = f" and {len(ignore) - 6} more" if len(ignore) > 6 else ""
    lines.append(f"  - kept in full precision (routers included): {shown}{more}")
    return lines


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    if not calibration:
        return ["- **Calibration:** none recorded."]
    if isinstance(calibration.get("rows"), dict):
        mix = ", ".join(f"{k} {v}" for k, v in calibration["rows"].items())
        sources = calibration.get("sources") or {}
        where = "; ".join(f"{k}: `{v}`" for k, v in sources.items())
        text = f"mix of {mix} rows" + (f" (sources {where})" if where else "")
    else:
        text = f"{calibration.get('rows')} rows of `{calibration.get('source')}`"
    length = calibration.get("max_seq_length")
    if length:
        text += f", up to {length} tokens each"
    return [f"- **Calibration data:** {text} (details in `calibration.json`)."]


def render_card(inputs: CardInputs) -> str:
    """The model card text."""
    s = inputs.summary
    name = Path(inputs.output).name
    before, after = s.get("experts_per_layer_before"), s.get("experts_per_layer_after")
    ratio = s["gib_after"] / s["gib_before"] if s.get("gib_before") else float("nan")
    lines = [
        _front_matter(inputs),
        f"# {name}",
        "",
        f"`{inputs.model}` with its routed experts reduced from {before} to {after} "
        f"per MoE layer ({s.get('moe_layers')} layers) by ream-modifiers "
        f"{tool_version()}, saved as a "
        "compressed-tensors checkpoint that transformers and vLLM load unchanged.",
        "",
        "## Compression",
        "",
        "| | base model | this checkpoint |",
        "|---|---|---|",
        f"| routed experts per MoE layer | {before} | {after} |",
        f"| parameters | {s['parameters_before']:,} | {s['parameters_after']:,} |",
        f"| size (GiB) | {s['gib_before']:.4f} | {s['gib_after']:.4f} ({ratio:.1%}) |",
        "",
        f"- **Base model:** `{inputs.model}`",
    ]
    for report in inputs.reports:
        lines += _method_lines(report)
    lines += _quantization_lines(inputs)
    lines += _calibration_lines(inputs.calibration)
    lines += [
        "- **Recipe:** `recipe.yaml`; per-layer scores, kept and merged experts and "
        "timings: `expert_reduction.json`; totals: `compression_summary.json`.",
        f"- **Compression time:** {s.get('seconds', 0):.1f} s.",
    ]
    if inputs.check:
        lines.append(f"- **Checkpoint check:** {inputs.check}")
    if inputs.plot:
        lines += [
            "",
            "Expert scores per layer (red x: removed, white o: merged):",
            "",
            f"![expert scores per layer]({PLOT_FILENAME})",
        ]
    lines += _serving_lines(inputs)
    if inputs.command:
        lines += ["", "## Reproduce", "", "```bash", inputs.command, "```"]
    versions = ", ".join(f"{p} {_version(p)}" for p in _VERSIONED)
    lines += [
        "",
        "## Versions",
        "",
        f"ream-modifiers {tool_version()}; {versions}.",
        "",
    ]
    return "\n".join(lines)


def _serving_lines(inputs: CardInputs) -> list[str]:
    remote = " --trust-remote-code" if inputs.trust_remote_code else ""
    remote_py = ", trust_remote_code=True" if inputs.trust_remote_code else ""
    lines: list[str] = []
    lines += [
        "",
        "## Serving with vLLM",
        "",
        "```bash",
        f"vllm serve {inputs.output}{remote}",
        "```",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{inputs.output}"{remote_py})',
        'outputs = llm.generate(["The capital of France is"], '
        "SamplingParams(max_tokens=32))",
        "print(outputs[0].outputs[0].text)",
        "```",
        "",
        "transformers: `AutoModelForCausalLM.from_pretrained("
        f'"{inputs.output}"{remote_py})` (needs `compressed-tensors`).',
    ]
    return lines


def write_card(inputs: CardInputs, directory: str | Path) -> Path:
    """Write ``README.md`` into ``directory``."""
    path = Path(directory) / CARD_FILENAME
    path.write_text(render_card(inputs))
    return path
