import pytest

from ream_modifiers.data import build_mix, parse_mix
from ream_modifiers.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def local_sources(tmp_path):
    texts = {
        "general": "The quiet river ran under the old stone bridge at dawn. " * 6,
        "math": "Solve 12 * 7 + 5. First 12 * 7 = 84, then 84 + 5 = 89. " * 6,
        "code": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 6,
    }
    sources = {}
    for name, text in texts.items():
        path = tmp_path / f"{name}.txt"
        path.write_text("\n\n".join(f"{i}: {text}" for i in range(12)))
        sources[name] = str(path)
    return sources


def test_parse_mix_normalises_and_rejects_bad_specs():
    assert parse_mix("general=1,math=1,code=2") == {
        "general": 0.25,
        "math": 0.25,
        "code": 0.5,
    }
    with pytest.raises(ValueError, match="not name=ratio"):
        parse_mix("general:1")
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_mix("general=0,code=0")


def test_exact_counts_and_determinism(tokenizer, local_sources):
    kwargs = dict(
        ratios="general=1,math=1,code=1",
        num_samples=10,
        max_seq_length=32,
        sources=local_sources,
        seed=7,
    )
    first, report = build_mix(tokenizer, **kwargs)
    second, _ = build_mix(tokenizer, **kwargs)
    assert report.rows == {"code": 4, "general": 3, "math": 3}  # largest remainder
    assert len(first) == 10 and report.tokens == {
        k: 32 * v for k, v in report.rows.items()
    }
    assert first["input_ids"] == second["input_ids"]
    other, _ = build_mix(tokenizer, **{**kwargs, "seed": 8})
    assert other["input_ids"] != first["input_ids"]
    assert report.sources == local_sources and report.seed == 7


def test_zero_ratio_sources_are_not_read(tokenizer, local_sources):
    _, report = build_mix(
        tokenizer,
        "general=0,math=0.3,code=0.7",
        num_samples=10,
        max_seq_length=16,
        sources={"math": local_sources["math"], "code": local_sources["code"]},
    )
    assert report.rows == {"code": 7, "general": 0, "math": 3}


def test_document_rows_drop_short_documents(tokenizer, local_sources, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(
        "tiny\n\n" + "a much longer document about rivers and bridges " * 10
    )
    dataset, report = build_mix(
        tokenizer,
        "general=1",
        num_samples=1,
        max_seq_length=32,
        sources={"general": str(short)},
        packing=False,
        seed=0,
    )
    assert len(dataset["input_ids"][0]) == 32
    with pytest.raises(ValueError, match="gave 1 of the 2 rows"):
        build_mix(
            tokenizer,
            "general=1",
            num_samples=2,
            max_seq_length=32,
            sources={"general": str(short)},
            packing=False,
        )


def test_unknown_source_needs_a_path(tokenizer):
    with pytest.raises(ValueError, match="unknown calibration source 'poetry'"):
        build_mix(tokenizer, "poetry=1", num_samples=2, max_seq_length=8)


def test_bundled_sources_work_offline(tokenizer):
    dataset, report = build_mix(
        tokenizer,
        "general=0.5,math=0.25,code=0.25",
        num_samples=8,
        max_seq_length=64,
        sources={n: f"bundled:{n}" for n in ("general", "math", "code")},
    )
    assert report.rows == {"code": 2, "general": 4, "math": 2} and len(dataset) == 8


def test_hub_sources_stream_with_their_filters(tokenizer, monkeypatch):
    import datasets

    records = {
        "AI-MO/NuminaMath-1.5": [
            {"source": "amc", "problem": "p0", "solution": "x" * 600},
            {"source": "cn_k12", "problem": "p1", "solution": "short"},
            {"source": "olympiads", "problem": "p2", "solution": "y" * 600},
        ]
        * 4,
        "allenai/c4": [{"text": "z" * 500}, {"text": "too short"}] * 4,
    }
    asked = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        asked.append((name, config, split, streaming))
        return iter(records[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _, report = build_mix(
        tokenizer, "general=0.5,math=0.5", num_samples=2, max_seq_length=16
    )
    assert report.sources == {"general": "allenai/c4", "math": "AI-MO/NuminaMath-1.5"}
    assert ("allenai/c4", "en", "validation", True) in asked
    # only cn_k12 / olympiads solutions longer than 461 characters are kept
    from ream_modifiers.data.mix import _texts

    texts, _ = _texts("math", None, needed=3)
    assert texts == ["p2\n\n" + "y" * 600] * 3
    from ream_modifiers.data import load_texts

    assert load_texts("c4", 2) == ["z" * 500, "too short"]
