"""
The project side of the vLLM tier: compress tiny checkpoints, generate greedily
with transformers, and run vLLM on a batch of checkpoints in ``.venv-vllm``
(:mod:`tests_vllm.vllm_generate`, one process per batch, fed as checkpoints
are ready).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoConfig, AutoTokenizer

from ream_modifiers.data import build_calibration_dataset
from ream_modifiers.moe import load_moe_model
from ream_modifiers.moe.architectures import get_arch_spec, text_config
from ream_modifiers.moe.auto import auto_model_class
from ream_modifiers.moe.conversions import per_expert_checkpoints
from ream_modifiers.moe.forward_module import adapt_forward_module
from ream_modifiers.tiny import TINY_CONFIGS, build_tiny_moe
from tests.conftest import NUM_SAMPLES, SEQ_LEN

ROOT = Path(__file__).parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WORKER = Path(__file__).parent / "vllm_generate.py"
STUBS = Path(__file__).parent / "stubs"
TOKENS = 12

# What vLLM's CPU build needs of a tiny config beyond the unit tests' (probe
# notes in the README's vLLM section): DeepSeek's MLA runs only with a 576-wide
# latent (kv_lora_rank 512 + RoPE dim 64); Qwen3-Next's linear attention only
# with 128-wide heads, in bfloat16.
VLLM_OVERRIDES: dict[str, dict] = {
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
    "deepseek_v3": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
    "deepseek_v32": dict(
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, index_head_dim=128
    ),
    "glm_moe_dsa": dict(
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, index_head_dim=128
    ),
    "glm4_moe_lite": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
    "kimi_k25": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32),
    # vLLM's glm4_moe.py reads `use_qk_norm` from the text config, a key
    # transformers' Glm4vMoeTextConfig does not define (GLM-4.5's own does;
    # false there by default)
    "glm4v_moe": dict(use_qk_norm=False),
    "qwen3_next": dict(
        head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128
    ),
    "qwen3_5_moe_text": dict(
        head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128
    ),
    # its text config's (a quarter of 128 rotary dims: 16 frequency pairs)
    "qwen3_5_moe": dict(
        head_dim=128,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10000.0,
            partial_rotary_factor=0.25,
            mrope_section=[6, 5, 5],
            mrope_interleaved=True,
        ),
    ),
}
DTYPES = {
    "qwen3_next": torch.bfloat16,
    "qwen3_5_moe_text": torch.bfloat16,
    "qwen3_5_moe": torch.bfloat16,
}


def dtype_of(family: str) -> torch.dtype:
    return DTYPES.get(family, torch.float32)


def build_original(family: str, directory: Path, mtp_layers: int = 0) -> Path:
    overrides = VLLM_OVERRIDES.get(family, {})
    text = TINY_CONFIGS[family].get("text_config")
    if text is not None and overrides:  # a wrapper: they apply to its text model
        overrides = {"text_config": {**text, **overrides}}
    return build_tiny_moe(
        family, directory, dtype=dtype_of(family), mtp_layers=mtp_layers, **overrides
    )


def compress(
    original: Path, family: str, modifier: Callable[[], object] | None,
    quantized: bool, out: Path,
) -> Path:  # fmt: skip
    """
    ``modifier`` (if any), then W4A16 if ``quantized``; saved to ``out``. The
    quantization is round-to-nearest: the packed checkpoint is the one GPTQ
    writes (the same tensors and config), which is what vLLM is checked on
    here, and GPTQ itself runs in every family's cell of the unit matrix. With
    GPTQ the W4A16 cells' compression took 388 of the tier's 720 s; with
    round-to-nearest 140 s of 494 (2026-12-05, BENCHMARKS.md "Tier time").
    """
    tokenizer = AutoTokenizer.from_pretrained(original)
    model = load_moe_model(original, dtype=dtype_of(family))
    dataset = build_calibration_dataset("bundled", tokenizer, NUM_SAMPLES, SEQ_LEN)
    recipe = [modifier()] if modifier is not None else []
    if quantized:
        recipe.append(
            QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
        )
    reset_session()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reset_session()
    return out


def text_token_limit(config) -> int:
    """
    Prompt ids stay below this: the vocabulary, or a vision-language model's
    first image/video/vision token id (a placeholder without an image would
    make vLLM look for image inputs).
    """
    special = [
        value
        for key, value in config.to_dict().items()
        if key.endswith("token_id")
        and any(word in key for word in ("image", "video", "vision"))
        and isinstance(value, int)
    ]
    return min([config.get_text_config().vocab_size, *special])


def prompts_for(vocab: int, count: int = 4, length: int = 10) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def load_transformers(directory: Path, family: str):
    """The checkpoint as transformers loads it, in float32 (int4 dequantized)."""
    config = AutoConfig.from_pretrained(directory)
    count = getattr(text_config(config), get_arch_spec(config).num_experts_key)
    with per_expert_checkpoints(family, count):
        model = auto_model_class(config).from_pretrained(
            directory, dtype=dtype_of(family)
        )
    adapt_forward_module(model)  # Qwen3-Omni: the thinker's forward
    return model.to(dtype_of(family)).eval()


@torch.no_grad()
def transformers_greedy(model, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        for _ in range(TOKENS):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        tokens.append(ids[0, len(prompt) :].tolist())
    return tokens


@torch.no_grad()
def teacher_forced_gap(model, prompts, vllm: dict) -> float:
    """
    Largest |logit| difference between transformers, fed vLLM's own greedy
    sequences, and vLLM's raw logits at every generated position (its top tokens).
    """
    gap = 0.0
    for prompt, tokens, positions in zip(
        prompts, vllm["tokens"], vllm["logits"], strict=True
    ):
        logits = model(input_ids=torch.tensor([list(prompt) + tokens])).logits[0]
        for step, top in enumerate(positions):
            row = logits[len(prompt) - 1 + step].float()
            for token, value in top.items():
                gap = max(gap, abs(float(row[int(token)]) - value))
    return gap


def worker_env() -> dict[str, str]:
    """
    The vLLM worker's environment: with ``stubs/`` (an import-only torchvision)
    on ``PYTHONPATH`` while ``.venv-vllm`` has no torchvision, so that vLLM can
    import its Qwen3.5 model (also in the subprocess that inspects models).
    """
    env = dict(os.environ)
    probe = [str(VLLM_PYTHON), "-c", "import importlib.util as u; "
             "print(u.find_spec('torchvision') is not None)"]  # fmt: skip
    if subprocess.run(probe, capture_output=True, text=True).stdout.strip() != "True":
        paths = [str(STUBS), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


class VLLMWorker:
    """
    One vLLM process (:mod:`tests_vllm.vllm_generate`) fed job by job, so that
    vLLM runs on one checkpoint while the caller prepares the next. Its output
    and log go to files in ``scratch`` (a pipe the caller does not read would
    fill and stall it).
    """

    def __init__(self, scratch: Path, timeout: int = 1800):
        self.timeout = timeout
        self.submitted: list[str] = []
        self.output = scratch / "vllm_results.jsonl"
        self.log = scratch / "vllm_worker.log"
        with self.output.open("w") as out, self.log.open("w") as log:
            self.process = subprocess.Popen(
                [str(VLLM_PYTHON), str(WORKER), "-"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=log,
                text=True,
                env=worker_env(),
            )

    def submit(self, job: dict) -> None:
        """Queue ``job`` (``{"model", "prompts", "tokens", ...}``)."""
        self.submitted.append(str(job["model"]))
        try:
            self.process.stdin.write(json.dumps({**job, "model": str(job["model"])}))
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; results() reports it with its log

    def results(self) -> dict[str, dict]:
        """Wait for every submitted job: vLLM's result per checkpoint."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait(timeout=self.timeout)
        results = {}
        for line in self.output.read_text().splitlines():
            if line.startswith('{"model"'):
                result = json.loads(line)
                results[result.pop("model")] = result
        missing = [model for model in self.submitted if model not in results]
        log = self.log.read_text()[-4000:]
        assert not missing, f"vLLM worker died (rc {self.process.returncode}): {log}"
        return results
