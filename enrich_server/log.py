"""JSON-lines logging: one object per event, for log shippers.

No per-request logging on the hot path; user ids never at info level.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import msgspec

_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)
# Record attributes that are not event fields (uvicorn adds an ANSI-coloured copy of its message).
_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``extra=`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(event).decode()


#: A configuration key naming any of these holds a credential: never logged.
_SECRET_WORDS: Final = ("token", "secret", "password", "basic", "plsec", "key")
REDACTED: Final = "<redacted>"


def redacted(value: Any, key: str = "") -> Any:
    """A copy of a configuration structure with every credential-looking value masked."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if any(word in key.lower() for word in _SECRET_WORDS) and value not in ("", None, [], {}):
        return REDACTED
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    return value


def setup_logging(level: str) -> None:
    """Send every logger (ours and uvicorn's) to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # No access log: uvicorn formats one per request whenever this logger has a handler
    # anywhere up its chain, which costs the hot path for lines nobody should keep.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
