"""
The REAM authors' reference code (SamsungSAILMontreal/ream) and our
``REAMModifier`` on the trained fixture, with the same calibration token ids and
the same held-out perplexity metric.

    cd benchmarks && ../.venv/bin/python compare_reference.py --ream-src DIR
        [--ratios 0.25 0.375 0.5] [--calibration-rows 64]
        [--reference-saliency reap|freq] [--reference-merging logits+weights]
        [--ours-kwargs '{"saliency": "frequency"}'] [--ours-batch-size 8]

``DIR`` is a checkout of the reference repository (nothing of it is part of this
repository); its ``ream`` package and ``data/calibration_data.py`` are imported
from there. Its calibration ``.pt`` files are not needed.

Both sides start from the fixture in fp32 and see the fixture's calibration rows
(``quality.calibration_rows``: ``--calibration-rows // 3`` rows of 128 tokens
per domain, so 63 rows for the default 64, exactly the rows of ``quality.py``;
unpadded, all-ones attention mask):

- reference: ``ream.Merger`` with the defaults of its ``merge.py`` (merge_size =
  experts kept, grouping ``ream``, merging ``logits+weights``, saliency ``reap``,
  group_size 16, batch_size 8, seed 42, sequential). Its own ``__init__`` loads
  the rows from a temporary ``data/<name>_b<rows>_seq<len>_<tok>_seed<seed>.pt``
  written in its expected format, in a temporary working directory, as a single
  dataset (so no subset or shuffle is applied); numpy's and torch's global seeds
  are set to ``seed`` before ``fit`` (its ``__init__`` seeds numpy only on the
  multi-dataset path), so its per-expert token sampling is repeatable. The
  groups are recorded by wrapping the ``pseudo_group`` that ``ream.merger``
  imported; the model is the plain ``AutoModelForCausalLM`` (fused experts, the
  transformers-5 path of the reference);
- ours: ``oneshot`` with ``REAMModifier(sparsity=ratio, **ours_kwargs)`` on
  ``load_moe_model``, the rows in order (no shuffle) in batches of
  ``--ours-batch-size`` rows (default: the reference's batch size, so batches
  are the reference's chunks, which per-batch statistics such as the ``ream``
  saliency depend on); the groups come from its ``report_path`` report.

Quality: held-out perplexity per domain (``ream_modifiers.evaluation.perplexity``
on ``fixture/data/<domain>_heldout.jsonl``); recovery = ppl(original) /
ppl(compressed), and the mean over the three domains. Group agreement per MoE
layer, on the partitions of the original expert indices (each kept expert with
the experts merged into it): share of layers with identical partitions, mean
adjusted Rand index, and share of layers with identical kept (centroid) sets.

Shims, applied at run time to the imported reference modules, never to its
files:

1. ``create_causal_mask`` / ``create_sliding_window_causal_mask`` as imported
   by ``ream.moe_utils``: the reference passes ``input_embeds=`` and
   ``cache_position=`` (transformers 4.57); the wrapper renames the first to
   ``inputs_embeds`` and drops keywords the installed function does not take
   (transformers 5.x has no ``cache_position`` there).
2. ``Merger(..., verbose=False)`` (an argument, not a patch): its verbose print
   for the first MoE layer reads ``attention_mask.shape``, but for unpadded rows
   transformers 5.x returns no mask under sdpa (the causal flag is used
   instead), so that print raises ``AttributeError``. Only console output is
   lost.

Everything else runs as released, including its transformers-5 path for fused
experts (``gate_up_proj``/``down_proj`` tensors).

Writes ``results/compare_reference.json`` and prints the Markdown table; the
reference's own console output goes to ``results/tmp/compare_reference.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from math import comb
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BENCHMARKS = Path(__file__).parent
FIXTURE = BENCHMARKS / "fixture"
MODEL = FIXTURE / "model"
RESULTS = BENCHMARKS / "results"
OUTPUT = RESULTS / "compare_reference.json"
LOG = RESULTS / "tmp" / "compare_reference.log"
DOMAINS = ("general", "code", "math")
SEQ_LEN = 128
# names of the temporary calibration file the reference's __init__ reads
REFERENCE_DATASET = "fixture"
REFERENCE_TOKENIZER = "fixture"

#: ``{kept expert: its group, kept expert included}`` of one MoE layer
LayerGroups = dict[int, list[int]]


# -- pure helpers ---------------------------------------------------------------


def experts_kept(num_experts: int, ratio: float) -> int:
    """
    Experts kept per layer when a share ``ratio`` is removed (the reference's
    ``merge_size``).

    :param num_experts: experts per layer before compression
    :param ratio: share of experts removed, in (0, 1)
    :return: ``round(num_experts * (1 - ratio))``
    """
    return round(num_experts * (1 - ratio))


def canonical(groups: Iterable[Iterable[int]]) -> list[list[int]]:
    """
    A partition in a canonical form: sorted groups, sorted by their first member.

    :param groups: the groups, in any order
    :return: the same groups as sorted lists, in sorted order
    """
    return sorted(sorted(int(e) for e in group) for group in groups)


def partition_labels(groups: Iterable[Iterable[int]], num_experts: int) -> list[int]:
    """
    Cluster label of every expert ``0..num_experts-1``; experts in no group get
    a singleton label of their own.

    :param groups: disjoint groups of expert indices
    :param num_experts: experts in the layer
    :return: ``labels[e]`` = index of the group holding expert ``e``
    :raises ValueError: if an expert is in two groups or out of range
    """
    labels = [-1] * num_experts
    count = 0
    for count, group in enumerate(canonical(groups), start=1):
        for expert in group:
            if not 0 <= expert < num_experts or labels[expert] != -1:
                raise ValueError(f"expert {expert} out of range or in two groups")
            labels[expert] = count - 1
    for expert, label in enumerate(labels):
        if label == -1:
            labels[expert] = count
            count += 1
    return labels


def adjusted_rand_index(first: Sequence[int], second: Sequence[int]) -> float:
    """
    Adjusted Rand index of two clusterings of the same items (Hubert and Arabie,
    1985): 1 for identical partitions, about 0 for independent ones.

    :param first: cluster label of each item
    :param second: cluster label of each item, same length
    :return: the index; 1.0 when both partitions are all singletons or both a
        single cluster (where the usual formula is 0/0)
    :raises ValueError: if the lengths differ
    """
    if len(first) != len(second):
        raise ValueError("both clusterings must label the same items")
    cells: dict[tuple[int, int], int] = {}
    rows: dict[int, int] = {}
    columns: dict[int, int] = {}
    for a, b in zip(first, second, strict=True):
        cells[a, b] = cells.get((a, b), 0) + 1
        rows[a] = rows.get(a, 0) + 1
        columns[b] = columns.get(b, 0) + 1
    pairs = sum(comb(n, 2) for n in cells.values())
    row_pairs = sum(comb(n, 2) for n in rows.values())
    column_pairs = sum(comb(n, 2) for n in columns.values())
    total = comb(len(first), 2)
    expected = row_pairs * column_pairs / total if total else 0.0
    best = (row_pairs + column_pairs) / 2
    if best == expected:
        return 1.0
    return (pairs - expected) / (best - expected)


def layer_agreement(
    reference: LayerGroups, ours: LayerGroups, num_experts: int
) -> dict:
    """
    How far two groupings of one MoE layer agree.

    :param reference: ``{kept: group}`` of the reference
    :param ours: ``{kept: group}`` of our modifier
    :param num_experts: experts in the layer before compression
    :return: ``identical_partition``, ``ari``, ``identical_kept`` and
        ``kept_overlap`` (share of our kept experts the reference also kept)
    """
    ref_groups, our_groups = canonical(reference.values()), canonical(ours.values())
    ari = adjusted_rand_index(
        partition_labels(ref_groups, num_experts),
        partition_labels(our_groups, num_experts),
    )
    shared = set(reference) & set(ours)
    return {
        "identical_partition": ref_groups == our_groups,
        "ari": round(ari, 4),
        "identical_kept": set(reference) == set(ours),
        "kept_overlap": round(len(shared) / max(len(ours), 1), 4),
    }


def agreement(
    reference: Mapping[int, LayerGroups],
    ours: Mapping[int, LayerGroups],
    num_experts: int,
) -> dict:
    """
    Group agreement over all MoE layers both sides compressed.

    :param reference: ``{layer index: {kept: group}}`` of the reference
    :param ours: ``{layer index: {kept: group}}`` of our modifier
    :param num_experts: experts per layer before compression
    :return: shares of layers with identical partitions and kept sets, mean ARI,
        mean kept overlap and the per-layer values
    :raises ValueError: if the two sides compressed different layers
    """
    if set(reference) != set(ours):
        raise ValueError(
            f"layers differ: reference {sorted(reference)}, ours {sorted(ours)}"
        )
    layers = {
        index: layer_agreement(reference[index], ours[index], num_experts)
        for index in sorted(reference)
    }
    count = max(len(layers), 1)

    def mean(key: str) -> float:
        return round(sum(float(v[key]) for v in layers.values()) / count, 4)

    return {
        "identical_partitions": mean("identical_partition"),
        "ari": mean("ari"),
        "identical_kept": mean("identical_kept"),
        "kept_overlap": mean("kept_overlap"),
        "layers": {str(index): value for index, value in layers.items()},
    }


def report_groups(report: Mapping[str, Any]) -> dict[int, LayerGroups]:
    """
    ``{layer index: {kept: group}}`` from our modifier's report (per layer
    ``kept`` and ``groups`` ``{centroid: [merged members]}``).

    :param report: the ``report_path`` JSON of a merging modifier
    :return: the groups per decoder-layer index
    :raises ValueError: on a layer name without a decoder-layer index
    """
    result = {}
    for name, entry in report["layers"].items():
        match = re.search(r"layers\.(\d+)\.", name)
        if match is None:
            raise ValueError(f"no decoder-layer index in {name!r}")
        groups = entry.get("groups", entry.get("extra", {}).get("groups", {}))
        result[int(match.group(1))] = {
            int(kept): [int(kept), *map(int, groups.get(str(kept), []))]
            for kept in entry["kept"]
        }
    return result


def labels_to_groups(labels: Sequence[int], centroids: Sequence[int]) -> LayerGroups:
    """
    ``{kept: group}`` from the reference's ``pseudo_group`` output.

    :param labels: cluster label of each expert; label ``j`` is centroid ``j``'s
    :param centroids: ``centroids[j]`` = the expert kept for label ``j``
    :return: ``{centroid: sorted members, centroid included}``
    """
    groups: LayerGroups = {int(c): [] for c in centroids}
    for expert, label in enumerate(labels):
        groups[int(centroids[int(label)])].append(expert)
    return groups


def recoveries(
    original: Mapping[str, float] | None, compressed: Mapping[str, float] | None
) -> dict:
    """
    Perplexity recovery per domain, ppl(original) / ppl(compressed), and mean.

    :param original: ``{domain: perplexity}`` of the uncompressed model (None:
        not measured)
    :param compressed: ``{domain: perplexity}`` of the compressed model
    :return: ``{domain: recovery, ..., "mean": mean recovery}``; empty when
        either side was not measured
    """
    if original is None or compressed is None:
        return {}
    values = {d: original[d] / compressed[d] for d in original}
    values["mean"] = sum(values.values()) / len(values)
    return {key: round(value, 4) for key, value in values.items()}


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """
    The comparison table, one line per ratio (recoveries in percent).

    :param rows: the ``rows`` of ``compare_reference.json``
    :return: a Markdown table
    """
    lines = [
        "| ratio | reference mean recovery | ours mean recovery | per domain "
        "(reference / ours) | identical partitions | ARI | identical kept "
        "| wall (CPU) seconds, reference / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref, ours = row["reference"], row["ours"]
        domains = ", ".join(
            f"{d} {ref['recovery'][d]:.1%} / {ours['recovery'][d]:.1%}"
            for d in DOMAINS
            if d in ref["recovery"]
        )
        agree = row["agreement"]
        lines.append(
            f"| {row['ratio']:.0%} ({row['experts_kept']} kept) "
            f"| {_percent(ref['recovery'])} | {_percent(ours['recovery'])} "
            f"| {domains} | {agree['identical_partitions']:.0%} "
            f"| {agree['ari']:.3f} | {agree['identical_kept']:.0%} "
            f"| {_seconds(ref)} / {_seconds(ours)} |"
        )
    return "\n".join(lines)


def _percent(recovery: Mapping[str, float]) -> str:
    return f"{recovery['mean']:.1%}" if "mean" in recovery else "-"


def _seconds(side: Mapping[str, Any]) -> str:
    if "cpu_seconds" in side:
        return f"{side['seconds']:.1f} ({side['cpu_seconds']:.1f})"
    return f"{side['seconds']:.1f}"


# -- the reference --------------------------------------------------------------


def mask_keyword_shim(function: Callable) -> Callable:
    """
    ``function`` accepting the reference's transformers-4.57 keywords: renames
    ``input_embeds`` to ``inputs_embeds`` and drops keywords it does not take.

    :param function: a transformers mask builder such as ``create_causal_mask``
    :return: the wrapped function, marked so that it is wrapped only once
    """
    accepted = set(inspect.signature(function).parameters)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "input_embeds" in kwargs and "input_embeds" not in accepted:
            kwargs["inputs_embeds"] = kwargs.pop("input_embeds")
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return function(*args, **kwargs)

    wrapper.__ream_shim__ = True  # type: ignore[attr-defined]
    return wrapper


def import_reference(source: Path) -> ModuleType:
    """
    Import the reference's ``ream`` package from a checkout and install the shims
    listed in this module's docstring.

    :param source: root of the reference checkout (holds ``ream/`` and ``data/``)
    :return: the ``ream.merger`` module
    :raises FileNotFoundError: if ``source`` is not such a checkout
    """
    source = source.resolve()
    for needed in ("ream/merger.py", "data/calibration_data.py"):
        if not (source / needed).is_file():
            raise FileNotFoundError(f"{source / needed} not found: not a REAM checkout")
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    import ream.merger
    import ream.moe_utils

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        function = getattr(ream.moe_utils, name)
        if not getattr(function, "__ream_shim__", False):
            setattr(ream.moe_utils, name, mask_keyword_shim(function))
    return ream.merger


@contextlib.contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _recording(module: ModuleType, name: str, calls: list) -> Iterator[None]:
    """Wrap ``module.name`` so that every call's result is appended to ``calls``."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_reference(
    source: Path,
    rows: list[list[int]],
    ratio: float,
    args: argparse.Namespace,
    log: Any,
) -> tuple[PreTrainedModel, dict[int, LayerGroups], tuple[float, float]]:
    """
    Compress the fixture with the reference ``Merger``.

    :param source: reference checkout
    :param rows: calibration token ids, equal-length rows
    :param ratio: share of experts removed per layer
    :param args: the command-line options (``reference_*``, ``seed``)
    :param log: open text file receiving the reference's console output
    :return: the merged model, ``{layer: {kept: group}}`` and the wall and CPU
        seconds of ``Merger(...)`` plus ``fit()``
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    merger_module = import_reference(source)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    num_experts = model.config.num_experts
    batch = {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long),
    }
    calls: list = []
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        name = (
            f"{REFERENCE_DATASET}_b{len(rows)}_seq{len(rows[0])}_"
            f"{REFERENCE_TOKENIZER}_seed{args.seed}.pt"
        )
        torch.save(batch, data / name)
        with (
            _in_directory(Path(work)),
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
            _recording(merger_module, "pseudo_group", calls),
        ):
            start, cpu = time.perf_counter(), time.process_time()
            merger = merger_module.Merger(
                model,
                merge_size=experts_kept(num_experts, ratio),
                grouping="ream",
                merging=args.reference_merging,
                saliency=args.reference_saliency,
                dataset=REFERENCE_DATASET,
                mix_ratio="1.0",
                tokenizer_name=REFERENCE_TOKENIZER,
                batch_size=args.reference_batch_size,
                group_size=args.reference_group_size,
                sequential=True,
                calibration_data_size=len(rows),
                calibration_data_seq_len=len(rows[0]),
                seed=args.seed,
                # its verbose layer-0 print reads attention_mask.shape, but the
                # mask is None for unpadded rows under sdpa (causal flag instead)
                verbose=False,
            )
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
            model = merger.fit()
            seconds = (time.perf_counter() - start, time.process_time() - cpu)
    first = merger.first_moe_layer
    moe_layers = list(range(first, len(model.model.layers)))
    if len(calls) != len(moe_layers):
        raise RuntimeError(
            f"reference grouped {len(calls)} times for {len(moe_layers)} MoE layers"
        )
    groups = {
        layer: labels_to_groups(labels.tolist(), centroids.tolist())
        for layer, (labels, centroids) in zip(moe_layers, calls, strict=True)
    }
    return model.eval(), groups, seconds


# -- ours -----------------------------------------------------------------------


def run_ours(
    rows: list[list[int]],
    ratio: float,
    kwargs: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    model_dir: Path = MODEL,
) -> tuple[PreTrainedModel, dict[int, LayerGroups], tuple[float, float], dict]:
    """
    Compress the model (the fixture by default) with ``REAMModifier`` through
    ``oneshot``.

    :param rows: calibration token ids, equal-length rows
    :param ratio: share of experts removed per layer
    :param kwargs: further ``REAMModifier`` fields, passed through unchanged
    :param tokenizer: the fixture's tokenizer
    :param batch_size: rows per calibration batch; the rows are fed in order, not
        shuffled, so batches are the reference's chunks
    :param model_dir: the Qwen3-MoE checkpoint to compress
    :return: the compressed model, ``{layer: {kept: group}}``, the wall and CPU
        seconds of ``oneshot`` and the modifier's settings from its report
    """
    import torch
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    from ream_modifiers import REAMModifier
    from ream_modifiers.data.calibration import rows_dataset
    from ream_modifiers.moe import load_moe_model

    reset_session()
    model = load_moe_model(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as work:
        fields = {"report_path": f"{work}/report.json", **kwargs}
        modifier = REAMModifier(sparsity=ratio, **fields)
        start, cpu = time.perf_counter(), time.process_time()
        oneshot(
            model=model,
            dataset=rows_dataset(rows),
            processor=tokenizer,
            recipe=[modifier],
            num_calibration_samples=len(rows),
            max_seq_length=len(rows[0]),
            batch_size=batch_size,
            shuffle_calibration_samples=False,
        )
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
        report = json.loads(Path(fields["report_path"]).read_text())
    return model.eval(), report_groups(report), seconds, report.get("settings", {})


# -- driver ---------------------------------------------------------------------


def heldout_perplexities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Mapping[str, list[str]],
) -> dict[str, float]:
    """
    ``{domain: held-out perplexity}`` on the rows of ``heldout.py`` (the quality
    table's headline metric).

    :param model: the model to score (any device, fp32 here)
    :param tokenizer: the fixture's tokenizer
    :param texts: ``{domain: held-out texts}``
    :return: perplexity per domain
    """
    from heldout import heldout_perplexity

    scores = heldout_perplexity(model, tokenizer, dict(texts))
    return {d: scores[f"{d}_heldout_ppl"] for d in texts}


def build_random_model(overrides: Mapping[str, Any], where: Path) -> Path:
    """
    A random Qwen3-MoE (the fixture's routing: 32 experts, top-4, renormalised,
    its vocabulary and tokenizer) with ``overrides`` applied, saved in fp32.

    :param overrides: config fields, e.g. the width of a real model
    :param where: folder under which ``tmp/random_model`` is written
    :return: the model directory
    """
    import shutil

    import torch

    from ream_modifiers.tiny import build_tiny_moe

    fixture = json.loads((MODEL / "config.json").read_text())
    shape = {
        key: fixture[key]
        for key in ("vocab_size", "num_experts_per_tok", "norm_topk_prob")
    }
    shape["num_experts"] = fixture["num_local_experts"]
    directory = where / "tmp" / "random_model"
    build_tiny_moe(
        "qwen3_moe", directory, dtype=torch.float32, **{**shape, **overrides}
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, directory / name)
    return directory


def _reference_commit(source: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    The command-line options.

    :param argv: arguments, ``sys.argv[1:]`` if None
    :return: the parsed options
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--ream-src", type=Path, required=True)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument(
        "--reference-saliency", choices=["reap", "freq"], default="reap"
    )
    parser.add_argument(
        "--reference-merging",
        choices=["avg", "weights", "logits", "logits+weights", "none"],
        default="logits+weights",
    )
    parser.add_argument("--reference-group-size", type=int, default=16)
    parser.add_argument("--reference-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--ours-batch-size",
        type=int,
        default=None,
        help="oneshot calibration batch size (default: --reference-batch-size)",
    )
    parser.add_argument(
        "--ours-kwargs",
        type=json.loads,
        default={},
        help="JSON object of extra REAMModifier fields, passed through unchanged",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=MODEL,
        help="a Qwen3-MoE checkpoint instead of the fixture (its own tokenizer "
        "tokenizes the fixture's calibration text), e.g. a random model of "
        "realistic width from bench_memory.py --build",
    )
    parser.add_argument(
        "--random-model",
        type=json.loads,
        default=None,
        help="JSON config overrides of a random Qwen3-MoE to build and use instead "
        "of --model, with the fixture's tokenizer, e.g. '{\"hidden_size\": 2048, "
        '"moe_intermediate_size": 768, "num_hidden_layers": 2}\'',
    )
    parser.add_argument(
        "--no-heldout",
        action="store_true",
        help="skip the held-out perplexities (meaningless on a random model)",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both sides for every ratio, print the table and write the JSON."""
    args = parse_args(argv)
    if args.ours_batch_size is None:
        args.ours_batch_size = args.reference_batch_size
    import heldout
    import torch
    from common import quiet
    from quality import calibration_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ream_modifiers.evaluation import read_jsonl_texts

    quiet()
    torch.manual_seed(args.seed)
    if args.random_model is not None:
        args.model = build_random_model(args.random_model, args.output.parent)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = calibration_rows(tokenizer, args.calibration_rows, SEQ_LEN)
    texts = {
        d: read_jsonl_texts(FIXTURE / "data" / f"{d}_heldout.jsonl") for d in DOMAINS
    }

    def perplexities(model: PreTrainedModel) -> dict[str, float] | None:
        if args.no_heldout:
            return None
        return heldout_perplexities(model.eval(), tokenizer, texts)

    original_model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32
    )
    original = perplexities(original_model)
    num_experts = original_model.config.num_experts
    del original_model
    print(f"original held-out perplexity: {original}", flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "reference": {
            "source": str(args.ream_src),
            "commit": _reference_commit(args.ream_src),
            "saliency": args.reference_saliency,
            "merging": args.reference_merging,
            "grouping": "ream",
            "group_size": args.reference_group_size,
            "batch_size": args.reference_batch_size,
            "sequential": True,
            "seed": args.seed,
        },
        "ours": {"kwargs": args.ours_kwargs, "batch_size": args.ours_batch_size},
        "calibration": {"rows": len(rows), "seq_len": SEQ_LEN, "padding": False},
        "heldout": {"rows": heldout.ROWS, "seq_len": heldout.SEQ_LEN},
        "original_ppl": original,
        "rows": [],
    }
    with LOG.open("w") as log:
        for ratio in args.ratios:
            ref_model, ref_groups, ref_seconds = run_reference(
                args.ream_src, rows, ratio, args, log
            )
            ref_ppl = perplexities(ref_model)
            del ref_model
            our_model, our_groups, our_seconds, settings = run_ours(
                rows,
                ratio,
                args.ours_kwargs,
                tokenizer,
                args.ours_batch_size,
                args.model,
            )
            our_ppl = perplexities(our_model)
            del our_model
            row = {
                "ratio": ratio,
                "experts_kept": experts_kept(num_experts, ratio),
                "reference": {
                    "ppl": ref_ppl,
                    "recovery": recoveries(original, ref_ppl),
                    "seconds": round(ref_seconds[0], 1),
                    "cpu_seconds": round(ref_seconds[1], 1),
                    "groups": _json_groups(ref_groups),
                },
                "ours": {
                    "ppl": our_ppl,
                    "recovery": recoveries(original, our_ppl),
                    "seconds": round(our_seconds[0], 1),
                    "cpu_seconds": round(our_seconds[1], 1),
                    "settings": settings,
                    "groups": _json_groups(our_groups),
                },
                "agreement": agreement(ref_groups, our_groups, num_experts),
            }
            result["rows"].append(row)
            summary = {k: v for k, v in row["agreement"].items() if k != "layers"}
            print(
                f"ratio {ratio}: reference {row['reference']['recovery']}, "
                f"ours {row['ours']['recovery']}, agreement {summary}",
                flush=True,
            )
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(result["rows"]))


def _json_groups(groups: Mapping[int, LayerGroups]) -> dict[str, dict[str, list]]:
    return {
        str(layer): {str(kept): group for kept, group in sorted(per_layer.items())}
        for layer, per_layer in sorted(groups.items())
    }


if __name__ == "__main__":
    main()
