"""The lm-eval task definitions under benchmarks/tasks/ and their data files."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

TASKS = Path(__file__).parents[2] / "benchmarks" / "tasks"


def _build_data_module():
    spec = importlib.util.spec_from_file_location("build_data", TASKS / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's ``!function`` tag, kept as its dotted name."""


_TaskLoader.add_constructor(
    "!function", lambda loader, node: loader.construct_scalar(node)
)


def _task(path: Path) -> dict:
    config = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506
    if "include" in config:
        base = yaml.load(
            (TASKS / config.pop("include")).read_text(), Loader=_TaskLoader
        )
        config = {**base, **config}
    return config


def _records(name: str) -> list[dict]:
    lines = (TASKS / "data" / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_committed_task_data_is_what_build_data_produces(tmp_path, monkeypatch):
    module = _build_data_module()
    monkeypatch.setattr(module, "DATA", tmp_path)
    module.main()
    built = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert built == sorted(p.name for p in (TASKS / "data").glob("*.jsonl"))
    for name in built:
        assert (tmp_path / name).read_text() == (TASKS / "data" / name).read_text(), (
            name
        )


@pytest.mark.parametrize("path", sorted(TASKS.glob("mini_moe_*.yaml")), ids=str)
def test_every_task_reads_an_existing_file_with_the_fields_it_uses(path):
    config = _task(path)
    assert config["task"] == path.stem
    assert config["custom_dataset"] == "utils.load_jsonl"
    records = _records(config["dataset_kwargs"]["data_file"])
    assert records
    fields = {
        key: config[key]
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice")
        if config.get(key)
    }
    for field in fields.values():
        assert all(field in record for record in records), (path.name, field)


def test_mc_items_have_four_distinct_choices_and_a_valid_gold_index():
    for domain in ("general", "code", "math"):
        records = _records(f"mc_{domain}.jsonl")
        assert len(records) == 100
        for record in records:
            assert len(set(record["choices"])) == 4
            assert 0 <= record["gold"] < 4
        # the true answer is not always in the same position
        assert len({r["gold"] for r in records}) == 4


def test_math_mc_distractors_are_wrong_and_the_gold_is_right():
    number = re.compile(r"-?\d+")
    for record in _records("mc_math.jsonl"):
        a, op, b, k = re.search(
            r"\((-?\d+) ([-+*]) (-?\d+)\) \* (\d+)", record["context"]
        ).groups()
        truth = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        truth *= int(k)
        finals = [int(number.findall(c)[-1]) for c in record["choices"]]
        assert finals[record["gold"]] == truth
        wrong = [c for i, c in enumerate(record["choices"]) if i != record["gold"]]
        assert all(f"The answer is {truth}." not in c for c in wrong)


def test_gen_targets_complete_their_prompts():
    for record in _records("gen_math.jsonl"):
        assert record["prompt"].endswith(f"= {record['target']}. The answer is")
    for record in _records("gen_code.jsonl"):
        assert record["target"].strip() in record["prompt"]
        assert "\n" not in record["target"]


def test_loader_names_the_build_command_for_a_missing_file():
    spec = importlib.util.spec_from_file_location("utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(FileNotFoundError, match="build_data.py"):
        module.load_jsonl("missing.jsonl")
