"""The pure helpers of benchmarks/compare_reference.py (no reference checkout)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "compare_reference.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compare_reference", module)
    spec.loader.exec_module(module)
    return module


cr = _load()


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # worked by hand: 2 agreeing pairs, expected 6*3/15, best (6+3)/2
        ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 0.8 / 3.3),
        # crossed halves: 4 agreeing pairs, expected 144/28, best 12
        ([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1], -1 / 6),
        ([0, 0, 1, 1], [5, 5, 3, 3], 1.0),  # label names do not matter
        ([0, 0, 1, 2], [0, 1, 2, 3], 0.0),  # one pair against all singletons
        ([0, 1, 2], [0, 1, 2], 1.0),  # both all singletons (0/0)
        ([0, 0, 0], [1, 1, 1], 1.0),  # both one cluster (0/0)
    ],
)
def test_adjusted_rand_index_hand_examples(first, second, expected):
    assert cr.adjusted_rand_index(first, second) == pytest.approx(expected)
    assert cr.adjusted_rand_index(second, first) == pytest.approx(expected)


def test_adjusted_rand_index_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        first = [rng.randrange(rng.randint(1, n)) for _ in range(n)]
        second = [rng.randrange(rng.randint(1, n)) for _ in range(n)]
        assert cr.adjusted_rand_index(first, second) == pytest.approx(
            metrics.adjusted_rand_score(first, second)
        )


def test_adjusted_rand_index_needs_equal_lengths():
    with pytest.raises(ValueError):
        cr.adjusted_rand_index([0, 1], [0])


def test_partition_labels_canonical_and_uncovered():
    assert cr.partition_labels([[3, 1], [0]], 5) == [0, 1, 2, 1, 3]
    with pytest.raises(ValueError):
        cr.partition_labels([[0, 1], [1]], 3)
    with pytest.raises(ValueError):
        cr.partition_labels([[0, 7]], 3)


def test_layer_agreement():
    reference = {0: [0, 1, 2], 3: [3], 4: [4, 5]}
    same = {4: [5, 4], 0: [2, 0, 1], 3: [3]}
    assert cr.layer_agreement(reference, same, 6) == {
        "identical_partition": True,
        "ari": 1.0,
        "identical_kept": True,
        "kept_overlap": 1.0,
    }
    # same partition, another expert kept for the first group
    other_kept = {1: [0, 1, 2], 3: [3], 4: [4, 5]}
    result = cr.layer_agreement(reference, other_kept, 6)
    assert result["identical_partition"] and result["ari"] == 1.0
    assert not result["identical_kept"]
    assert result["kept_overlap"] == pytest.approx(2 / 3, abs=1e-4)
    different = {0: [0, 1], 2: [2, 3], 4: [4, 5]}
    result = cr.layer_agreement(reference, different, 6)
    assert not result["identical_partition"] and result["ari"] < 1.0


def test_agreement_summary_and_layer_check():
    reference = {0: {0: [0, 1], 2: [2]}, 1: {0: [0], 1: [1, 2]}}
    ours = {0: {0: [0, 1], 2: [2]}, 1: {0: [0, 1], 2: [2]}}
    result = cr.agreement(reference, ours, 3)
    assert result["identical_partitions"] == 0.5
    assert result["identical_kept"] == 0.5
    assert result["ari"] == pytest.approx((1.0 + -0.5) / 2)
    assert set(result["layers"]) == {"0", "1"}
    with pytest.raises(ValueError):
        cr.agreement(reference, {0: ours[0]}, 3)


def test_report_groups():
    report = {
        "layers": {
            "model.layers.0.mlp": {"kept": [0, 2], "groups": {"0": [1, 3]}},
            "model.layers.3.mlp": {"kept": [1, 3], "extra": {"groups": {"3": [0]}}},
        }
    }
    assert cr.report_groups(report) == {
        0: {0: [0, 1, 3], 2: [2]},
        3: {1: [1], 3: [3, 0]},
    }
    with pytest.raises(ValueError):
        cr.report_groups({"layers": {"mlp": {"kept": [0]}}})


def test_labels_to_groups():
    # label j belongs to centroid j, as pseudo_group returns them
    assert cr.labels_to_groups([1.0, 0.0, 1.0, 0.0], [3, 0]) == {3: [1, 3], 0: [0, 2]}


def test_recoveries_and_experts_kept():
    result = cr.recoveries({"a": 10.0, "b": 4.0}, {"a": 20.0, "b": 4.0})
    assert result == {"a": 0.5, "b": 1.0, "mean": 0.75}
    assert cr.experts_kept(32, 0.25) == 24
    assert cr.experts_kept(32, 0.5) == 16


def test_mask_keyword_shim():
    def create_causal_mask(config, inputs_embeds, attention_mask, past_key_values):
        return config, inputs_embeds, attention_mask, past_key_values

    shimmed = cr.mask_keyword_shim(create_causal_mask)
    assert shimmed(
        config="c",
        input_embeds="e",
        attention_mask="m",
        cache_position="dropped",
        past_key_values=None,
    ) == ("c", "e", "m", None)


def test_markdown_table():
    side = {"recovery": {"general": 0.9, "code": 0.8, "math": 0.7, "mean": 0.8}}
    row = {
        "ratio": 0.25,
        "experts_kept": 24,
        "reference": {**side, "seconds": 12.0},
        "ours": {**side, "seconds": 3.5},
        "agreement": {"identical_partitions": 0.5, "ari": 0.75, "identical_kept": 1},
    }
    lines = cr.markdown_table([row]).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| 25% (24 kept) | 80.0% | 80.0% |")
    assert "12.0 / 3.5" in lines[2]
