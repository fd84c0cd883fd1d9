"""
Calibration-mix Pareto sweep (issue 5 §3): REAM at 50% of experts removed on the
fixture, calibrated on general/math/code mixes from general-only to code-only,
each scored by the ``mini_moe`` lm-eval tasks.

    cd benchmarks && ../.venv/bin/python pareto.py [--ratio 0.5]

MC proxy = mean accuracy of the three ``mini_moe_mc_*`` tasks; GEN proxy = mean
exact match of ``mini_moe_gen_math`` and ``mini_moe_gen_code``. Every mix has the
same number of rows and tokens (64 x 128), built by ``build_mix`` from the
fixture's training split with the same seed. Writes ``results/pareto.json`` and
``results/pareto.png``, and prints the mixes on the MC/GEN frontier.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, quiet
from quality import FIXTURE, compress_and_score
from transformers import AutoTokenizer

from ream_modifiers import REAMModifier
from ream_modifiers.data.mix import build_mix

sys.path.insert(0, str(FIXTURE))
from corpus import build_corpus  # noqa: E402

# (name, general, math, code), from general-only to code-only
MIXES = [
    ("general-only", 1.0, 0.0, 0.0),
    ("general-heavy", 0.6, 0.2, 0.2),
    ("balanced", 1 / 3, 1 / 3, 1 / 3),
    ("math-heavy", 0.2, 0.6, 0.2),
    ("reference (0/30/70)", 0.0, 0.3, 0.7),
    ("code-heavy", 0.2, 0.2, 0.6),
    ("code-only", 0.0, 0.0, 1.0),
]


def frontier(points: list[dict]) -> list[str]:
    """Names of the points no other point beats on both MC and GEN."""
    return [
        p["mix"]
        for p in points
        if not any(
            q["mc"] >= p["mc"]
            and q["gen"] >= p["gen"]
            and q is not p
            and (q["mc"] > p["mc"] or q["gen"] > p["gen"])
            for q in points
        )
    ]


def plot(
    points: list[dict], original: dict, names: list[str], path: Path, ratio: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for p in points:
        on = p["mix"] in names
        axes.scatter(p["mc"], p["gen"], color="tab:red" if on else "tab:blue")
        axes.annotate(
            p["mix"],
            (p["mc"], p["gen"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    best = sorted((p for p in points if p["mix"] in names), key=lambda p: p["mc"])
    axes.plot([p["mc"] for p in best], [p["gen"] for p in best], "r--", linewidth=1)
    axes.scatter(original["mc"], original["gen"], marker="*", s=150, color="black")
    axes.annotate(
        "original",
        (original["mc"], original["gen"]),
        fontsize=8,
        xytext=(4, -10),
        textcoords="offset points",
    )
    axes.set_xlabel("MC proxy (mean accuracy, 3 domains)")
    axes.set_ylabel("GEN proxy (mean exact match, math + code)")
    axes.set_title(
        f"REAM {ratio:.0%} on the fixture: calibration mix Pareto (red = frontier)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def proxies(scores: dict) -> dict:
    mc = sum(scores[f"{d}_mc"] for d in ("general", "code", "math")) / 3
    gen = (scores["math_gen"] + scores["code_gen"]) / 2
    return {"mc": round(mc, 4), "gen": round(gen, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    quiet()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    train = build_corpus()
    quality = json.loads((RESULTS / "quality.json").read_text())
    original_scores = next(r for r in quality["rows"] if r["method"] == "original")
    original = proxies(original_scores)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for domain in ("general", "math", "code"):
            path = Path(tmp) / f"{domain}.jsonl"
            records = (json.dumps({"text": t}) for t in train[domain]["train"])
            path.write_text("\n".join(records) + "\n")
            sources[domain] = path
        for name, general, math, code in MIXES:
            ratios = {"general": general, "math": math, "code": code}
            dataset, report = build_mix(
                tokenizer, ratios, args.rows, 128, sources=sources, seed=0
            )
            recipe = [REAMModifier(sparsity=args.ratio)]
            row = compress_and_score(recipe, dataset, tokenizer, args.rows)
            point = {"mix": name, "rows": report.rows, **proxies(row), "scores": row}
            points.append(point)
            print(json.dumps(point), flush=True)
    names = frontier(points)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "ratio": args.ratio,
        "original": original,
        "points": points,
        "frontier": names,
    }
    # 50% (the setting) is pareto.json; other ratios get a suffix
    stem = "pareto" if args.ratio == 0.5 else f"pareto_{round(args.ratio * 100)}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, original, names, RESULTS / f"{stem}.png", args.ratio)
    print("\n| mix | rows g/m/c | MC | GEN | on frontier |\n|---|---|---|---|---|")
    for p in points:
        rows = "/".join(str(p["rows"][d]) for d in ("general", "math", "code"))
        on = "yes" if p["mix"] in names else ""
        print(f"| {p['mix']} | {rows} | {p['mc']} | {p['gen']} | {on} |")


if __name__ == "__main__":
    main()
