"""
Calibration mixes of general, math and code text.

The REAM paper's central finding is that the calibration mix trades
multiple-choice quality (more general text) against generative quality (more
math and code). :func:`build_mix` makes that mix a parameter: named sources with
the reference's preprocessing, exact per-source row counts, packing or
whole-document rows, an optional chat template, and a fixed seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from loguru import logger
from transformers import PreTrainedTokenizerBase

from ream_modifiers.data.calibration import (
    HF_DATASETS,
    CalibrationDataError,
    bundled_texts,
    check_calibration_source,
    pack_rows,
    read_local_texts,
    rows_dataset,
    stream_hub_texts,
)

__all__ = [
    "MixSource",
    "MixReport",
    "SOURCES",
    "parse_mix",
    "check_mix",
    "build_mix",
]


@dataclass(frozen=True)
class MixSource:
    """
    A named calibration source and its preprocessing.

    :param hub: key of :data:`ream_modifiers.data.calibration.HF_DATASETS` (the
        dataset ID, config and split)
    :param text: function from a record to its text (None drops the record)
    :param min_chars: drop texts shorter than this (the reference keeps texts of
        at least 0.9 * 512 characters)
    """

    hub: str
    text: Callable[[dict], str | None] = lambda r: r.get("text")
    min_chars: int = 461


def _numina(record: dict) -> str | None:
    # the reference keeps cn_k12 and olympiads only, to avoid benchmark overlap
    if record.get("source") not in ("cn_k12", "olympiads"):
        return None
    solution = record.get("solution") or ""
    if len(solution) <= 461:
        return None
    return f"{record.get('problem', '')}\n\n{solution}"


SOURCES: dict[str, MixSource] = {
    "general": MixSource("c4"),
    "math": MixSource("numinamath", text=_numina),
    "code": MixSource("the-stack-smol", text=lambda r: r.get("content")),
}


@dataclass
class MixReport:
    """What a mix holds: exact rows and tokens per source, and its settings."""

    ratios: dict[str, float]
    rows: dict[str, int]
    tokens: dict[str, int]
    sources: dict[str, str]
    num_samples: int
    max_seq_length: int
    packing: bool
    chat_template: bool
    seed: int
    dropped_short: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_mix(spec: str) -> dict[str, float]:
    """``"general=0.2,math=0.3,code=0.5"`` -> ratios that sum to 1."""
    ratios = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"mix entry {part!r} is not name=ratio")
        ratios[name.strip()] = float(value)
    return _normalised(ratios)


def check_mix(spec: str, sources: Mapping[str, str | Path] | None = None) -> None:
    """
    Refuse, before a model is loaded, a mix that :func:`build_mix` would fail
    on: bad syntax or ratios, a source with no default and no local path, or a
    local source without text (read in full; Hugging Face sets are left to the
    download).

    :param spec: ``--mix``, e.g. ``"general=0.2,math=0.3,code=0.5"``
    :param sources: ``--mix-source`` replacements, per source
    :raises CalibrationDataError: naming the entry, source or file
    """
    sources = dict(sources or {})
    try:
        ratios = parse_mix(spec)
    except ValueError as error:
        raise CalibrationDataError(
            f"--mix {spec!r}: {error}",
            "give name=ratio pairs separated by commas, e.g. "
            "general=0.2,math=0.3,code=0.5",
        ) from None
    for name, ratio in ratios.items():
        if ratio > 0 and name not in SOURCES and name not in sources:
            raise CalibrationDataError(
                f"--mix {spec!r}: unknown calibration source {name!r}",
                f"name one of {', '.join(sorted(SOURCES))}, or give it a local path "
                f"with --mix-source {name}=PATH",
            )
    for name, source in sources.items():
        # build_mix reads a bundled domain named after the source by default
        source = str(source)
        if source == "bundled":
            source = f"bundled:{name}"
        check_calibration_source(source)


def _normalised(ratios: Mapping[str, float]) -> dict[str, float]:
    if any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise ValueError(f"mix ratios must be >= 0 and not all 0, got {dict(ratios)}")
    total = sum(ratios.values())
    return {name: r / total for name, r in ratios.items()}


def _row_counts(ratios: Mapping[str, float], num_samples: int) -> dict[str, int]:
    """Largest-remainder rounding: the counts sum to exactly ``num_samples``."""
    raw = {name: r * num_samples for name, r in ratios.items()}
    counts = {name: int(v) for name, v in raw.items()}
    by_remainder = sorted(raw, key=lambda n: (-(raw[n] - counts[n]), n))
    for name in by_remainder[: num_samples - sum(counts.values())]:
        counts[name] += 1
    return counts


def _texts(name: str, source: str | Path | None, needed: int) -> tuple[list[str], str]:
    """Texts of one source: a local path, ``bundled:<domain>``, or its HF set."""
    if source is not None and str(source).startswith("bundled"):
        domain = str(source).partition(":")[2] or name
        return bundled_texts(domain), str(source)
    if source is not None:
        return read_local_texts(source), str(source)
    if name not in SOURCES:
        raise ValueError(
            f"unknown calibration source {name!r}: name one of {sorted(SOURCES)} or "
            "give it a local path"
        )
    spec = SOURCES[name]
    dataset, config, split, _ = HF_DATASETS[spec.hub]

    def extract(record: dict, number: int) -> str | None:
        return spec.text(record)

    texts = stream_hub_texts(dataset, config, split, extract, needed, spec.min_chars)
    return texts, dataset


def _rows(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    length: int,
    packing: bool,
    chat_template: bool,
) -> tuple[list[list[int]], int]:
    """``count`` rows of one source, and how many documents were too short."""
    if chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False
            )
            for text in texts
        ]
    if packing:
        return pack_rows(texts, tokenizer, count, length), 0
    rows, dropped = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 0.9 * length:
            # whole-document rows; the reference drops rows with > 10% padding
            rows.append(ids[:length])
            if len(rows) == count:
                break
        else:
            dropped += 1
    return rows, dropped


def build_mix(
    tokenizer: PreTrainedTokenizerBase,
    ratios: Mapping[str, float] | str = "general=0.0,math=0.3,code=0.7",
    num_samples: int = 3072,
    max_seq_length: int = 512,
    sources: Mapping[str, str | Path] | None = None,
    packing: bool = True,
    chat_template: bool = False,
    seed: int = 42,
) -> tuple[Dataset, MixReport]:
    """
    Build a calibration set of ``num_samples`` rows mixing named sources.

    The default ratios are the REAM reference's (0 general, 0.3 math, 0.7 code).
    Row counts per source are exact (largest remainder); each source's texts are
    shuffled with ``seed`` before use and rows never mix sources. With ``packing``
    texts are concatenated into full ``max_seq_length`` rows; without it each row
    is one document truncated to ``max_seq_length``, and documents shorter than
    90% of it are dropped (the reference's ">10% padding" rule), so no row needs
    padding. The final rows are shuffled together with ``seed``.

    :param ratios: ``{source: ratio}`` or ``"general=0.2,math=0.3,code=0.5"``
    :param sources: per source, a local ``.txt``/``.jsonl`` path (or folder) or
        ``bundled:<domain>`` replacing the default Hugging Face set
    :raises ValueError: if a source cannot provide its rows
    """
    ratios = parse_mix(ratios) if isinstance(ratios, str) else _normalised(ratios)
    counts = _row_counts(ratios, num_samples)
    sources = dict(sources or {})
    rng = random.Random(seed)
    all_rows: list[list[int]] = []
    report = MixReport(
        ratios=ratios,
        rows={},
        tokens={},
        sources={},
        num_samples=num_samples,
        max_seq_length=max_seq_length,
        packing=packing,
        chat_template=chat_template,
        seed=seed,
    )
    for name in sorted(counts):
        count = counts[name]
        if count == 0:
            report.rows[name], report.tokens[name] = 0, 0
            continue
        texts, origin = _texts(name, sources.get(name), needed=count * 4)
        texts = list(texts)
        rng.shuffle(texts)
        rows, dropped = _rows(
            texts, tokenizer, count, max_seq_length, packing, chat_template
        )
        if len(rows) < count:
            raise ValueError(
                f"calibration source {name!r} ({origin}) gave {len(rows)} of the "
                f"{count} rows asked for"
                + ("; use packing or more documents" if not packing else "")
            )
        report.rows[name] = len(rows)
        report.tokens[name] = sum(map(len, rows))
        report.sources[name] = origin
        report.dropped_short[name] = dropped
        all_rows.extend(rows)
    rng.shuffle(all_rows)
    logger.info(f"Calibration mix: rows {report.rows}, tokens {report.tokens}")
    return rows_dataset(all_rows), report
