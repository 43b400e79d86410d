"""Log set-up for the server: text or JSON lines, and the access log (one line per finished call)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from workers.json_log import JsonFormatter

ACCESS = logging.getLogger("modelpool.access")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str, log_format: str) -> None:
    # Workers are spawned with this environment and log the same way.
    os.environ["MODELPOOL_LOG_LEVEL"], os.environ["MODELPOOL_LOG_FORMAT"] = level.upper(), log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def access(fields: dict[str, Any]) -> None:
    """The access-log line of one finished call: key=value text, or the fields as JSON keys."""
    text = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
    ACCESS.info(text, extra=fields)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in '"=' for c in text)) else text
