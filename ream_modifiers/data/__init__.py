# ruff: noqa: F401
from ream_modifiers.data.calibration import (
    CalibrationDataError,
    build_calibration_dataset,
    bundled_texts,
    check_calibration_source,
    load_texts,
    read_local_texts,
    tokenize_texts,
)
from ream_modifiers.data.mix import SOURCES, MixReport, build_mix, check_mix, parse_mix
