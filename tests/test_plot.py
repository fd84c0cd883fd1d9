import sys

from loguru import logger

from ream_modifiers.plot import expert_status, is_merging, write_expert_plot


def _report(method="REAM", merge="aligned"):
    layer = {
        "experts_before": 6,
        "kept": [0, 2, 5],
        "removed": [1, 3, 4],
        "scores": [0.5, 0.1, 0.9, 0.2, 0.3, 0.8],
        "groups": {"0": [1], "2": [3]},
    }
    return {
        "method": method,
        "num_experts_before": 6,
        "num_experts_after": 3,
        "settings": {"merge": merge},
        "layers": {"model.layers.0.mlp": layer, "model.layers.1.mlp": dict(layer)},
    }


def test_expert_status_tells_merged_from_removed():
    entry = _report()["layers"]["model.layers.0.mlp"]
    assert expert_status(entry, merging=True) == [
        "kept",
        "merged",
        "kept",
        "merged",
        "removed",
        "kept",
    ]
    assert expert_status(entry, merging=False)[1] == "removed"
    assert is_merging(_report())
    assert not is_merging(_report(merge="none"))  # REAM with merge: none prunes
    assert not is_merging({"layers": {"a": {"kept": [0]}}})


def test_plot_is_written(tmp_path):
    path = write_expert_plot([_report()], tmp_path / "p.png")
    assert path == tmp_path / "p.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000
    assert write_expert_plot([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_missing_matplotlib_skips_the_plot(tmp_path, monkeypatch):
    # a None entry in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        assert write_expert_plot([_report()], tmp_path / "p.png") is None
    finally:
        logger.remove(sink)
    assert not (tmp_path / "p.png").exists()
    assert any("matplotlib is not installed" in str(m) for m in messages)
