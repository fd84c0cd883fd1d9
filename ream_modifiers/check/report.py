"""What a check found: violations and the report that lists them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CheckReport", "CheckpointCheckError", "Violation"]


@dataclass(frozen=True)
class Violation:
    """
    One broken rule.

    :param code: stable identifier of the rule (e.g. ``missing-expert-tensors``)
    :param where: the layer, tensor or config key at fault
    :param message: what is wrong and what vLLM would do with it
    :param fix: how to repair it
    """

    code: str
    where: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.message}\n    fix: {self.fix}"


@dataclass
class CheckReport:
    """What :func:`check_checkpoint` found."""

    path: Path
    model_type: str | None = None
    experts_per_layer: dict[str, int] = field(default_factory=dict)
    quantization_format: str | None = None
    violations: list[Violation] = field(default_factory=list)
    vllm: str | None = None  # what vLLM did with it, when asked (check --vllm)
    notes: list[str] = field(default_factory=list)  # facts a user should know

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def codes(self) -> list[str]:
        return [v.code for v in self.violations]

    def add(self, code: str, where: str, message: str, fix: str) -> None:
        self.violations.append(Violation(code, where, message, fix))

    def record_vllm(self, ok: bool, description: str) -> None:
        """The outcome of loading the checkpoint in vLLM itself."""
        self.vllm = description
        if not ok:
            self.add(
                "vllm-load",
                str(self.path),
                description,
                "fix what vLLM names (a tensor it did not find, a shape or a "
                "config key) and check again",
            )

    def describe(self) -> str:
        """What was found, e.g. ``qwen3_moe, 2 MoE layers x 6 experts, ...``."""
        counts = sorted(set(self.experts_per_layer.values()))
        return (
            f"{self.model_type}, {len(self.experts_per_layer)} MoE layers x "
            f"{'/'.join(map(str, counts)) or '?'} experts, "
            f"{self.quantization_format or 'unquantized'}"
        )

    def summary(self) -> str:
        head = f"{self.path}: {self.describe()}"
        tail = [f"vLLM: {self.vllm}"] if self.vllm and self.ok else []
        tail += [f"note: {note}" for note in self.notes]
        if self.ok:
            return "\n".join([f"OK {head}", *tail])
        lines = [f"FAILED {head}: {len(self.violations)} problem(s)"]
        return "\n".join(lines + [str(v) for v in self.violations])

    def raise_for_violations(self) -> None:
        """:raises CheckpointCheckError: if any rule is broken"""
        if not self.ok:
            raise CheckpointCheckError(self)


class CheckpointCheckError(ValueError):
    """A checkpoint broke a rule vLLM depends on."""

    def __init__(self, report: CheckReport):
        super().__init__(report.summary())
        self.report = report
