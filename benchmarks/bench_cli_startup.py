"""
How long ``ream-compress check`` takes to start, now that the package imports
neither torch nor llm-compressor for it (issue 14), side by side with what every
command paid before: importing llm-compressor (which the package did at import).

    cd benchmarks && ../.venv/bin/python bench_cli_startup.py

Each command runs ``--repeats`` times in a fresh interpreter, interleaved, so
the machine's noise hits all of them alike; medians and ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ream_modifiers.tiny import build_tiny_moe

    python = sys.executable
    cli = str(Path(python).with_name("ream-compress"))
    with tempfile.TemporaryDirectory() as scratch:
        model = str(build_tiny_moe("qwen3_moe", Path(scratch) / "m"))
        commands = {
            "import ream_modifiers.check": [
                python, "-c", "import ream_modifiers.check"
            ],
            "import llmcompressor (paid by every command before)": [
                python, "-c", "import llmcompressor"
            ],
            "ream-compress check (tiny model)": [cli, "check", model],
            "ream-compress --help (imports every modifier)": [cli, "--help"],
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(_seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["import llmcompressor (paid by every command before)"]
    rows = {
        name: {
            "median_s": round(m, 3),
            "vs_llmcompressor_import": round(m / baseline, 3),
        }
        for name, m in medians.items()
    }
    for name, row in rows.items():
        print(f"{name:55s} {row['median_s']:7.3f} s  x{row['vs_llmcompressor_import']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cli_startup.json"
    out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
