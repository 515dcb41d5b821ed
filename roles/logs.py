"""Logging set-up through loguru: readable by default, JSON lines with log_json."""

from __future__ import annotations

import sys

from loguru import logger


def setup_logging(level: str = "INFO", json_lines: bool = False, role: str = "") -> None:
    logger.remove()
    if json_lines:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        fmt = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> " + (f"{role} " if role else "") + "{message}"
        logger.add(sys.stderr, level=level, format=fmt, colorize=None)
