"""Dataset loader for the ``mini_moe_*`` lm-eval tasks: local JSONL files next to
the task YAMLs, so the tasks run offline and from any working directory."""

from __future__ import annotations

from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"


def load_jsonl(data_file: str, **_task_metadata) -> datasets.DatasetDict:
    """
    :param data_file: a file name under ``benchmarks/tasks/data/``
    :return: the records as the ``test`` split
    """
    path = DATA / data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; build it with `python benchmarks/tasks/build_data.py`"
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
