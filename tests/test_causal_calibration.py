"""
Calibration sees the causal forward: the MoE-block input of the first MoE layer
during ``oneshot`` equals the one of a plain ``model(input_ids)``, and without
:mod:`ream_modifiers.causal_calibration` it does not (for the families where
llm-compressor 0.14 loses the mask).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers import Modifier
from pydantic import PrivateAttr
from torch import nn

from ream_modifiers import causal_calibration as cc
from ream_modifiers.moe import find_moe_layers, load_moe_model
from ream_modifiers.moe.offload import disk_offloaded
from ream_modifiers.tiny import build_tiny_moe

SEQ = 24
SLIDING_WINDOW = 8  # < SEQ: the window changes the mask

# family -> (tiny model_type, config overrides, llm-compressor 0.14 loses the mask)
FAMILIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "qwen3_moe": ("qwen3_moe", {}, True),
    # the mask builder is autowrapped with the live config: never lost
    "deepseek_v3": ("deepseek_v3", {}, False),
    # Mixtral builds create_sliding_window_causal_mask when sliding_window is set
    "mixtral_sliding": ("mixtral", {"sliding_window": SLIDING_WINDOW}, True),
}


class _CaptureMoEInput(Modifier):
    """Records a module's input in the calibration passes (not propagation)."""

    module_name: str
    _inputs: list[torch.Tensor] = PrivateAttr(default_factory=list)

    def on_initialize(self, state: Any, **kwargs: Any) -> bool:
        module = state.model.get_submodule(self.module_name)
        self.register_hook(module, self._record, "forward_pre")
        return True

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._inputs.append(args[0].detach().clone())

    def on_finalize(self, state: Any, **kwargs: Any) -> bool:
        self.remove_hooks()
        return True


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``model_dirs(family)`` -> path of the saved tiny model (cached)."""
    cache = {}

    def build(family: str):
        if family not in cache:
            model_type, overrides, _ = FAMILIES[family]
            path = tmp_path_factory.mktemp(family)
            cache[family] = build_tiny_moe(model_type, path, **overrides)
        return cache[family]

    return build


def _moe_block_name(model: nn.Module) -> str:
    block = find_moe_layers(model)[0].block
    return next(name for name, module in model.named_modules() if module is block)


def _plain_forward_input(
    model: nn.Module, name: str, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return captured[0].reshape(*ids.shape, -1)


def _calibration_input(
    model: nn.Module,
    name: str,
    rows: list[list[int]],
    enabled: bool,
    others: tuple[Modifier, ...] = (),
    **kwargs: Any,
) -> torch.Tensor:
    """
    Layer input seen by a modifier during ``oneshot``, as one batch.

    :param others: modifiers to run after the capturing one, in the same recipe
    """
    capture = _CaptureMoEInput(module_name=name)
    reset_session()
    with cc.causal_calibration(enabled):
        oneshot(
            model=model,
            dataset=Dataset.from_dict(
                {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
            ),
            recipe=[capture, *others],
            pipeline="sequential",
            batch_size=len(rows),
            num_calibration_samples=len(rows),
            shuffle_calibration_samples=False,
            **kwargs,
        )
    (seen,) = capture._inputs  # one batch, one calibration pass
    # on an accelerator the pipeline ran there; the reference forward did not
    return seen.reshape(len(rows), -1, seen.shape[-1]).cpu()


def _ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (rows, length), generator=generator)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibration_sees_the_causal_forward(model_dirs, family, attn):
    model = load_moe_model(
        model_dirs(family), dtype=torch.float32, attn_implementation=attn
    )
    assert model.config._attn_implementation == attn
    name = _moe_block_name(model)
    ids = _ids(2, SEQ)
    expected = _plain_forward_input(model, name, ids, torch.ones_like(ids))
    rows = ids.tolist()

    fixed = _calibration_input(model, name, rows, True, max_seq_length=SEQ)
    torch.testing.assert_close(fixed, expected, atol=1e-5, rtol=0)

    upstream = _calibration_input(model, name, rows, False, max_seq_length=SEQ)
    difference = (upstream - expected).abs().max().item()
    if FAMILIES[family][2]:
        # upstream's calibration is bidirectional: far from the causal forward
        assert difference > 0.1, difference
    else:
        assert difference <= 1e-5, difference
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("enabled", [True, False])
def test_gptq_in_the_same_recipe_calibrates_on_the_causal_forward(model_dirs, enabled):
    """The fix is the pipeline's: GPTQ's subgraphs get the same hidden states."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = load_moe_model(model_dirs("qwen3_moe"), dtype=torch.float32)
    name = _moe_block_name(model)
    ids = _ids(2, SEQ)
    expected = _plain_forward_input(model, name, ids, torch.ones_like(ids))
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    seen = _calibration_input(
        model, name, ids.tolist(), enabled, (gptq,), max_seq_length=SEQ
    )
    difference = (seen - expected).abs().max().item()
    assert difference <= 1e-5 if enabled else difference > 0.1, difference


def test_disk_offloaded_model_calibrates_on_the_causal_forward(model_dirs, tmp_path):
    model = load_moe_model(
        model_dirs("qwen3_moe"),
        dtype=torch.float32,
        offload="disk",
        offload_folder=tmp_path / "offload",
    )
    assert disk_offloaded(model)
    name = _moe_block_name(model)
    ids = _ids(2, SEQ)
    expected = _plain_forward_input(model, name, ids, torch.ones_like(ids))
    seen = _calibration_input(model, name, ids.tolist(), True, max_seq_length=SEQ)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)


def test_sliding_window_matters_at_this_length(model_dirs):
    """The sliding-window family's reference is not just the full causal forward."""
    model = load_moe_model(model_dirs("mixtral_sliding"), dtype=torch.float32)
    name = _moe_block_name(model)
    ids = _ids(2, SEQ)
    windowed = _plain_forward_input(model, name, ids, torch.ones_like(ids))
    model.config.sliding_window = None
    full = _plain_forward_input(model, name, ids, torch.ones_like(ids))
    assert (windowed - full).abs().max().item() > 0.1


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral_sliding"])
def test_padded_batch_matches_the_padded_forward(model_dirs, family):
    """Right padding from the ``padding`` collator masks the padded keys."""
    from transformers import AutoTokenizer

    path = model_dirs(family)
    model = load_moe_model(path, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = _moe_block_name(model)
    lengths = [SEQ, 15]  # descending: the length-aware sampler keeps the order
    full = _ids(len(lengths), SEQ, seed=1)
    rows = [full[i, :n].tolist() for i, n in enumerate(lengths)]
    mask = torch.tensor([[1] * n + [0] * (SEQ - n) for n in lengths])
    ids = torch.where(mask.bool(), full, tokenizer.pad_token_id)
    expected = _plain_forward_input(model, name, ids, mask)

    seen = _calibration_input(
        model,
        name,
        rows,
        True,
        processor=tokenizer,
        data_collator="padding",
        max_seq_length=None,
    )
    assert seen.shape == (*ids.shape, expected.shape[-1])
    real = mask.bool()
    torch.testing.assert_close(seen[real], expected[real], atol=1e-5, rtol=0)


def test_switch_and_install_are_idempotent(monkeypatch):
    from llmcompressor.pipelines.sequential.helpers import SequentialTracer

    patched = SequentialTracer.create_arg
    assert cc.install() and cc.install()
    assert SequentialTracer.create_arg is patched
    monkeypatch.delenv(cc.DISABLE_ENV, raising=False)
    assert cc.causal_calibration_enabled()
    monkeypatch.setenv(cc.DISABLE_ENV, "1")
    assert not cc.causal_calibration_enabled()
    with cc.causal_calibration(True):
        assert cc.causal_calibration_enabled()
        with cc.causal_calibration(False):
            assert not cc.causal_calibration_enabled()
        assert cc.causal_calibration_enabled()
    assert not cc.causal_calibration_enabled()
