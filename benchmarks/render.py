"""
Print the Markdown tables of BENCHMARKS.md from the JSON in results/, so the
document can be refreshed after ``make bench`` without retyping numbers.

    cd benchmarks && ../.venv/bin/python render.py [quality|pareto|speed|scale]

(``pareto_25`` renders results/pareto_25.json, the sweep at 25%.)
"""

from __future__ import annotations

import json
import sys

from common import RESULTS
from tasks_eval import METRICS


def quality(stem: str = "quality") -> str:
    """Headline: held-out perplexity recovery per domain; lm-eval tasks beside."""
    rows = json.loads((RESULTS / f"{stem}.json").read_text())["rows"]
    # lm-eval columns only where the run scored them (``--no-lm-eval`` skips)
    keys = [k for k in METRICS if any(k in row for row in rows)]
    lm_eval = [f"lm-eval {k}" for k in keys] + (["lm-eval recovery %"] if keys else [])
    header = [
        "method",
        "removed",
        "weights",
        "held-out recovery general / code / math",
        "**mean**",
        *lm_eval,
        "MiB",
        "time (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        held = row.get("heldout_recovery")
        domains = (
            " / ".join(f"{held[d]:.3f}" for d in ("general", "code", "math"))
            if held
            else "-"
        )
        cells = [
            row["method"],
            f"{row['ratio']:.1%}",
            row["quant"],
            domains,
            f"**{held['mean']:.3f}**" if held else "-",
            *(f"{row[k]:g}" if k in row else "-" for k in keys),
            *([str(row.get("recovery_mean") or "-")] if keys else []),
            str(row["mib"]),
            str(row.get("seconds", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto(stem: str = "pareto") -> str:
    """``pareto`` (REAM 50%) or ``pareto_25`` etc. for other ratios."""
    result = json.loads((RESULTS / f"{stem}.json").read_text())
    lines = [
        "| mix (general/math/code) | rows g/m/c | MC proxy | GEN proxy | frontier |",
        "|---|---|---|---|---|",
    ]
    original = result["original"]
    lines.append(f"| original model | - | {original['mc']} | {original['gen']} | |")
    for point in result["points"]:
        rows = "/".join(str(point["rows"][d]) for d in ("general", "math", "code"))
        on = "yes" if point["mix"] in result["frontier"] else ""
        lines.append(
            f"| {point['mix']} | {rows} | {point['mc']} | {point['gen']} | {on} |"
        )
    return "\n".join(lines)


def speed() -> str:
    result = json.loads((RESULTS / "speed.json").read_text())
    aimer, calib = result["aimer"], result["calibration_overhead"]
    lines = [
        "| ratio | value | goal |",
        "|---|---|---|",
        f"| AIMER scoring / memory-read floor | {aimer['aimer_over_floor']} "
        f"({aimer['aimer_s']} s / {aimer['floor_s']} s) | <= 1.5 |",
        f"| (before: stack copies, then score) | "
        f"{aimer['stack_then_score_over_floor']} | |",
    ]
    for name in ("REAP", "REAM", "DERN"):
        goal = "<= 1.25" if name == "REAP" else "reported"
        lines.append(
            f"| {name} oneshot / do-nothing calibration oneshot | "
            f"{calib['over_no_op'][name]} ({calib['seconds'][name]} s / "
            f"{calib['seconds']['no-op']} s) | {goal} |"
        )
    return "\n".join(lines)


def scale() -> str:
    result = json.loads((RESULTS / "scale.json").read_text())
    lines = [
        "| experts | tokens | GPTQ | model GiB | oneshot (s) | peak RSS / model "
        "| peak above runtime / model | anon peak above runtime / model "
        "| load avg before, after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['experts']} | {row['tokens']} | {row.get('gptq', True)} | "
            f"{row['model_bytes'] / 2**30:.2f} | {row['oneshot_s']} | "
            f"{row['peak_rss_over_model']} | {row['peak_above_runtime_over_model']} | "
            f"{row.get('peak_anon_above_runtime_over_model', '')} | "
            f"{', '.join(map(str, row.get('load_avg_1min', [])))} |"
        )
    return "\n".join(lines)


def ablation() -> str:
    """Saliency x (prune, merge, verified merge) and merge options, by ratio."""
    ratios = {"25%": "250", "37.5%": "375", "50%": "500"}
    results = {}
    for name, stem in ratios.items():
        path = RESULTS / f"ablation_{stem}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())["rows"]
    labels = list(dict.fromkeys(k for rows in results.values() for k in rows))
    lines = [
        "| row | " + " | ".join(results) + " | 50%: general / code / math |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for label in labels:
        cells = [
            f"{rows[label]['recovery']['mean']:.3f}" if label in rows else "-"
            for rows in results.values()
        ]
        row = results.get("50%", {}).get(label)
        domains = (
            " / ".join(f"{row['recovery'][d]:.3f}" for d in ("general", "code", "math"))
            if row
            else "-"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {domains} |")
    return "\n".join(lines)


if __name__ == "__main__":
    tables = {
        "quality": quality,
        "ablation": ablation,
        "pareto": pareto,
        "speed": speed,
        "scale": scale,
    }
    for name in sys.argv[1:] or tables:
        if name.startswith("pareto"):
            table = pareto(name)
        elif name.startswith("quality"):
            table = quality(name)
        else:
            table = tables[name]()
        print(f"\n<!-- {name} -->\n" + table)
