"""What a ``compress`` run reports: the printed summary and the model card."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "CALIBRATION_FILENAME",
    "SUMMARY_FILENAME",
    "CompressionSummary",
    "checkpoint_bytes",
    "checkpoint_parameters",
    "write_provenance",
]

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


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def checkpoint_parameters(directory: Path) -> int:
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


def write_provenance(
    directory: Path,
    *,
    model: str,
    output: str,
    reports: list[dict],
    summary: CompressionSummary,
    calibration: dict,
    check: str,
    trust_remote_code: bool,
    command: str | None,
) -> None:
    """The model card and the per-layer figure (skipped without matplotlib)."""
    from ream_modifiers.card import CardInputs, write_card
    from ream_modifiers.plot import PLOT_FILENAME, write_expert_plot

    plot = write_expert_plot(reports, directory / PLOT_FILENAME)
    recipe_file = directory / "recipe.yaml"
    inputs = CardInputs(
        model=model,
        output=output,
        reports=reports,
        summary=asdict(summary),
        calibration=calibration,
        config=json.loads((directory / "config.json").read_text()),
        recipe_yaml=recipe_file.read_text() if recipe_file.is_file() else "",
        command=command,
        check=check,
        trust_remote_code=trust_remote_code,
        plot=plot is not None,
    )
    write_card(inputs, directory)
