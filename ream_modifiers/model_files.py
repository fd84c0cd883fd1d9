"""
The weight files of a local model directory, checked before anything loads.

A shard cut short by an interrupted download or copy, or one whose header is
garbage, otherwise fails deep inside ``from_pretrained`` (or, with offloading,
only when the sequential pipeline first reads the tensor) with a traceback that
does not name the file. Only the headers are read: the check costs a few
kilobytes per shard, whatever the model's size.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping each tensor to ``data_offsets`` within the data section, and the data
section, which must end exactly at the largest offset.
"""

from __future__ import annotations

import json
from pathlib import Path

from ream_modifiers.errors import InputError

__all__ = [
    "ModelFileError",
    "check_model_files",
    "check_safetensors_file",
    "find_model_file",
]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# anything transformers can load weights from; a directory without any of these
# holds no weights at all
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "*.pt", "*.pth")


class ModelFileError(InputError):
    """A local model directory whose weight files cannot be loaded."""


def _redownload(file: Path) -> str:
    return (
        f"re-download {file.name} (e.g. huggingface-cli download <model> "
        f"--local-dir {file.parent}), or re-save the model with save_pretrained"
    )


def _shards(directory: Path) -> list[Path]:
    """The safetensors files transformers would read from ``directory``."""
    index = directory / _INDEX
    if not index.is_file():
        single = directory / _SINGLE
        return [single] if single.is_file() else []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(
            f"{index} is not a valid safetensors index (JSON with a weight_map): "
            f"{type(error).__name__}: {error}",
            _redownload(index),
        ) from None
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFileError(
            f"model shard {directory / missing[0]}{more} named by {index.name} "
            "is missing",
            f"re-download the missing shard(s) into {directory}, or re-save the "
            "model with save_pretrained",
        )
    return [directory / name for name in names]


def _data_end(file: Path, header: object) -> int:
    """The largest ``data_offsets`` end of a parsed header."""
    if not isinstance(header, dict):
        raise ModelFileError(
            f"model file {file} is corrupt: its safetensors header is a JSON "
            f"{type(header).__name__}, not an object",
            _redownload(file),
        )
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        offsets = entry.get("data_offsets")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and isinstance(entry.get("shape"), list)
        ):
            raise ModelFileError(
                f"model file {file} is corrupt: tensor {name!r} in its header has "
                "no valid data_offsets or shape",
                _redownload(file),
            )
        end = max(end, offsets[1])
    return end


def read_safetensors_header(file: Path) -> dict:
    """
    The JSON header of a ``.safetensors`` file (tensor names to dtype, shape and
    data offsets), read without torch and checked against the file's size.

    :raises ModelFileError: if the header is unreadable or not JSON, or the file
        is shorter or longer than the header says
    """
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise ModelFileError(
                f"model file {file} is truncated or corrupt: {size:,} bytes, too "
                "short for its safetensors header",
                _redownload(file),
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise ModelFileError(
            f"model file {file} is corrupt: its safetensors header is not JSON",
            _redownload(file),
        ) from None
    expected = 8 + length + _data_end(file, header)
    if size < expected:
        raise ModelFileError(
            f"model file {file} is truncated: {size:,} bytes, but its header "
            f"places tensor data up to byte {expected:,}",
            _redownload(file),
        )
    if size > expected:
        # safetensors refuses a file its tensors do not exactly cover
        raise ModelFileError(
            f"model file {file} is corrupt: {size - expected:,} bytes after the "
            f"last tensor its header names (expected {expected:,} bytes in all)",
            _redownload(file),
        )
    return header


def check_safetensors_file(file: Path) -> None:
    """
    :param file: a ``.safetensors`` file
    :raises ModelFileError: see :func:`read_safetensors_header`
    """
    read_safetensors_header(file)


def check_model_files(source: str) -> None:
    """
    Check the weight files of a local model directory (a hub ID is left to the
    download). Call after :func:`ream_modifiers.errors.check_model_source`.

    :param source: ``--model``: a local directory or a hub ID
    :raises ModelFileError: a directory without weight files, an unreadable
        index, a shard the index names that is missing, or a truncated or
        corrupt ``.safetensors`` file
    """
    directory = Path(source).expanduser()
    if not directory.is_dir():
        return
    if not any(any(directory.glob(p)) for p in _WEIGHT_PATTERNS):
        raise ModelFileError(
            f"model directory {source} has config.json but no weights "
            f"({_SINGLE} or {_INDEX} and its shards)",
            "copy the weight files into it, or re-save the model with save_pretrained",
        )
    for file in _shards(directory):
        check_safetensors_file(file)


def find_model_file(
    source: str, name: str, cache_dir: str | None = None
) -> Path | None:
    """
    ``name`` of the model ``source``: in its local folder, or in its hub cache
    snapshot (fetched if missing and the hub is reachable); None where the model
    has no such file or the hub cannot be asked.
    """
    local = Path(source)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        source,
        name,
        cache_dir=cache_dir,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None
