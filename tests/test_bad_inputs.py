"""
Bad inputs, as a table: each is refused before calibration with exit code 2,
one ``error:`` line naming the problem, a ``fix:`` line, no traceback, and
nothing written: no output directory and no ``.<name>.tmp-<pid>`` staging
directory beside it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ream_modifiers.budget_check import ExpertBudgetError, ModelConfigError
from ream_modifiers.cli import compress
from ream_modifiers.data.calibration import CalibrationDataError
from ream_modifiers.errors import InputError
from ream_modifiers.model_files import ModelFileError
from ream_modifiers.recipe_check import RecipeError
from ream_modifiers.tiny import build_tiny_moe
from tests.helpers import refused


def _recipe(modifier: str, settings: str) -> str:
    return f"s_stage:\n  s_modifiers:\n    {modifier}: {{{settings}}}\n"


# name -> recipe text; a case's recipe is one of these or a name in recipes/
RECIPES = {
    "sparsity-0.99": _recipe("REAPModifier", "sparsity: 0.99"),
    "sparsity-0.5": _recipe("REAPModifier", "sparsity: 0.5"),
    "sparsity-1.5": _recipe("REAPModifier", "sparsity: 1.5"),
    "sparsity-0": _recipe("REAPModifier", "sparsity: 0"),
    "keep-16": _recipe("REAPModifier", "num_experts: 16"),
    "keep-1": _recipe("AIMERModifier", "num_experts: 1"),
    "keep-5": _recipe("REAPModifier", "num_experts: 5"),
    "keep-2": _recipe("REAPModifier", "num_experts: 2"),
    "both-budgets": _recipe("REAPModifier", "num_experts: 4, sparsity: 0.5"),
    "broken-yaml": "reap_stage:\n  reap_modifiers:\n\tREAPModifier: {}\n",
    "stage-key": "stage:\n  reap_modifiers:\n    REAPModifier: {sparsity: 0.25}\n",
    "group-key": "reap_stage:\n  reap:\n    REAPModifier: {sparsity: 0.25}\n",
    "misspelled-field": _recipe("REAPModifier", "sparsty: 0.25"),
    "misspelled-class": _recipe("REAPModifer", "sparsity: 0.25"),
    "bad-scheme": _recipe("REAPModifier", "sparsity: 0.25")
    + "    GPTQModifier: {targets: [Linear], scheme: W4A17}\n",
}
# name -> calibration file content (None: a folder holding only notes.md)
DATA = {
    "empty.txt": "",
    "empty.jsonl": "\n\n",
    "no-text.jsonl": json.dumps({"body": "some text"}) + "\n",
    "not-json.jsonl": '{"text": "fine"}\n{"text": oops}\n',
    "no-text-files": None,
}


def _copy_model(source: Path, target: Path, **config: object) -> Path:
    """A copy of a saved model, with ``config`` merged into its config.json."""
    shutil.copytree(source, target)
    path = target / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


_SMALL = dict(hidden_size=128, num_hidden_layers=2, vocab_size=512)
UNSUPPORTED_CONFIGS = {
    "minimax": dict(
        model_type="minimax",
        architectures=["MiniMaxForCausalLM"],
        num_local_experts=8,
        num_experts_per_tok=2,
        **_SMALL,
    ),
    "dbrx": dict(
        model_type="dbrx",
        architectures=["DbrxForCausalLM"],
        d_model=128,
        n_layers=2,
        vocab_size=512,
        ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 128},
    ),
    # a refused wrapper: Qwen3-Omni's thinker saved alone
    "qwen3_omni_moe_thinker": dict(
        model_type="qwen3_omni_moe_thinker",
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
        text_config=dict(
            model_type="qwen3_omni_moe_text",
            num_experts=8,
            num_experts_per_tok=2,
            **_SMALL,
        ),
    ),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """Bad models, recipes and data, made once for the module."""
    root = tmp_path_factory.mktemp("bad-inputs")
    qwen, deepseek = tiny_model_dir("qwen3_moe"), tiny_model_dir("deepseek_v3")
    models = {"qwen": qwen, "deepseek": deepseek, "missing": root / "missing"}

    models["no-config"] = root / "no-config"
    models["no-config"].mkdir()
    models["no-weights"] = no_weights = root / "no-weights"
    shutil.copytree(qwen, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))

    models["truncated"] = _copy_model(qwen, root / "truncated")
    shard = models["truncated"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    models["bad-header"] = _copy_model(qwen, root / "bad-header")
    shard = models["bad-header"] / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    raw[8 : 8 + length] = b"not json".ljust(length)  # same length, not JSON
    shard.write_bytes(bytes(raw))

    models["trailing-bytes"] = _copy_model(qwen, root / "trailing-bytes")
    with (models["trailing-bytes"] / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 100)

    # a two-shard index whose second shard never arrived
    models["missing-shard"] = sharded = _copy_model(qwen, root / "missing-shard")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    # config.json only: nothing of these needs the weights to be refused
    models["config-not-json"] = _copy_model(qwen, root / "config-not-json")
    (models["config-not-json"] / "config.json").write_text("{not json")
    models["top-k-10"] = _copy_model(qwen, root / "top-k-10", num_experts_per_tok=10)
    # an INT4 release (Kimi-K2.5's format): packed weights load with no `weight`
    packed = dict(quant_method="compressed-tensors", format="pack-quantized")
    models["packed-int4"] = _copy_model(
        qwen, root / "packed-int4", quantization_config=packed
    )
    # a dense model's config: no expert count, no top-k
    models["dense"] = _copy_model(qwen, root / "dense")
    dense = dict(model_type="llama", architectures=["LlamaForCausalLM"])
    dense.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    dense.update(num_attention_heads=4, vocab_size=512)
    (models["dense"] / "config.json").write_text(json.dumps(dense))
    # MoE families that cannot be reduced (ream_modifiers/moe/unsupported.yaml)
    for name, config in UNSUPPORTED_CONFIGS.items():
        models[name] = _copy_model(qwen, root / name)
        (models[name] / "config.json").write_text(json.dumps(config))
    # a vision-language model, and a copy without its image preprocessing
    models["vl"] = vl = tiny_model_dir("qwen3_vl_moe")
    models["vl-no-processor"] = _copy_model(vl, root / "vl-no-processor")
    (models["vl-no-processor"] / "preprocessor_config.json").unlink()
    # 8 experts in 2 groups, a token may use 1 group: 4 reachable, top-3
    models["deepseek-top-3"] = _copy_model(
        deepseek, root / "deepseek-top-3", num_experts_per_tok=3
    )
    # kv_b_proj reads the 32-wide latent: W4A16's group size 128 cannot split it
    models["deepseek-kv-32"] = build_tiny_moe(
        "deepseek_v3", root / "deepseek-kv-32", kv_lora_rank=32
    )

    recipes = {}
    for name, text in RECIPES.items():
        recipes[name] = root / f"{name}.yaml"
        recipes[name].write_text(text)
    data = {}
    for name, text in DATA.items():
        data[name] = root / name
        if text is None:
            data[name].mkdir()
            (data[name] / "notes.md").write_text("not calibration text")
        else:
            data[name].write_text(text)
    return SimpleNamespace(root=root, models=models, recipes=recipes, data=data)


@dataclass(frozen=True)
class Case:
    """
    One bad input.

    :param named: what the ``error:`` line must contain
    :param fix: what the ``fix:`` line must contain
    :param recipe: a key of :data:`RECIPES`, else a recipe name or path
    :param model: a key of the workspace's models, else given as it is
    :param data: ``--dataset``: a key of :data:`DATA`, else given as it is;
        None for no ``--dataset``
    :param extra: more arguments
    :param output: ``new`` (absent), ``non-empty`` (a directory with a file)
        or ``file``
    """

    named: str
    fix: str = ""
    recipe: str = "reap_w4a16"
    model: str = "qwen"
    data: str | None = "bundled"
    extra: tuple[str, ...] = ()
    output: str = "new"


CASES = {
    # -- the model's files ---------------------------------------------------
    "model-dir-missing": Case("missing does not exist", model="missing"),
    "model-dir-without-config": Case("has no config.json", model="no-config"),
    "model-without-weights": Case("has config.json but no weights", model="no-weights"),
    "shard-cut-in-half": Case(
        "model.safetensors is truncated", "re-download", model="truncated"
    ),
    "already-quantized-source": Case(
        "is already compressed (config.json quantization_config: "
        "compressed-tensors, format 'pack-quantized')",
        "start from the model's unquantized (bf16) release",
        model="packed-int4",
    ),
    "shard-header-not-json": Case(
        "model.safetensors is corrupt: its safetensors header is not JSON",
        "re-save",
        model="bad-header",
    ),
    "shard-with-trailing-bytes": Case(
        "model.safetensors is corrupt: 100 bytes after the last tensor",
        model="trailing-bytes",
    ),
    "shard-missing-from-index": Case(
        "model-00002-of-00002.safetensors named by model.safetensors.index.json "
        "is missing",
        model="missing-shard",
    ),
    # -- the model's config against the recipe's budget ------------------------
    "config-json-not-json": Case(
        "cannot read config.json of", "valid JSON", model="config-not-json"
    ),
    "config-top-k-above-expert-count": Case(
        "num_experts_per_tok=10 is larger than num_experts=8", model="top-k-10"
    ),
    "dense-model": Case("(model_type 'llama') is not an MoE model", model="dense"),
    "unsupported-family-minimax": Case(
        "(model_type 'minimax'), which cannot be reduced: vLLM 0.32 has no model",
        "serve MiniMax-M2",
        model="minimax",
    ),
    "unsupported-family-qwen3_omni_moe_thinker": Case(
        "(model_type 'qwen3_omni_moe_thinker'), which cannot be reduced: a "
        "checkpoint of the thinker alone has no vLLM architecture",
        "reduce the whole Qwen3-Omni checkpoint",
        model="qwen3_omni_moe_thinker",
    ),
    "unsupported-family-dbrx": Case(
        "is DBRX (model_type 'dbrx'), which cannot be reduced",
        "no expert-reduction tool supports DBRX",
        model="dbrx",
    ),
    "sparsity-keeps-fewer-than-top-k": Case(
        "sparsity=0.99 cannot be met by",
        "set num_experts between 2 and 7",
        recipe="sparsity-0.99",
    ),
    "num-experts-above-expert-count": Case(
        "num_experts=16 keeps 16 of 8 experts per layer", recipe="keep-16"
    ),
    "num-experts-below-top-k": Case(
        "AIMERModifier num_experts=1 cannot be met by", recipe="keep-1"
    ),
    "num-experts-not-a-multiple-of-n-group": Case(
        "cannot be split evenly over the router's n_group=2 expert groups",
        "set num_experts to 4 or 6",
        recipe="keep-5",
        model="deepseek",
    ),
    "groups-left-with-one-expert": Case(
        "keeping 2 experts leaves 1 per group", recipe="keep-2", model="deepseek"
    ),
    "groups-reach-fewer-than-top-k": Case(
        "leaves 2 reachable per token, fewer than the router's top_k=3",
        recipe="sparsity-0.5",
        model="deepseek-top-3",
    ),
    "group-size-does-not-divide-a-layer": Case(
        "group_size 128 does not divide", "kv_b_proj", model="deepseek-kv-32"
    ),
    # -- the recipe ------------------------------------------------------------
    "unknown-recipe": Case("no_such_recipe", recipe="no_such_recipe"),
    "broken-yaml": Case("is not valid YAML", recipe="broken-yaml"),
    "stage-key-without-_stage": Case("would skip stage without", recipe="stage-key"),
    "group-key-without-_modifiers": Case(
        "would skip reap_stage.reap without", recipe="group-key"
    ),
    "misspelled-field": Case(
        "REAPModifier.sparsty", "did you mean sparsity?", recipe="misspelled-field"
    ),
    "misspelled-class": Case(
        "no modifier class named 'REAPModifer'",
        "did you mean REAPModifier?",
        recipe="misspelled-class",
    ),
    "bad-quantization-scheme": Case("GPTQModifier.scheme", recipe="bad-scheme"),
    "sparsity-1.5": Case("sparsity must be in (0, 1), got 1.5", recipe="sparsity-1.5"),
    "sparsity-0": Case("sparsity must be in (0, 1), got 0", recipe="sparsity-0"),
    "both-num-experts-and-sparsity": Case(
        "REAPModifier: give exactly one of `num_experts`", recipe="both-budgets"
    ),
    # -- the calibration data --------------------------------------------------
    "empty-txt": Case("empty.txt' holds no text", data="empty.txt"),
    "empty-jsonl": Case(
        "empty.jsonl' holds no text (no non-empty 'text' field)", data="empty.jsonl"
    ),
    "jsonl-rows-without-text-field": Case(
        "no-text.jsonl:1: record has no 'text' field",
        "--text-field",
        data="no-text.jsonl",
    ),
    "jsonl-row-not-json": Case(
        "not-json.jsonl:2 is not valid JSON", data="not-json.jsonl"
    ),
    "folder-without-text-files": Case(
        "no-text-files has no .txt or .jsonl files", data="no-text-files"
    ),
    "dataset-file-missing": Case(
        "calibration file nowhere/calib.jsonl does not exist",
        data="nowhere/calib.jsonl",
    ),
    "unknown-bundled-domain": Case(
        "unknown bundled domain 'poetry'", data="bundled:poetry"
    ),
    # -- the command line ------------------------------------------------------
    "output-not-empty": Case(
        "exists and is not empty", "--overwrite", output="non-empty"
    ),
    "output-is-a-file": Case("exists and is not a directory", output="file"),
    "mix-bad-syntax": Case(
        "mix entry 'general:1' is not name=ratio",
        data=None,
        extra=("--mix", "general:1"),
    ),
    "mix-unknown-source": Case(
        "unknown calibration source 'poetry'",
        data=None,
        extra=("--mix", "general=0.5,poetry=0.5"),
    ),
    "mix-source-bad-syntax": Case(
        "--mix-source 'code' is not NAME=PATH", extra=("--mix-source", "code")
    ),
    "dataset-and-mix": Case(
        "exactly one of --dataset and --mix", extra=("--mix", "general=1")
    ),
    "unknown-offload": Case(
        "argument --offload: invalid choice: 'gpu'",
        "--help",
        extra=("--offload", "gpu"),
    ),
    "unknown-option": Case(
        "unrecognized arguments: --sparsity", extra=("--sparsity", "0.5")
    ),
    "num-samples-0": Case("--num-samples must be >= 1", extra=("--num-samples", "0")),
    # -- image calibration -----------------------------------------------------
    "images-for-a-text-model": Case(
        "--images was given, but qwen3_moe has no vision tower",
        "drop --images",
        extra=("--images", "bundled"),
    ),
    "images-folder-missing": Case(
        "image calibration source 'no-such-folder' is not a folder",
        "--images bundled",
        model="vl",
        extra=("--images", "no-such-folder"),
    ),
    "images-without-preprocessor-config": Case(
        "has no image processor config",
        "preprocessor_config.json",
        model="vl-no-processor",
        extra=("--images", "bundled"),
    ),
    "image-longer-than-a-row": Case(
        "takes 18 image tokens, more than max_seq_len 16 allows",
        "--max-seq-len",
        model="vl",
        extra=("--images", "bundled"),
    ),
    "image-fraction-0": Case(
        "--image-fraction must be in (0, 1], got 0.0",
        model="vl",
        extra=("--images", "bundled", "--image-fraction", "0"),
    ),
}


def _argv(workspace: SimpleNamespace, case: Case, out: Path) -> list[str]:
    recipe = workspace.recipes.get(case.recipe, case.recipe)
    model = workspace.models.get(case.model, case.model)
    argv = ["compress", str(recipe), "--model", str(model), "--output", str(out)]
    if case.data is not None:
        argv += ["--dataset", str(workspace.data.get(case.data, case.data))]
    return [*argv, "--num-samples", "4", "--max-seq-len", "16", *case.extra]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_and_leaves_nothing(
    workspace, tmp_path, capsys, monkeypatch, no_calibration, case
):
    # relative data paths in the table are relative to an empty directory
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if case.output == "non-empty":
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    elif case.output == "file":
        out.write_text("mine")
    refusal = refused(capsys, _argv(workspace, case, out))
    assert case.named in refusal.error
    assert case.fix in refusal.fix
    left = sorted(p.name for p in tmp_path.iterdir())
    if case.output == "new":
        assert left == []  # no output, no .out.tmp-<pid> staging directory
    else:
        assert left == ["out"]
        mine = out / "mine.txt" if out.is_dir() else out
        assert mine.read_text() == "mine"


API_CASES = {
    "truncated-shard": (ModelFileError, dict(model="truncated")),
    "config-top-k-above-expert-count": (ModelConfigError, dict(model="top-k-10")),
    "sparsity-keeps-fewer-than-top-k": (
        ExpertBudgetError,
        dict(recipe="sparsity-0.99"),
    ),
    "empty-jsonl": (CalibrationDataError, dict(data="empty.jsonl")),
    "misspelled-field": (RecipeError, dict(recipe="misspelled-field")),
}


@pytest.mark.parametrize(("error", "given"), API_CASES.values(), ids=list(API_CASES))
def test_python_api_raises_the_typed_error(
    workspace, tmp_path, no_calibration, error, given
):
    assert issubclass(error, InputError)
    args = {"recipe": "reap_w4a16", "model": "qwen", "data": "bundled", **given}
    out = tmp_path / "out"
    with pytest.raises(error) as raised:
        compress(
            str(workspace.recipes.get(args["recipe"], args["recipe"])),
            str(workspace.models[args["model"]]),
            str(workspace.data.get(args["data"], args["data"])),
            str(out),
            num_samples=4,
            max_seq_len=16,
        )
    assert raised.value.problem and raised.value.fix
    assert "\n" not in raised.value.problem
    assert list(tmp_path.iterdir()) == []
