"""JSON-lines logging for the server: one object per line, access lines carry their fields."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname,
                "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


LOGGERS = ("adapterhub", "serving")


@contextmanager
def json_logging(level: int = logging.INFO, stream=None) -> Iterator[logging.Handler]:
    """Send the server's loggers (adapterhub.*, and the engine's serving.*) to ``stream`` as
    JSON lines meanwhile."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    try:
        yield handler
    finally:
        for logger, (lvl, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.level, logger.propagate = lvl, propagate
