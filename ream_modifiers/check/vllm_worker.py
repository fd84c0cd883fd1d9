"""
Load one checkpoint in vLLM and generate a few greedy tokens; print one JSON
line. Run by :func:`ream_modifiers.check.vllm_probe.probe_vllm` as a script, with an
interpreter that has vLLM (often another venv than llm-compressor's), so it
imports nothing from this package.

    python vllm_worker.py DIRECTORY TOKENS
"""

from __future__ import annotations

import json
import os
import sys
import traceback

PROMPT = "The capital of France is"
# the engine in this process: nothing outlives it to hold the caller's pipes
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(directory: str, tokens: int) -> None:
    result: dict = {}
    try:
        import vllm
        from vllm import LLM, SamplingParams

        result["version"] = vllm.__version__
        llm = LLM(
            model=directory,
            enforce_eager=True,
            max_model_len=256,
            max_num_seqs=1,
            seed=0,
            # every parameter must come from the checkpoint (vLLM checks this by
            # default only for unquantized models)
            model_loader_extra_config={"enable_weights_track": True},
        )
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        (output,) = llm.generate([PROMPT], params, use_tqdm=False)
        result.update(ok=True, text=output.outputs[0].text)
        result["tokens"] = len(output.outputs[0].token_ids)
        llm.llm_engine.engine_core.shutdown()
    except Exception as error:  # noqa: BLE001 - reported to the caller
        result.update(ok=False, error=f"{type(error).__name__}: {error}")
        result["traceback"] = traceback.format_exc()[-4000:]
    print(json.dumps(result), flush=True)
    os._exit(0)  # vLLM's teardown at exit is slow and not needed


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
