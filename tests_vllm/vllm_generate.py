"""
Load one checkpoint in vLLM and generate greedily. Runs in the vLLM venv
(``.venv-vllm``: vLLM pins another transformers than llm-compressor), one
checkpoint per process, and prints one JSON line.

    .venv-vllm/bin/python tests_vllm/vllm_generate.py MODEL_DIR PROMPTS_JSON TOKENS

PROMPTS_JSON holds ``[[token ids], ...]``, so vLLM sees exactly the ids the
transformers side used. The output has the greedy tokens and, per generated
position, vLLM's raw logits of its top ``LOGITS`` tokens (``logprobs_mode``
``raw_logits``), for a teacher-forced comparison.

``enable_weights_track`` turns on vLLM's "every parameter was loaded" check,
which vLLM runs by default only for unquantized models. Even then it exempts
the linear and MoE weights of unquantized models (``track_weights_loading``), so
the token and logit comparisons of the tests are what catch a wrong weight.
"""

from __future__ import annotations

import json
import os
import sys

LOGITS = 5

# one small model per process on a CPU machine
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(model: str, prompts_path: str, tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(prompts_path) as handle:
        prompts = json.load(handle)
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        logprobs_mode="raw_logits",
        max_logprobs=LOGITS,
        model_loader_extra_config={"enable_weights_track": True},
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
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
