"""Shared fixtures: tiny random MoE checkpoints built locally, once per session."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread (here and in the CLI, torchrun and wheel subprocesses): the tiny
# models gain nothing from more, and two threads on the 2-core CI machine made
# the suite 1.3x slower (2026-12-04)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["OMP_NUM_THREADS"].isdigit():  # if torch was imported first
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
from llmcompressor.core import reset_session  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import ream_modifiers  # noqa: E402, F401  (registers the modifiers)
from ream_modifiers.data import build_calibration_dataset  # noqa: E402
from ream_modifiers.moe import load_moe_model  # noqa: E402
from ream_modifiers.tiny import build_tiny_moe  # noqa: E402

MODEL_TYPES = ["qwen3_moe", "mixtral", "deepseek_v3"]
ROUTING_TYPES = [*MODEL_TYPES, "qwen2_moe", "phimoe", "kimi_linear"]
NUM_SAMPLES = 16
SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type)`` -> path of a saved tiny model (cached)."""
    cache: dict[str, object] = {}

    def build(model_type: str):
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type)
            cache[model_type] = build_tiny_moe(model_type, path)
        return cache[model_type]

    return build


@pytest.fixture
def load_tiny(tiny_model_dir):
    """``load_tiny(model_type)`` -> (fresh linearized model, tokenizer, path)."""

    def load(model_type: str):
        path = tiny_model_dir(model_type)
        model = load_moe_model(path, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), path

    return load


@pytest.fixture
def calibration(tiny_model_dir):
    """``calibration(model_type)`` -> tokenized bundled calibration rows."""

    def build(model_type: str, num_samples: int = NUM_SAMPLES):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(model_type))
        return build_calibration_dataset("bundled", tokenizer, num_samples, SEQ_LEN)

    return build


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration starts: errors must come before it."""
    from ream_modifiers.modifiers.base import ExpertReductionModifier

    def forbidden(self, *args, **kwargs):
        raise AssertionError("calibration started before the error")

    monkeypatch.setattr(ExpertReductionModifier, "on_calibration_start", forbidden)


@pytest.fixture(autouse=True)
def fresh_session():
    reset_session()
    yield
    reset_session()


def run_modifier(model, tokenizer, dataset, modifier) -> dict | None:
    """One ``oneshot`` of ``modifier`` on the tiny calibration shape; its report."""
    import json
    from pathlib import Path

    from llmcompressor import oneshot

    reset_session()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    if modifier.report_path is None:
        return None
    return json.loads(Path(modifier.report_path).read_text())


def copy_expert(layer, source: int, target: int, perm=None) -> None:
    """Make expert ``target`` a copy of ``source``, its neurons shuffled by ``perm``."""
    from ream_modifiers.moe import write_expert

    expert = layer.expert(source)
    gate, up = expert.gate_proj.weight, expert.up_proj.weight
    down = expert.down_proj.weight
    if perm is not None:
        gate, up, down = gate[perm], up[perm], down[:, perm]
    write_expert(layer, target, gate=gate, up=up, down=down)


def sample_input_ids(batch: int = 2, length: int = 24, vocab: int = 512, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def hook_registrar(handles: list):
    """A collector's ``register(module, fn, kind)`` on plain torch hooks; the
    handles go to ``handles`` (for removal after the forward)."""

    def register(module, fn, kind):
        method = {
            "forward": module.register_forward_hook,
            "forward_pre": module.register_forward_pre_hook,
        }[kind]
        handles.append(method(fn))
        return handles[-1]

    return register
