"""Log lines as JSON objects (`server.log_format = "json"`), one per line, for log shippers.

Each line has ts (UTC, ISO 8601 with milliseconds), level, logger, pid and
message; fields a call passes with `extra={...}` (the quota refusal's
principal, code and limit, for example) are added as they are, and a
traceback as `exc`. Messages never contain a raw newline: json.dumps escapes
it, so one record is always one line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)  # ASCII: U+2028 and kin cannot split a line


def use_log_format(log_format: str, logger_name: str = "imr") -> None:
    """Switch every handler of imr's logger to the configured format ("text" keeps them)."""
    if log_format != "json":
        return
    for handler in logging.getLogger(logger_name).handlers:
        handler.setFormatter(JsonLinesFormatter())
