"""
One figure of what happened per layer: a layers x experts heat map of expert
scores (normalised per layer), with removed and merged experts marked.

matplotlib is optional (the ``plots`` extra): without it the figure is skipped
with a warning and the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger

__all__ = ["PLOT_FILENAME", "expert_status", "write_expert_plot"]

PLOT_FILENAME = "expert_saliency.png"

KEPT, REMOVED, MERGED = "kept", "removed", "merged"


def expert_status(entry: dict[str, Any], merging: bool) -> list[str]:
    """
    The fate of every original expert of one report layer entry.

    :param entry: one layer of ``expert_reduction.json``
    :param merging: whether the method's groups were merged (not just pruned)
    """
    status = [REMOVED] * entry["experts_before"]
    for index in entry["kept"]:
        status[index] = KEPT
    if merging:
        for members in (entry.get("groups") or {}).values():
            for index in members:
                status[index] = MERGED
    return status


def is_merging(report: dict[str, Any]) -> bool:
    """Whether a report's removed experts were merged into kept ones."""
    if report.get("settings", {}).get("merge") == "none":
        return False
    return any(entry.get("groups") for entry in report["layers"].values())


def write_expert_plot(reports: list[dict[str, Any]], path: str | Path) -> Path | None:
    """
    Draw every report (usually one per run) as a heat map panel and save a PNG.

    :param reports: the contents of ``expert_reduction.json``
    :param path: where to write the PNG
    :return: the path written, or None when matplotlib is missing or there is
        nothing to draw
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "matplotlib is not installed; skipping the expert figure "
            "(pip install 'ream-modifiers[plots]')"
        )
        return None
    import numpy as np

    reports = [r for r in reports if r.get("layers")]
    if not reports:
        return None
    widest = max(e["experts_before"] for r in reports for e in r["layers"].values())
    rows = sum(len(r["layers"]) for r in reports)
    figure = Figure(
        figsize=(min(5 + 0.12 * widest, 30), min(1.8 + 0.3 * rows, 40)),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    heights = [len(r["layers"]) for r in reports]
    axes = figure.subplots(len(reports), 1, squeeze=False, height_ratios=heights)
    for axis, report in zip(axes[:, 0], reports, strict=True):
        _draw(figure, axis, report, widest, np)
    handles = {}
    for axis in axes[:, 0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    # below the panels, where it hides no cell
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="outside lower center",
        ncols=2,
        fontsize=7,
        frameon=False,
    )
    path = Path(path)
    figure.savefig(path, dpi=120)
    logger.info(f"Expert figure written to {path}")
    return path


def _draw(figure, axis, report: dict[str, Any], width: int, np) -> None:
    names = list(report["layers"])
    merging = is_merging(report)
    grid = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        scores = report["layers"][name].get("scores")
        if scores:
            values = np.asarray(scores, dtype=float)
            low, high = np.nanmin(values), np.nanmax(values)
            # scores are comparable within a layer only
            grid[row, : len(values)] = (
                (values - low) / (high - low) if high > low else 1.0
            )
    image = axis.imshow(
        np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=1
    )
    figure.colorbar(image, ax=axis, label="score (layer min-max)")
    marks = {REMOVED: ([], []), MERGED: ([], [])}
    for row, name in enumerate(names):
        for column, state in enumerate(expert_status(report["layers"][name], merging)):
            if state in marks:
                marks[state][0].append(column)
                marks[state][1].append(row)
    axis.scatter(*marks[REMOVED], marker="x", color="red", s=28, label="removed")
    if merging:
        axis.scatter(
            *marks[MERGED],
            marker="o",
            facecolors="none",
            edgecolors="white",
            s=28,
            label="merged into a kept expert",
        )
    axis.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    axis.set_xlabel("expert (original index)")
    before = report.get("num_experts_before")
    after = report.get("num_experts_after")
    axis.set_title(
        f"{report.get('method', '?')}: {before} -> {after} experts per layer "
        f"({len(names)} MoE layers)",
        fontsize=9,
    )


def _short(name: str) -> str:
    """``model.layers.12.mlp`` -> ``layers.12``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[i - 1 : i + 1]) if i else part
    return name
