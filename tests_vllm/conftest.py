"""The vLLM tier reuses the unit tests' tiny-model fixtures."""

from tests.conftest import (  # noqa: F401  (fixtures)
    calibration,
    fresh_session,
    load_tiny,
    tiny_model_dir,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cells(*cells): checkpoints the test reads from the vLLM batch"
    )
