"""
Load checkpoints in vLLM and generate greedily. Runs in the vLLM venv
(``.venv-vllm``: vLLM pins another transformers than llm-compressor); one
process loads a list of checkpoints one after another, so vLLM is imported
once per batch, and prints one JSON line per checkpoint.

    .venv-vllm/bin/python tests_vllm/vllm_generate.py JOBS_JSON
    .venv-vllm/bin/python tests_vllm/vllm_generate.py - < JOB_LINES

JOBS_JSON holds a list of jobs; with ``-``, one job per line comes on standard
input as the test side prepares it (the tier runs vLLM on a checkpoint while
it compresses the next one), until the input closes. A job is
``{"model": DIR, "prompts": [[token ids], ...], "tokens": N,
"dtype": "float32", "tracking": "exact", "speculative": {...}}``
(``"as_shipped"``: vLLM's weight tracking without
:func:`shims.track_aliased_parameters`; ``speculative``: vLLM's
``speculative_config``, e.g. MTP, if any),
so vLLM sees exactly the ids the transformers side used. Each output line has
the checkpoint, ``ok``, the greedy tokens and, per generated position, vLLM's
raw logits of its top ``LOGITS`` tokens (``logprobs_mode`` ``raw_logits``) for a
teacher-forced comparison, or the error.

``enable_weights_track`` turns on vLLM's "every parameter was loaded" check
(``default_loader.py``), which vLLM runs by default only for unquantized
models. On an unquantized model it exempts the parameters of linear and MoE
layers; on a quantized one it checks them all. The token and logit comparisons
of the tests are what catch a wrong weight.

:mod:`shims` is installed first: int4 MoE experts and the dense int4 kernel
run in float32 PyTorch, and the CPU router honours selection biases (see there
for the vLLM lines each one replaces and why).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOGITS = 5

# small models, one engine at a time, on a CPU machine
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _int4(model: str) -> bool:
    config = json.loads((Path(model) / "config.json").read_text())
    groups = config.get("quantization_config", {}).get("config_groups", {})
    return any(
        (group.get("weights") or {}).get("num_bits") == 4 for group in groups.values()
    )


def generate(
    model: str,
    prompts: list[list[int]],
    tokens: int,
    dtype: str,
    speculative: dict | None = None,
    language_model_only: bool = False,
    options: dict | None = None,
) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"moe_backend": "emulation"} if _int4(model) else {}
    if speculative is not None:
        extra["speculative_config"] = speculative
    if language_model_only:
        # the towers are not built (nor read), nor the multimodal processor
        extra["language_model_only"] = True
    extra.update(options or {})  # a family's own engine arguments
    llm = LLM(
        model=model,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        logprobs_mode="raw_logits",
        max_logprobs=LOGITS,
        model_loader_extra_config={"enable_weights_track": True},
        **extra,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=LOGITS
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
    )
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logits": [
            [
                {str(token): entry.logprob for token, entry in position.items()}
                for position in o.outputs[0].logprobs
            ]
            for o in outputs
        ],
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def _jobs(source: str) -> Iterator[dict]:
    if source != "-":
        yield from json.loads(Path(source).read_text())
        return
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


def main(source: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import shims

    shims.install()
    for number, job in enumerate(_jobs(source), start=1):
        if number % shims.FULL_COLLECTION_EVERY == 0:
            shims.full_collection()
        shims.CORRECT_TRACKING = job.get("tracking", "exact") == "exact"
        started = time.monotonic()
        try:
            result = generate(
                job["model"],
                job["prompts"],
                job["tokens"],
                job.get("dtype", "float32"),
                job.get("speculative"),
                job.get("language_model_only", False),
                job.get("options"),
            )
            result["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported per checkpoint
            result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.monotonic() - started, 2)
        print(json.dumps({"model": job["model"], **result}), flush=True)
    os._exit(0)  # vLLM's teardown at exit is slow and not needed


if __name__ == "__main__":
    main(sys.argv[1])
