"""Image+caption calibration rows for a vision-language MoE."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer

from ream_modifiers.data.images import (
    ImageCalibrationError,
    build_image_rows,
    captioned_images,
    check_image_calibration,
    collate_calibration_row,
    load_image_processor,
    with_image_rows,
)
from ream_modifiers.moe import load_moe_model

VL = "qwen3_vl_moe"
START, IMAGE, END = 502, 500, 503  # the tiny config's vision token ids


@pytest.fixture(scope="module")
def vl(tiny_model_dir):
    source = tiny_model_dir(VL)
    return (
        source,
        AutoConfig.from_pretrained(source),
        AutoTokenizer.from_pretrained(source),
        load_image_processor(str(source)),
    )


def test_bundled_images_have_their_captions():
    pairs = captioned_images("bundled")
    assert [path.name for path, _ in pairs] == [
        "bars.png", "chessboard.png", "circle.png", "code.png",
        "face.png", "landscape.png", "stripes.png", "sum.png",
    ]  # fmt: skip
    captions = dict((path.name, text) for path, text in pairs)
    assert captions["sum.png"] == "The sum 12 + 35 = 47 written in black on white."


def test_a_folder_without_captions_gets_a_neutral_one(tmp_path):
    (source,) = [p for p, _ in captioned_images("bundled") if p.name == "face.png"]
    (tmp_path / "face.png").write_bytes(source.read_bytes())
    assert captioned_images(str(tmp_path)) == [(tmp_path / "face.png", "An image.")]


@pytest.mark.parametrize(
    ("captions", "message"),
    [
        ('{"image": "a.png"}\n', "line 1 is not a JSON object with 'image' and"),
        ('\n{"image": "b.png", "text": "x"}\n', "line 2 names 'b.png', which is"),
    ],
)
def test_bad_captions_are_refused(tmp_path, captions, message):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "captions.jsonl").write_text(captions)
    with pytest.raises(ImageCalibrationError, match=message):
        captioned_images(str(tmp_path))


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures")
    with pytest.raises(ImageCalibrationError, match="no images"):
        captioned_images(str(tmp_path))


def test_check_refuses_text_models_and_unknown_wrappers(tiny_model_dir, vl):
    text = AutoConfig.from_pretrained(tiny_model_dir("qwen3_moe"))
    with pytest.raises(ImageCalibrationError, match="qwen3_moe has no vision tower"):
        check_image_calibration(text, "bundled")
    unknown = AutoConfig.for_model("ernie4_5_vl_moe")
    assert unknown.vision_config is not None
    with pytest.raises(ImageCalibrationError, match="not defined for ernie4_5_vl_moe"):
        check_image_calibration(unknown, "bundled")
    assert check_image_calibration(vl[1], "bundled").image_key == "image_token_id"


def test_image_row_marks_one_token_per_merged_patch(vl):
    _, config, tokenizer, processor = vl
    (row,) = build_image_rows(config, tokenizer, processor, "bundled", 1, 64)
    # 128x128 drawings, 16-pixel patches, 2x2 merge: 8 x 8 patches, 16 tokens
    assert row["grid"] == {"image_grid_thw": [[1, 8, 8]]}
    assert len(row["pixel_values"]) == 64
    assert len(row["pixel_values"][0]) == 3 * 2 * 16 * 16  # channels x t x p x p
    ids = row["input_ids"]
    start = ids.index(START)
    assert ids[start : start + 18] == [START, *[IMAGE] * 16, END]
    assert IMAGE not in ids[:start] and IMAGE not in ids[start + 18 :]
    assert row["mm_token_type_ids"] == [int(t == IMAGE) for t in ids]
    assert row["attention_mask"] == [1] * len(ids)
    assert len(ids) <= 64


def test_an_image_longer_than_a_row_is_refused(vl):
    _, config, tokenizer, processor = vl
    with pytest.raises(ImageCalibrationError, match="takes 18 image tokens"):
        build_image_rows(config, tokenizer, processor, "bundled", 1, 16)


def test_image_rows_are_spread_with_the_first_row_an_image(vl):
    _, config, tokenizer, processor = vl
    images = build_image_rows(config, tokenizer, processor, "bundled", 3, 64)
    text = Dataset.from_dict(
        {"input_ids": [[i, i] for i in range(8)], "attention_mask": [[1, 1]] * 8}
    )
    mixed = with_image_rows(text, images)
    assert len(mixed) == 8
    has_image = [row["pixel_values"] is not None for row in mixed]
    assert has_image == [True, False, True, False, False, True, False, False]
    assert mixed[1]["input_ids"] == [1, 1]
    assert mixed[1]["mm_token_type_ids"] == [0, 0]
    assert mixed[1]["grid"] == {"image_grid_thw": None}


def test_collated_rows_are_what_the_model_takes(vl):
    source, config, tokenizer, processor = vl
    images = build_image_rows(config, tokenizer, processor, "bundled", 1, 64)
    text = Dataset.from_dict({"input_ids": [[5, 6, 7]], "attention_mask": [[1] * 3]})
    image_row, text_row = with_image_rows(
        Dataset.from_list([dict(text[0])] * 2), images
    )
    image_inputs = collate_calibration_row([image_row])
    assert image_inputs["pixel_values"].dtype == torch.float32
    assert image_inputs["pixel_values"].shape == (64, 1536)
    assert image_inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    text_inputs = collate_calibration_row([text_row])
    assert text_inputs["pixel_values"] is None
    assert text_inputs["image_grid_thw"] is None
    assert text_inputs["input_ids"].tolist() == [[5, 6, 7]]
    model = load_moe_model(source, dtype=torch.float32)
    with torch.no_grad():
        seen = model(**image_inputs).logits
        # the image reaches the language model: other pixels, other logits
        image_inputs["pixel_values"] = image_inputs["pixel_values"].flip(0)
        assert not torch.allclose(seen, model(**image_inputs).logits)
        vocab = config.text_config.vocab_size
        assert model(**text_inputs).logits.shape == (1, 3, vocab)


def test_only_one_row_per_batch():
    with pytest.raises(ValueError, match="one row per batch, got 2"):
        collate_calibration_row([{}, {}])


@pytest.mark.parametrize("family", [VL, "qwen3_5_moe", "glm4v_moe"])
def test_compress_calibrates_a_vision_model_on_image_rows(
    tiny_model_dir, tmp_path, family
):
    """By default (``images="auto"``): the bundled images, where they fit."""
    from llmcompressor.core import reset_session

    from ream_modifiers.cli import compress

    out = tmp_path / "out"
    reset_session()
    compress(
        "reap_w4a16", str(tiny_model_dir(family)), "bundled", str(out),
        num_samples=8, max_seq_len=48, image_fraction=0.5,
    )  # fmt: skip
    reset_session()
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["images"] == "bundled"
    assert calibration["image_rows_per_rank"] == 4
    report = json.loads((out / "expert_reduction.json").read_text())[-1]
    layer = next(iter(report["layers"].values()))
    # 4 text rows of 48 tokens and 4 image rows of at most 48 (with 16 or 25
    # image tokens)
    assert 4 * 48 + 4 * 18 <= layer["calibration_tokens"] <= 8 * 48
