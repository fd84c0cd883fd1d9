"""
Calibration statistics saved to disk, so a model is calibrated once and then
compressed by any method, at any ratio, without another forward pass.

A statistics directory holds ``manifest.json`` and one safetensors file per MoE
layer (``layers/0000.safetensors``, in model order). Each statistic is stored as
it stood when its layer was decided, under ``NAME(SETTINGS)/KEY`` (a
compensated sum's rounding-error half under ``NAME(SETTINGS)/low.KEY``), so a
restored statistic is the same object, bit for bit, that a direct run hands to
``decide()``.

Two kinds of directory exist, and the manifest's ``mode`` says which:

- ``original``: written by :class:`~ream_modifiers.modifiers.statistics.
  ExpertStatisticsModifier`, which reduces nothing, so every layer saw the
  original model's hidden states. Any method and ratio can be applied from it:
  the "one-shot from original" variant, which differs from a direct run from the
  second layer on (a direct run calibrates layer L after layers < L were
  reduced).
- ``sequential``: written during a direct run (``save_statistics``). Compressing
  from it with the same method and settings reproduces that run exactly.

The directory is written under ``DIR.partial`` and renamed when complete, so a
directory that exists is whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ream_modifiers.observe.statistics import Statistic

__all__ = [
    "FORMAT",
    "MANIFEST",
    "StatisticsFile",
    "StatisticsWriter",
    "signature",
]

FORMAT = 1
MANIFEST = "manifest.json"
_PARTIAL = ".partial"


def signature(statistic: Statistic) -> str:
    """``NAME(key=value,...)``: a statistic's name and the settings its values
    depend on, e.g. ``activations(capacity=512,seed=0,width=768)``."""
    inner = ",".join(f"{k}={v}" for k, v in sorted(statistic.settings().items()))
    return f"{statistic.name}({inner})"


def _layer_file(directory: Path, index: int) -> Path:
    return directory / "layers" / f"{index:04d}.safetensors"


class StatisticsWriter:
    """
    Writes a statistics directory layer by layer (on the source rank only).

    :param directory: the directory to create; it must not exist
    :param model_type: the model's ``model_type``
    :param layers: every MoE layer's name, in model order
    :param num_experts: every layer's expert count when it was calibrated
    :param mode: ``original`` or ``sequential`` (see the module docstring)
    :param recorded_by: for ``sequential``, the method and settings that reduced
        the layers while they were recorded
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        model_type: str,
        layers: Sequence[str],
        num_experts: Sequence[int],
        mode: str,
        recorded_by: dict[str, Any] | None = None,
    ):
        self.directory = Path(directory)
        if self.directory.exists():
            raise ValueError(
                f"statistics directory {self.directory} already exists; choose a "
                "new path or remove it (statistics are never overwritten in place)"
            )
        self.partial = self.directory.with_name(self.directory.name + _PARTIAL)
        shutil.rmtree(self.partial, ignore_errors=True)
        (self.partial / "layers").mkdir(parents=True)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "mode": mode,
            "model_type": model_type,
            "recorded_by": recorded_by,
            "layers": [
                {"name": name, "num_experts": count}
                for name, count in zip(layers, num_experts, strict=True)
            ],
            "statistics": [],
        }

    def write_layer(
        self,
        index: int,
        statistics: Sequence[Statistic],
        *,
        tokens_seen: int,
        batches_seen: int,
    ) -> None:
        """Save layer ``index``'s statistics as they stand now (one host copy)."""
        tensors: dict[str, torch.Tensor] = {}
        recorded = {}
        for statistic in statistics:
            key = signature(statistic)
            recorded[key] = {"name": statistic.name, "settings": statistic.settings()}
            for part, tensor in statistic.export_state().items():
                tensors[f"{key}/{part}"] = tensor.detach().contiguous().cpu()
        entry = self.manifest["layers"][index]
        entry.update(tokens_seen=tokens_seen, batches_seen=batches_seen)
        known = {s["signature"] for s in self.manifest["statistics"]}
        self.manifest["statistics"] += [
            {"signature": key, **value}
            for key, value in recorded.items()
            if key not in known
        ]
        save_file(tensors, str(_layer_file(self.partial, index)))

    def close(self) -> Path:
        """Write the manifest and move the directory into place."""
        missing = [
            entry["name"]
            for index, entry in enumerate(self.manifest["layers"])
            if not _layer_file(self.partial, index).is_file()
        ]
        if missing:
            self.abort()
            raise RuntimeError(
                f"no statistics were recorded for MoE layers {missing}; nothing "
                f"was written to {self.directory}"
            )
        (self.partial / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        self.partial.rename(self.directory)
        return self.directory

    def abort(self) -> None:
        """Remove what was written (a failed run leaves no directory behind)."""
        shutil.rmtree(self.partial, ignore_errors=True)


class StatisticsFile:
    """
    A statistics directory, read back.

    :param directory: a directory written by :class:`StatisticsWriter`
    :raises ValueError: naming the problem if it is not one
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            partial = self.directory.with_name(self.directory.name + _PARTIAL)
            hint = (
                f" ({partial} exists: that calibration did not finish)"
                if partial.exists()
                else ""
            )
            raise ValueError(
                f"{self.directory} is not a statistics directory: it has no "
                f"{MANIFEST}{hint}. Write one with `ream-compress calibrate` or a "
                "modifier's save_statistics"
            )
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{self.directory}: statistics format {self.manifest.get('format')} "
                f"is not the format {FORMAT} this version reads; recalibrate"
            )

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def recorded_by(self) -> dict[str, Any] | None:
        return self.manifest.get("recorded_by")

    def layer_entry(self, index: int) -> dict[str, Any]:
        """``name``, ``num_experts``, ``tokens_seen`` and ``batches_seen``."""
        return self.manifest["layers"][index]

    def match(self, statistic: Statistic) -> str | None:
        """The recorded signature that can stand in for ``statistic``, if any."""
        exact = signature(statistic)
        recorded = self.manifest["statistics"]
        if any(entry["signature"] == exact for entry in recorded):
            return exact
        for entry in recorded:
            if statistic.accepts(entry["name"], entry["settings"]):
                return entry["signature"]
        return None

    def check(
        self,
        family: str,
        layers: Sequence[tuple[str, int]],
        requested: Sequence[Statistic],
        who: str,
    ) -> None:
        """
        Raise a ValueError before anything runs if this directory cannot serve
        ``requested`` statistics for ``layers`` (``(name, num_experts)`` in model
        order) of a model whose ``model_type`` is ``family``.
        """
        recorded = self.manifest
        where = f"{who}: statistics in {self.directory}"
        if recorded["model_type"] != family:
            raise ValueError(
                f"{where} were recorded on a {recorded['model_type']} model, not "
                f"this {family} one; calibrate this model"
            )
        mine = [(entry["name"], entry["num_experts"]) for entry in recorded["layers"]]
        if mine != list(layers):
            raise ValueError(
                f"{where} cover the MoE layers {mine}, but this model's are "
                f"{list(layers)}; calibrate this model (with the same ignore list)"
            )
        missing = sorted({signature(s) for s in requested if self.match(s) is None})
        if missing:
            have = [entry["signature"] for entry in recorded["statistics"]]
            raise ValueError(
                f"{where} lack {missing} (recorded: {have}); calibrate with this "
                "method and these settings (`ream-compress calibrate --methods "
                "...`), or change the settings to recorded ones"
            )

    def restore(
        self, index: int, statistics: Sequence[Statistic], device: torch.device
    ) -> None:
        """Fill ``statistics`` with layer ``index``'s recorded values on ``device``."""
        wanted = {self.match(statistic): statistic for statistic in statistics}
        parts: dict[str, dict[str, torch.Tensor]] = {key: {} for key in wanted}
        path = _layer_file(self.directory, index)
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                key, _, part = name.partition("/")
                if key in parts:
                    parts[key][part] = handle.get_tensor(name)
        for key, statistic in wanted.items():
            statistic.restore_state(parts[key])
