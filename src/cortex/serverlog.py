"""The server's own log: readable text by default, JSON lines for log collectors."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def config(level: str, json_lines: bool) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the server and uvicorn's loggers alike."""
    formatter: dict[str, Any] = {"()": JsonLines} if json_lines else {"format": _TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "cortex": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            # cortex says what it migrated; alembic's own lines would repeat it.
            "alembic": {"handlers": ["main"], "level": "WARNING", "propagate": False},
        },
    }
