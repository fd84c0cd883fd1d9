"""The default log: our per-layer decisions, llm-compressor's progress bars."""

from __future__ import annotations

import os
import sys

from loguru import logger

__all__ = ["quiet_library_logs"]

# llm-compressor modules that log per quantized module (hundreds of lines per
# decoder layer): kept to warnings and errors unless --verbose
_PER_MODULE_LOGGERS = (
    "llmcompressor.modifiers.gptq",
    "llmcompressor.modifiers.quantization",
    "llmcompressor.utils.metric_logging",
)


def quiet_library_logs() -> None:
    """
    llm-compressor's console log (stdout, its format and log-once filter),
    minus its per-module lines below WARNING: GPTQ's ``Quantizing ...`` and
    ``METRIC`` lines (METRIC sits at level 38, so a level alone would keep
    it). Left alone when ``LLM_COMPRESSOR_LOG_LEVEL`` or ``..._DISABLED`` is set.
    """
    from llmcompressor.logger import LoggerConfig, configure_logger, support_log_once

    if os.getenv("LLM_COMPRESSOR_LOG_LEVEL") or os.getenv(
        "LLM_COMPRESSOR_LOG_DISABLED"
    ):
        return

    def keep(record) -> bool:
        if not support_log_once(record):
            return False
        if not record["name"].startswith(_PER_MODULE_LOGGERS):
            return True
        return record["level"].name in ("WARNING", "ERROR", "CRITICAL")

    # clears the handlers and re-adds only the file log, if one is configured
    configure_logger(LoggerConfig(console_log_level=None))
    logger.add(
        sys.stdout,
        level="INFO",
        format="{time:YYYY-MM-DDTHH:mm:ss.SSSS} | {function} | {level} - {message}",
        filter=keep,
    )
