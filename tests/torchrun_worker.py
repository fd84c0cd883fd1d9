"""
Runs under ``torchrun`` (or alone, as the single-process reference) for
``tests/test_distributed.py``: every calibration-based method compresses the same
tiny model on the same calibration rows and saves into ``OUT/<method>``.

    torchrun --nproc_per_node 2 tests/torchrun_worker.py MODEL OUT
    python tests/torchrun_worker.py MODEL OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.core import reset_session  # noqa: E402
from torch import distributed as dist  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ream_modifiers.data import build_calibration_dataset  # noqa: E402
from ream_modifiers.distributed import (  # noqa: E402
    init_distributed,
    shard_for_rank,
)
from ream_modifiers.moe import load_moe_model  # noqa: E402
from ream_modifiers.observe.statistics import (  # noqa: E402
    ActivationSamples,
    RoutedExpertSums,
)
from ream_modifiers.registry import methods  # noqa: E402

NUM_SAMPLES = 10  # not a multiple of the ranks: unequal shards
SEQ_LEN = 24

# every method that calibrates; REAM with fewer activation samples than tokens,
# so the choice of samples matters
_OVERRIDES = {"ream": {"max_activation_tokens": 48}}
METHODS = {
    method.name: (
        lambda method=method: method.modifier(
            sparsity=0.5, **_OVERRIDES.get(method.name, {})
        )
    )
    for method in methods()
    if method.needs_data
}


def check_rank_without_data() -> None:
    """
    A rank that fed nothing into a statistic still joins every collective
    (llm-compressor #3045 deadlocked here): the source ends with its own values.
    """
    from ream_modifiers.observe.collector import BatchRouting

    experts, width = 4, 3
    sums, samples = RoutedExpertSums(experts), ActivationSamples(experts, width, 8)
    if dist.get_rank() == 0:
        hidden = torch.zeros(5, 2)
        routing = BatchRouting(
            hidden,
            torch.zeros(5, 1, dtype=torch.long),
            torch.ones(5, 1),
            None,
            order=torch.arange(5),
            offsets=[0, 5, 5, 5, 5],
            layer=None,
        )
        samples.update_routing(routing)
        for expert in range(experts):
            samples.update_intermediate(expert, torch.randn(5, width), routing)
        sums.ensure_allocated(torch.device("cpu"), 2)
        sums.tensors["count"] += torch.arange(experts, dtype=torch.float64)
    expected = [t.clone() for t in samples.sample()] if dist.get_rank() == 0 else []
    for statistic in (sums, samples):
        statistic.ensure_allocated(torch.device("cpu"), 2)
        statistic.reduce_to_source(None, 0)
    if dist.get_rank() == 0:
        assert torch.equal(sums.tensors["count"], torch.arange(4.0).double())
        assert all(map(torch.equal, samples.sample(), expected))
        print("check_rank_without_data passed", flush=True)


def refuse_unsharded(model_dir: str, out: str, dataset, tokenizer) -> None:
    """Every rank passes the whole dataset: refused before calibration."""
    model = load_moe_model(model_dir, dtype=torch.float32)
    try:
        oneshot(
            model=model,
            dataset=dataset,
            processor=tokenizer,
            recipe=[METHODS["reap"]()],
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
            output_dir=out,
        )
    except ValueError as error:
        print(f"refused: {error}", flush=True)
    else:
        raise AssertionError("the unsharded dataset was accepted")


def main(model_dir: str, out: str, methods: list[str]) -> None:
    distributed = init_distributed()
    torch.set_num_threads(1)  # same kernels, so same bits, in every process
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset("bundled", tokenizer, NUM_SAMPLES, SEQ_LEN)
    if distributed:
        check_rank_without_data()
        refuse_unsharded(model_dir, str(Path(out) / "unsharded"), dataset, tokenizer)
    for name in methods:
        reset_session()
        model = load_moe_model(model_dir, dtype=torch.float32)
        oneshot(
            model=model,
            dataset=shard_for_rank(dataset),
            processor=tokenizer,
            recipe=[METHODS[name]()],
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
            output_dir=str(Path(out) / name),
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(METHODS))
