"""What the benchmarks share: a random Qwen3-MoE, bundled calibration rows, one
timed ``oneshot`` run per modifier, memory sampling, and measured child runs."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from loguru import logger
from transformers import AutoTokenizer

import ream_modifiers  # noqa: F401
from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.moe import load_moe_model
from ream_modifiers.tiny import build_tiny_moe

RESULTS = Path(__file__).parent / "results"
RECIPES = Path(__file__).parents[1] / "recipes"


def gptq_stage(recipe: Path = RECIPES / "ream_w4a16.yaml") -> dict:
    """The ``GPTQModifier`` arguments of a W4A16 recipe (the same in all of them),
    so every benchmark quantizes exactly as the shipped recipes do."""
    stage = next(iter(yaml.safe_load(recipe.read_text()).values()))
    modifiers = next(iter(stage.values()))
    return modifiers["GPTQModifier"]


def model_arguments(parser: argparse.ArgumentParser, experts: int) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=experts)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)


def quiet() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def build(model_dir: Path, args) -> tuple:
    """Save the benchmark model to ``model_dir``; return (tokenizer, dataset)."""
    build_tiny_moe(
        "qwen3_moe",
        model_dir,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        hidden_size=args.hidden,
        moe_intermediate_size=args.hidden,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(
        "bundled", tokenizer, args.samples, args.seq_len
    )
    return tokenizer, dataset


def timed_oneshot(model_dir, dataset, tokenizer, modifier, args, **kwargs) -> float:
    """Wall seconds of one ``oneshot`` of ``modifier`` on a fresh model load."""
    reset_session()
    model = load_moe_model(model_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
        **kwargs,
    )
    return time.perf_counter() - start


def header(args) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "model": {
            k: getattr(args, k) for k in ("layers", "experts", "top_k", "hidden")
        },
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
    }


def memory_status(field: str) -> int:
    """Bytes of a /proc/self/status memory field (VmRSS, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """
    Peaks of RssAnon (memory the run allocated), RssFile (file pages mapped
    into the process, e.g. memory-mapped safetensors: reclaimable page cache that
    ru_maxrss also counts) and of their sum, sampled every 20 ms, per phase.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.running = True

    def sample(self) -> None:
        peaks = self.peaks.setdefault(self.phase, {"anon": 0, "file": 0, "rss": 0})
        anon, file = memory_status("RssAnon"), memory_status("RssFile")
        peaks["anon"] = max(peaks["anon"], anon)
        peaks["file"] = max(peaks["file"], file)
        # anon and file peak at different times: their sum in one sample
        peaks["rss"] = max(peaks["rss"], anon + file)

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.02)

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase

    def stop(self) -> dict[str, dict[str, int]]:
        self.running = False
        self.join()
        self.sample()
        return self.peaks


def print_result(result: dict) -> None:
    """A measured child's result, as the line :func:`run_measured` reads."""
    print("RESULT " + json.dumps(result), flush=True)


def run_measured(command: list[str], cwd: Path) -> dict:
    """
    Run a measured child process (a fresh process, so its peak RSS is its own)
    and return the result it printed with :func:`print_result`.
    """
    out = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
