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


def quality() -> str:
    rows = json.loads((RESULTS / "quality.json").read_text())["rows"]
    keys = list(METRICS)
    lines = [
        "| method | removed | weights | "
        + " | ".join(keys)
        + " | recovery % | MiB | time (s) |",
        "|---|---|---|" + "---|" * (len(keys) + 3),
    ]
    for row in rows:
        values = " | ".join(f"{row[k]:g}" for k in keys)
        lines.append(
            f"| {row['method']} | {row['ratio']:.0%} | {row['quant']} | {values} | "
            f"{row['recovery_mean']} | {row['mib']} | {row.get('seconds', '')} |"
        )
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


if __name__ == "__main__":
    tables = {"quality": quality, "pareto": pareto, "speed": speed, "scale": scale}
    for name in sys.argv[1:] or tables:
        table = pareto(name) if name.startswith("pareto") else tables[name]()
        print(f"\n<!-- {name} -->\n" + table)
