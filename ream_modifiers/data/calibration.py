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

__all__ = [
    "bundled_texts",
    "math_texts",
    "read_local_texts",
    "load_texts",
    "tokenize_texts",
    "pack_rows",
    "rows_dataset",
    "build_calibration_dataset",
]


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
        sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"})
        if path.is_dir()
        else [path]
    )
    if not files:
        raise ValueError(f"no .txt or .jsonl calibration files under {path}")
    texts: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text().splitlines(), start=1):
                if line.strip():
                    texts.append(
                        _record_text(json.loads(line), text_field, file, number)
                    )
        elif file.suffix == ".txt":
            texts.extend(p.strip() for p in file.read_text().split("\n\n") if p.strip())
        else:
            raise ValueError(f"{file}: calibration files must be .txt or .jsonl")
    return texts


def _record_text(record: dict, text_field: str, file: Path, number: int) -> str:
    value = record.get(text_field, record.get("messages"))
    if isinstance(value, list):  # a chat: join the turns' contents
        return "\n".join(str(m.get("content", "")) for m in value)
    if value is not None:
        return str(value)
    raise ValueError(
        f"{file}:{number}: record has no {text_field!r} field and no 'messages' list; "
        "pass --text-field to name the text column"
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
    if not texts:
        raise ValueError(f"calibration source {source!r} holds no text")
    return texts


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
