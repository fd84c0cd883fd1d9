"""
Calibration text: the bundled offline corpus, local text/JSONL files and Hugging
Face datasets, tokenized into the ``input_ids``/``attention_mask`` rows that
``oneshot`` consumes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ream_modifiers.errors import InputError, looks_local

__all__ = [
    "CalibrationDataError",
    "check_calibration_source",
    "bundled_texts",
    "math_texts",
    "read_local_texts",
    "load_texts",
    "tokenize_texts",
    "pack_rows",
    "rows_dataset",
    "build_calibration_dataset",
]

_SUFFIXES = (".txt", ".jsonl")
_FORMAT = (
    "a .txt file (blank-line separated paragraphs), a .jsonl file (one "
    '{"text": ...} object a line) or a folder of them'
)


class CalibrationDataError(InputError):
    """Calibration data that cannot give a single calibration row."""


def _bundled(name: str) -> str:
    return resources.files("ream_modifiers.data").joinpath("bundled", name).read_text()


def math_texts(count: int, seed: int = 0) -> list[str]:
    """Generated arithmetic questions with worked answers."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        texts.append(
            f"Question: what is ({a} {op} {b}) * {c}? "
            f"Answer: {a} {op} {b} = {value}, and {value} * {c} = {value * c}."
        )
    return texts


def bundled_texts(domain: str = "mix") -> list[str]:
    """
    The small offline corpus shipped with the package.

    :param domain: ``general`` (prose), ``code`` (Python), ``math`` (generated
        arithmetic) or ``mix`` (all three, interleaved)
    """
    general = [line for line in _bundled("general.txt").splitlines() if line.strip()]
    code = [
        block.strip() for block in _bundled("code.txt").split("\n\n") if block.strip()
    ]
    math = math_texts(40)
    domains = {"general": general, "code": code, "math": math}
    if domain in domains:
        return domains[domain]
    if domain != "mix":
        raise ValueError(
            f"unknown bundled domain {domain!r}; use {sorted(domains)} or mix"
        )
    mixed = []
    for i in range(max(map(len, domains.values()))):
        mixed.extend(texts[i] for texts in domains.values() if i < len(texts))
    return mixed


def read_local_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """
    Texts from a local file or folder: ``.txt`` (blank-line separated paragraphs)
    or ``.jsonl`` (the ``text_field`` of each record, or the concatenated
    ``content`` of a ``messages`` chat list).
    """
    path = Path(path)
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
        if path.is_dir()
        else [path]
    )
    if not files:
        raise CalibrationDataError(
            f"calibration folder {path} has no .txt or .jsonl files", f"give {_FORMAT}"
        )
    texts: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for number, line in enumerate(_read(file).splitlines(), start=1):
                if line.strip():
                    record = _parse(line, file, number)
                    texts.append(_record_text(record, text_field, file, number))
        elif file.suffix == ".txt":
            texts.extend(p.strip() for p in _read(file).split("\n\n") if p.strip())
        else:
            raise CalibrationDataError(
                f"calibration file {file} is neither .txt nor .jsonl", f"give {_FORMAT}"
            )
    return texts


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except UnicodeDecodeError:
        raise CalibrationDataError(
            f"calibration file {file} is not UTF-8 text", f"give {_FORMAT}"
        ) from None


def _parse(line: str, file: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise CalibrationDataError(
            f"{file}:{number} is not valid JSON: {error}",
            'write one JSON object a line, e.g. {"text": "..."}',
        ) from None
    if not isinstance(record, dict):
        raise CalibrationDataError(
            f"{file}:{number} is a JSON {type(record).__name__}, not an object",
            'write one JSON object a line, e.g. {"text": "..."}',
        )
    return record


def _record_text(record: dict, text_field: str, file: Path, number: int) -> str:
    value = record.get(text_field, record.get("messages"))
    if isinstance(value, list):  # a chat: join the turns' contents
        return "\n".join(str(m.get("content", "")) for m in value)
    if value is not None:
        return str(value)
    fields = ", ".join(map(str, record)) or "none"
    raise CalibrationDataError(
        f"{file}:{number}: record has no {text_field!r} field and no 'messages' list "
        f"(its fields: {fields})",
        "pass --text-field to name the text column",
    )


# Known Hugging Face calibration sets: (name, config, split, text column).
HF_DATASETS = {
    "c4": ("allenai/c4", "en", "validation", "text"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages"),
    "numinamath": ("AI-MO/NuminaMath-1.5", None, "train", "solution"),
    "the-stack-smol": ("bigcode/the-stack-smol", None, "train", "content"),
}


def load_texts(source: str, num_samples: int, text_field: str = "text") -> list[str]:
    """
    Calibration texts from ``source``: ``bundled`` / ``bundled:<domain>``, a local
    file or folder, a short name from :data:`HF_DATASETS`, or any Hugging Face
    dataset ID (``name[:config]``, train split).
    """
    if source == "bundled" or source.startswith("bundled:"):
        texts = bundled_texts(source.partition(":")[2] or "mix")
    elif Path(source).exists():
        texts = read_local_texts(source, text_field)
    else:
        texts = _hf_texts(source, num_samples, text_field)
    if not any(text.strip() for text in texts):
        local = Path(source).exists()
        jsonl = Path(source).is_dir() or source.endswith(".jsonl")
        field = f" (no non-empty {text_field!r} field)" if jsonl else ""
        raise CalibrationDataError(
            f"calibration source {source!r} holds no text{field}",
            f"give {_FORMAT}" if local else "give a dataset with text in it",
        )
    return texts


def check_calibration_source(source: str, text_field: str = "text") -> None:
    """
    Refuse, before a model is loaded, a calibration source that cannot give a
    row: an unknown bundled domain, a local path that does not exist, or a local
    file or folder without text. A local source is read in full, as the run
    will read it; a Hugging Face dataset is left to the download.

    :param source: ``--dataset`` (see :func:`load_texts`)
    :param text_field: the JSONL field holding the text
    :raises CalibrationDataError: naming the file (and line, and field)
    """
    if source == "bundled" or source.startswith("bundled:"):
        domain = source.partition(":")[2] or "mix"
        try:
            bundled_texts(domain)
        except ValueError as error:
            raise CalibrationDataError(
                f"--dataset {source}: {error}",
                "use bundled, or bundled:general, bundled:code or bundled:math",
            ) from None
        return
    if not Path(source).exists():
        if looks_local(source) or source.endswith(_SUFFIXES):
            raise CalibrationDataError(
                f"calibration file {source} does not exist",
                "check the path, or give bundled or a Hugging Face dataset ID",
            )
        return
    load_texts(source, 0, text_field)


def _hf_texts(source: str, num_samples: int, text_field: str) -> list[str]:
    name, config, split, field = HF_DATASETS.get(
        source, (None, None, "train", text_field)
    )
    if name is None:
        name, _, config = source.partition(":")
        config = config or None
    return stream_hub_texts(
        name,
        config,
        split,
        lambda record, number: _record_text(record, field, Path(name), number),
        num_samples,
    )


def stream_hub_texts(
    name: str,
    config: str | None,
    split: str,
    extract: Callable[[dict, int], str | None],
    needed: int,
    min_chars: int = 0,
) -> list[str]:
    """
    Stream a Hugging Face dataset until ``needed`` texts of at least ``min_chars``
    characters are found; ``extract(record, line number)`` returns a record's
    text, or None to skip it.
    """
    from datasets import load_dataset

    texts: list[str] = []
    stream = load_dataset(name, config, split=split, streaming=True)
    for number, record in enumerate(stream, start=1):
        text = extract(record, number)
        if text and len(text) >= min_chars:
            texts.append(text)
        if len(texts) >= needed:
            break
    return texts


def pack_rows(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    num_rows: int,
    length: int,
) -> list[list[int]]:
    """
    Concatenate the texts (each followed by EOS) into ``num_rows`` rows of exactly
    ``length`` tokens, cycling through the texts if they run out.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no calibration text to tokenize")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    needed = num_rows * length
    while len(ids) < needed:
        for text in texts:
            ids.extend(
                tokenizer(text, add_special_tokens=False)["input_ids"] + separator
            )
            if len(ids) >= needed:
                break
    return [ids[i * length : (i + 1) * length] for i in range(num_rows)]


def rows_dataset(rows: list[list[int]]) -> Dataset:
    """The ``input_ids``/``attention_mask`` dataset ``oneshot`` consumes."""
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
    )


def tokenize_texts(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    max_seq_length: int,
) -> Dataset:
    """Pack the texts into ``num_samples`` full rows of ``max_seq_length`` tokens."""
    return rows_dataset(pack_rows(texts, tokenizer, num_samples, max_seq_length))


def build_calibration_dataset(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    max_seq_length: int,
    text_field: str = "text",
) -> Dataset:
    """Load ``source`` (see :func:`load_texts`) and pack it for ``oneshot``."""
    texts = load_texts(source, num_samples, text_field)
    return tokenize_texts(texts, tokenizer, num_samples, max_seq_length)
