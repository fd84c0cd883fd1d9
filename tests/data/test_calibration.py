import json

import pytest

from ream_modifiers.data import (
    bundled_texts,
    load_texts,
    read_local_texts,
    tokenize_texts,
)
from ream_modifiers.tiny import build_tokenizer


def test_bundled_domains():
    assert len(bundled_texts("general")) >= 30
    assert all(t.startswith(("def ", "class ")) for t in bundled_texts("code"))
    assert all("Answer:" in t for t in bundled_texts("math"))
    assert set(bundled_texts("mix")) == set(
        bundled_texts("general") + bundled_texts("code") + bundled_texts("math")
    )
    with pytest.raises(ValueError, match="unknown bundled domain"):
        bundled_texts("poetry")


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "plain"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    assert read_local_texts(tmp_path) == [
        "first paragraph\nstill first",
        "second",
        "plain",
        "hi\nhello",
    ]
    assert load_texts(str(tmp_path / "a.txt"), 10) == [
        "first paragraph\nstill first",
        "second",
    ]


def test_jsonl_without_text_names_the_line(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1: record has no 'text' field"):
        read_local_texts(tmp_path / "c.jsonl")


def test_packing_gives_full_rows_without_padding():
    tokenizer = build_tokenizer()
    dataset = tokenize_texts(
        ["short text"], tokenizer, num_samples=3, max_seq_length=16
    )
    assert len(dataset) == 3
    assert all(len(row) == 16 for row in dataset["input_ids"])
    assert all(all(m) for m in dataset["attention_mask"])
