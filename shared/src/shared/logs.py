"""Logging set-up shared by every process."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per upstream request is noise at INFO.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLevelName(level)))
