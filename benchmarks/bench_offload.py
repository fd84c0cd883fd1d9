"""
Larger than memory (issue 7): expert reduction of a random Qwen3-MoE whose
weights exceed the machine's free memory, with every weight offloaded to disk,
and a check that it decides exactly what an in-memory run decides.

    .venv/bin/python benchmarks/bench_offload.py --workdir /path/with/space \\
        [--layers 32 --experts 128 --hidden 4096 --width 256] [--method ream]

1. The model is written shard by shard (one decoder layer per safetensors file,
   random bf16 weights), so building it never holds more than one layer.
2. A reference copy holds the embeddings, the first ``--reference-layers``
   decoder layers (the same tensors, copied from the shards), the final norm and
   the head.
3. In a fresh process each, for its own peak RSS: the big model is loaded with
   ``offload="disk"`` and compressed with ``oneshot``, then saved; the reference
   is loaded in memory and compressed and saved the same way.
4. The reports must keep and merge the same experts in the reference's layers,
   and the saved tensors of those layers must be bitwise identical.

REAM runs with ``merge: activations`` (neuron alignment on sampled activations
only): the PCA weight descriptor of the default ``aligned`` merge builds a
3H x 3H fp64 covariance from every neuron, about 10 TFLOP per layer at hidden
4096, hours on two CPU cores. ``--method reap`` prunes instead.

Writes results/offload.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from common import (
    RESULTS,
    PeakSampler,
    header,
    memory_status,
    print_result,
    quiet,
    run_measured,
)

HERE = Path(__file__).parent
SHARD = "model-{:05d}-of-{:05d}.safetensors"


# -- the model ------------------------------------------------------------------


def model_config(args, layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.width,
        moe_intermediate_size=args.width,
        num_hidden_layers=layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        # a small attention: the experts are what must not fit in memory
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        dtype=args.dtype,
    )


def _layer_shapes(config) -> tuple[dict, dict]:
    """``(global tensors, layer-0 tensors)`` as ``{name: shape}``, hub names."""
    import torch
    from transformers import AutoModelForCausalLM

    one = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    glob, layer = {}, {}
    prefix = "model.layers.0."
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefix):
            glob[name] = tuple(tensor.shape)
        elif ".mlp.experts." not in name:
            layer[name[len(prefix) :]] = tuple(tensor.shape)
    # experts are stored per expert on the hub (transformers fuses them on load)
    h, w = config.hidden_size, config.moe_intermediate_size
    for e in range(config.num_experts):
        for proj, shape in (("gate", (w, h)), ("up", (w, h)), ("down", (h, w))):
            layer[f"mlp.experts.{e}.{proj}_proj.weight"] = shape
    return glob, layer


def _random(name: str, shape: tuple, dtype, generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    values = torch.empty(shape, dtype=torch.float32)
    values.normal_(0.0, 0.02, generator=generator)
    return values.to(dtype)


def build_model(directory: Path, args) -> int:
    """Write the model one decoder layer per shard; return its weight bytes."""
    import torch
    from safetensors.torch import save_file

    from ream_modifiers.tiny import build_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = model_config(args, args.layers)
    dtype = getattr(torch, args.dtype)
    glob, layer = _layer_shapes(config)
    shards = args.layers + 1
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for index in range(shards):
        if index < args.layers:
            names = {f"model.layers.{index}.{k}": s for k, s in layer.items()}
        else:
            names = glob
        tensors = {n: _random(n, s, dtype, generator) for n, s in names.items()}
        file = SHARD.format(index + 1, shards)
        save_file(tensors, directory / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        print(
            f"  shard {index + 1}/{shards}: {total / 2**30:.1f} GiB, "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file))
    config.save_pretrained(directory)
    build_tokenizer(config.vocab_size).save_pretrained(directory)
    return total


def build_reference(source: Path, directory: Path, args) -> int:
    """The first ``--reference-layers`` decoder layers of ``source``, same tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    k = args.reference_layers
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())
    wanted = {
        name: file
        for name, file in weight_map["weight_map"].items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < k
    }
    tensors = {}
    for file in sorted(set(wanted.values())):
        with safe_open(source / file, "pt") as handle:
            for name in handle.keys():
                if name in wanted:
                    tensors[name] = handle.get_tensor(name)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model_config(args, k).save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- one measured run (a child process) ----------------------------------------


def child(args) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from ream_modifiers import REAMModifier, REAPModifier
    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model
    from ream_modifiers.moe.offload import parameter_totals

    quiet()
    model_dir = Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(
        "bundled", tokenizer, args.samples, args.seq_len
    )
    runtime_rss = memory_status("VmRSS")  # interpreter, torch, llm-compressor, data
    runtime_anon = memory_status("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    sampler.enter("load")
    start = time.perf_counter()
    offload = args.offload if args.offload_folder else "none"
    extra = {}
    if offload == "auto" and args.max_cpu_gib is not None:
        extra["max_memory"] = {"cpu": int(args.max_cpu_gib * 2**30)}
    model = load_moe_model(
        model_dir,
        dtype="auto",
        offload=offload,
        offload_folder=args.offload_folder,
        **extra,
    )
    load_s = time.perf_counter() - start
    _, model_bytes = parameter_totals(model)
    if args.method == "ream":
        modifier = REAMModifier(
            sparsity=args.sparsity,
            merge="activations",
            max_activation_tokens=args.samples * args.seq_len,
        )
    else:
        modifier = REAPModifier(sparsity=args.sparsity)
    sampler.enter("oneshot")
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
        # a fixed order, as in the recorded run (the sums and REAM's activation
        # samples no longer depend on it)
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - start
    sampler.enter("save")
    start = time.perf_counter()
    model.save_pretrained(args.output)
    save_s = time.perf_counter() - start
    written = 0
    if args.offload_folder:
        folder = Path(args.offload_folder)
        written = sum(f.stat().st_size for f in folder.iterdir() if not f.is_symlink())
    phases = sampler.stop()
    peak_anon = max(p["anon"] for p in phases.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "offload": offload,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "oneshot_s": round(oneshot_s, 1),
        "save_s": round(save_s, 1),
        "model_bytes": model_bytes,
        "peak_rss_bytes": peak,
        "peak_rss_over_model": round(peak / model_bytes, 3),
        "runtime_rss_bytes": runtime_rss,
        "peak_rss_above_runtime_over_model": round(
            (peak - runtime_rss) / model_bytes, 3
        ),
        "peak_anon_bytes": peak_anon,
        "peak_anon_over_model": round(peak_anon / model_bytes, 3),
        "peak_anon_above_runtime_over_model": round(
            (peak_anon - runtime_anon) / model_bytes, 3
        ),
        "offload_folder_written_bytes": written,
        "phase_peaks_bytes": phases,
    }
    print_result(result)


def run_child(model_dir: Path, output: Path, args, offload_folder=None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model-dir",
        str(model_dir),
        "--output",
        str(output),
        "--method",
        args.method,
        "--sparsity",
        str(args.sparsity),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--offload",
        args.offload,
    ]
    if offload_folder is not None:
        command += ["--offload-folder", str(offload_folder)]
    if args.max_cpu_gib is not None:
        command += ["--max-cpu-gib", str(args.max_cpu_gib)]
    start = time.perf_counter()
    result = run_measured(command, HERE)
    result["process_s"] = round(time.perf_counter() - start, 1)
    return result


# -- comparison -----------------------------------------------------------------


def compare(offloaded: Path, reference: Path, layers: int) -> dict:
    """Decisions and saved tensors of the reference's layers, offloaded vs memory."""
    import torch
    from safetensors import safe_open

    reports = [
        json.loads((d / "expert_reduction.json").read_text())[-1]
        for d in (offloaded, reference)
    ]
    decisions = {}
    for name, entry in reports[1]["layers"].items():
        other = reports[0]["layers"][name]
        decisions[name] = {
            "kept": entry["kept"],
            "merged_groups": len(entry.get("groups") or {}),
            "same_kept": other["kept"] == entry["kept"],
            "same_groups": other.get("groups") == entry.get("groups"),
        }

    def tensors(directory: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    if (
                        key.startswith("model.layers.")
                        and int(key.split(".")[2]) < layers
                    ):
                        found[key] = (file, key)
        return found

    mine, theirs = tensors(offloaded), tensors(reference)
    unequal, max_diff = [], 0.0
    for key, (file, name) in theirs.items():
        if key not in mine:
            unequal.append(key)
            continue
        with safe_open(file, "pt") as a, safe_open(mine[key][0], "pt") as b:
            left, right = a.get_tensor(name), b.get_tensor(key)
        if left.shape != right.shape or not torch.equal(left, right):
            unequal.append(key)
            if left.shape == right.shape:
                diff = (left.float() - right.float()).abs().max().item()
                max_diff = max(max_diff, diff)
    return {
        "layers_compared": layers,
        "decisions": decisions,
        "identical_decisions": all(
            d["same_kept"] and d["same_groups"] for d in decisions.values()
        ),
        "tensors_compared": len(theirs),
        "extra_tensors_in_offloaded": sorted(set(mine) - set(theirs))[:5],
        "unequal_tensors": unequal[:20],
        "identical_weights": not unequal and set(mine) == set(theirs),
        "max_abs_diff": max_diff,
    }


def _meminfo(field: str) -> int:
    """Bytes of a /proc/meminfo field (MemTotal, MemFree, MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--offload-folder", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the model, its reference copy, the offload folder and the "
        "outputs go (needs ~1.6x the model size free)",
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256, help="expert width")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-layers", type=int, default=2)
    parser.add_argument("--method", choices=["ream", "reap"], default="ream")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--offload", choices=["disk", "auto"], default="disk")
    parser.add_argument(
        "--max-cpu-gib",
        type=float,
        help="CPU memory budget of --offload auto (default: free memory less 5 GB)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the models and outputs"
    )
    parser.add_argument("--result", type=Path, default=RESULTS / "offload.json")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.workdir is None:
        parser.error("--workdir is required")
    if not 0 < args.reference_layers <= args.layers:
        parser.error("--reference-layers must be in [1, --layers]")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir, reference_dir = work / "model", work / "reference"
    offload_folder = work / "offload"
    memory = {f: _meminfo(f) for f in ("MemTotal", "MemFree", "MemAvailable")}
    disk_free_before = shutil.disk_usage(work).free

    start = time.perf_counter()
    if (model_dir / "model.safetensors.index.json").is_file():
        print(f"reusing {model_dir}", flush=True)
        checkpoint_bytes = _dir_bytes(model_dir)
        build_s = None
    else:
        print(f"building {model_dir}", flush=True)
        build_model(model_dir, args)
        checkpoint_bytes = _dir_bytes(model_dir)
        build_s = round(time.perf_counter() - start, 1)
    shutil.rmtree(reference_dir, ignore_errors=True)
    build_reference(model_dir, reference_dir, args)

    outputs = {"offloaded": work / "out-offloaded", "reference": work / "out-reference"}
    for path in [*outputs.values(), offload_folder]:
        shutil.rmtree(path, ignore_errors=True)
    print("offloaded run", flush=True)
    offloaded = run_child(model_dir, outputs["offloaded"], args, offload_folder)
    print(json.dumps(offloaded), flush=True)
    shutil.rmtree(offload_folder, ignore_errors=True)
    print("in-memory reference run", flush=True)
    reference = run_child(reference_dir, outputs["reference"], args)
    print(json.dumps(reference), flush=True)
    comparison = compare(
        outputs["offloaded"], outputs["reference"], args.reference_layers
    )
    result = {
        **header(args),
        "model": {
            "layers": args.layers,
            "experts": args.experts,
            "hidden": args.hidden,
            "expert_width": args.width,
            "top_k": args.top_k,
            "dtype": args.dtype,
            "checkpoint_bytes": checkpoint_bytes,
        },
        "method": {
            "name": args.method,
            "sparsity": args.sparsity,
            **({"merge": "activations"} if args.method == "ream" else {}),
        },
        "machine_memory": {
            "total_bytes": memory["MemTotal"],
            "free_bytes_at_start": memory["MemFree"],
            "available_bytes_at_start": memory["MemAvailable"],
            "model_over_free": round(checkpoint_bytes / memory["MemFree"], 2),
            "model_over_available": round(checkpoint_bytes / memory["MemAvailable"], 2),
            "disk_free_bytes_at_start": disk_free_before,
        },
        "build_s": build_s,
        "offloaded": offloaded,
        "offloaded_output_bytes": _dir_bytes(outputs["offloaded"]),
        "reference": {**reference, "layers": args.reference_layers},
        "comparison": comparison,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(comparison, indent=2), flush=True)
    print(f"wrote {args.result}")
    if not args.keep:
        for path in [*outputs.values(), reference_dir, model_dir]:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
