# ruff: noqa: F401
from ream_modifiers.data.calibration import (
    build_calibration_dataset,
    bundled_texts,
    load_texts,
    read_local_texts,
    tokenize_texts,
)
from ream_modifiers.data.mix import SOURCES, MixReport, build_mix, parse_mix
