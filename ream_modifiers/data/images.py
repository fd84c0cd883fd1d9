"""
Image+text calibration rows for vision-language MoE models.

Calibrated on text alone, a vision-language MoE routes no image token, so the
experts that serve image tokens collect no saliency and are the first to go
(``benchmarks/bench_image_experts.py`` measures it). Rows built here pair an
image with its caption the way the model's processor would: the image
processor gives ``pixel_values`` and the patch grid, and the text holds one
placeholder token per merged patch between the image's start and end tokens
(:data:`IMAGE_PROMPTS`, per wrapper family). Only the image processor and the
tokenizer are needed, not the full multimodal processor, whose chat template
and special tokens a checkpoint may lack.

Images come from the bundled set (eight small drawings with captions,
``bundled/images``) or a local folder: image files, and a ``captions.jsonl``
of ``{"image": FILE, "text": CAPTION}`` lines (an image without a caption gets
a neutral one).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from ream_modifiers.errors import InputError

__all__ = [
    "BUNDLED_IMAGES",
    "IMAGE_PROMPTS",
    "ImageCalibrationError",
    "ImagePrompt",
    "build_image_rows",
    "captioned_images",
    "check_image_calibration",
    "collate_calibration_row",
    "load_image_processor",
    "with_image_rows",
]

BUNDLED_IMAGES = "bundled"
_CAPTIONS = "captions.jsonl"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_PROMPT = "Describe the image."
_NO_CAPTION = "An image."


class ImageCalibrationError(InputError):
    """Image calibration asked of a model or a source that cannot give it."""


@dataclass(frozen=True)
class ImagePrompt:
    """How one wrapper family's text marks an image (``image_prompts.yaml``)."""

    model_type: str
    start_key: str
    image_key: str
    end_key: str
    merge_key: str
    token_type: int
    grid: str

    def placeholders(self, config: PretrainedConfig, grid: torch.Tensor) -> list[int]:
        """The token ids standing for one image of patch grid ``(t, h, w)``."""
        merge = getattr(config.vision_config, self.merge_key)
        count = int(grid.prod()) // (merge * merge)
        image = getattr(config, self.image_key)
        return [getattr(config, self.start_key), *[image] * count] + [
            getattr(config, self.end_key)
        ]


def _load_prompts() -> dict[str, ImagePrompt]:
    text = resources.files(__package__).joinpath("image_prompts.yaml").read_text()
    return {
        model_type: ImagePrompt(model_type=model_type, **row)
        for model_type, row in yaml.safe_load(text).items()
    }


IMAGE_PROMPTS = _load_prompts()


def captioned_images(source: str) -> list[tuple[Path, str]]:
    """
    ``(image file, caption)`` pairs of ``source``: ``"bundled"`` or a folder.

    :raises ImageCalibrationError: for a folder with no images, or a
        ``captions.jsonl`` that names a missing file or is not JSON lines
    """
    if source == BUNDLED_IMAGES:
        folder = Path(str(resources.files(__package__).joinpath("bundled", "images")))
    else:
        folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ImageCalibrationError(
            f"image calibration source {source!r} is not a folder",
            f"pass --images {BUNDLED_IMAGES} or a folder of images with an "
            f"optional {_CAPTIONS}",
        )
    captions = _captions(folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise ImageCalibrationError(
            f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}",
            "add images to the folder, or pass --images bundled",
        )
    return [(image, captions.get(image.name, _NO_CAPTION)) for image in images]


def _captions(folder: Path) -> dict[str, str]:
    path = folder / _CAPTIONS
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["image"], entry["text"]
        except (ValueError, KeyError, TypeError):
            raise ImageCalibrationError(
                f"{path} line {number} is not a JSON object with 'image' and 'text'",
                'write one {"image": "file.png", "text": "caption"} object a line',
            ) from None
        if not (folder / name).is_file():
            raise ImageCalibrationError(
                f"{path} line {number} names {name!r}, which is not in {folder}",
                "fix the name or remove the line",
            )
        captions[name] = text
    return captions


def check_image_calibration(config: PretrainedConfig, source: str) -> ImagePrompt:
    """
    Before anything loads: the model takes images, and we know how its text
    marks one.

    :raises ImageCalibrationError: for a text-only model or a wrapper family
        without an :data:`IMAGE_PROMPTS` row, or a bad image source
    """
    if getattr(config, "vision_config", None) is None:
        raise ImageCalibrationError(
            f"--images was given, but {config.model_type} has no vision tower",
            "drop --images (and --image-fraction) for a text-only model",
        )
    prompt = IMAGE_PROMPTS.get(config.model_type)
    if prompt is None:
        raise ImageCalibrationError(
            f"image calibration rows are not defined for {config.model_type} "
            f"(have {sorted(IMAGE_PROMPTS)})",
            "calibrate on text only (drop --images), or add the family's image "
            "tokens to ream_modifiers/data/image_prompts.yaml",
        )
    captioned_images(source)
    return prompt


def load_image_processor(model: str, trust_remote_code: bool = False) -> Any:
    """
    The model's image processor; the PIL implementation where torchvision is
    not installed (transformers' default needs it).

    :raises ImageCalibrationError: when the model has no preprocessor config
    """
    import transformers
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(model)
    except OSError as error:
        raise ImageCalibrationError(
            f"{model} has no image processor config: {error}",
            "copy the original model's preprocessor_config.json next to its "
            "config.json, or calibrate on text only (drop --images)",
        ) from None
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            model, trust_remote_code=trust_remote_code
        )
    except ImportError:
        name = settings["image_processor_type"].removesuffix("Fast") + "Pil"
        return getattr(transformers, name).from_pretrained(model)


def build_image_rows(
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    source: str,
    count: int,
    max_seq_length: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """
    ``count`` rows of an instruction, one image's placeholders and its caption,
    cut at ``max_seq_length`` tokens; images are cycled in a seeded order.

    :raises ImageCalibrationError: when one image alone needs more tokens than
        ``max_seq_length``
    """
    images = captioned_images(source)
    random.Random(seed).shuffle(images)
    before = tokenizer(_PROMPT + " ", add_special_tokens=False)["input_ids"]
    # each image is processed once, however often the rows cycle through it
    distinct = [
        _image_row(config, tokenizer, image_processor, before, image, max_seq_length)
        for image in images[:count]
    ]
    return [distinct[index % len(distinct)] for index in range(count)]


def _image_row(
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    before: list[int],
    image: tuple[Path, str],
    max_seq_length: int,
) -> dict[str, Any]:
    """One image's row: ``before``, its placeholders and its caption, cut."""
    from PIL import Image

    prompt = IMAGE_PROMPTS[config.model_type]
    path, caption = image
    with Image.open(path) as opened:
        pixels = image_processor(images=[opened.convert("RGB")], return_tensors="pt")
    grid = pixels[prompt.grid]
    marks = prompt.placeholders(config, grid[0])
    if len(before) + len(marks) >= max_seq_length:
        raise ImageCalibrationError(
            f"{path.name} takes {len(marks)} image tokens, more than "
            f"max_seq_len {max_seq_length} allows",
            "raise --max-seq-len, or use smaller images",
        )
    after = tokenizer(" " + caption, add_special_tokens=False)["input_ids"]
    ids = (before + marks + after)[:max_seq_length]
    image_id = getattr(config, prompt.image_key)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "mm_token_type_ids": [prompt.token_type if t == image_id else 0 for t in ids],
        "pixel_values": pixels["pixel_values"].tolist(),
        "grid": {prompt.grid: grid.tolist()},
    }


def with_image_rows(text: Dataset, image_rows: list[dict[str, Any]]) -> Dataset:
    """
    ``text``'s rows with the image rows spread evenly among them (the image
    rows replace as many text rows, so the row count stays).
    """
    count = len(text)
    # the first row carries an image: llm-compressor traces the model with the
    # first row's inputs, and a graph traced without pixels would skip the tower
    slots = {i * count // len(image_rows) for i in range(len(image_rows))}
    no_grid = dict.fromkeys(image_rows[0]["grid"])
    rows, images = [], iter(image_rows)
    for index, row in enumerate(text):
        if index in slots:
            rows.append(next(images))
            continue
        rows.append(
            {
                **row,
                "mm_token_type_ids": [0] * len(row["input_ids"]),
                "pixel_values": None,
                "grid": no_grid,
            }
        )
    return Dataset.from_list(rows)


def collate_calibration_row(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """
    One calibration row as the model's keyword arguments (batch size 1, as
    ``oneshot`` calibrates): ids, masks and token types, and the pixels and
    their grid (None in a text row of a mixed set).
    """
    if len(batch) != 1:
        raise ValueError(
            f"image calibration runs one row per batch, got {len(batch)}: "
            "set batch_size 1"
        )
    (row,) = batch
    inputs = {
        key: torch.tensor([row[key]])
        for key in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    if "pixel_values" not in row:  # text-only calibration
        return inputs
    # a text row passes None pixels: the traced graph takes the same arguments
    pixels = row["pixel_values"]
    inputs["pixel_values"] = (
        None if pixels is None else torch.tensor(pixels, dtype=torch.float32)
    )
    inputs.update(
        {k: None if v is None else torch.tensor(v) for k, v in row["grid"].items()}
    )
    return inputs
