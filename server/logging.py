"""Structured JSON logs (structlog) that carry no address, key, room id or payload.

The relay's own log calls name events and counts only. As a second line of
defence every record (ours and the standard-library ones from uvicorn) passes
:func:`redact`, which masks anything shaped like an IP address or a long
hex / base64 string. uvicorn's access log is off (it would log client
addresses) and its informational messages, which name peers, are dropped.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(r"\b(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F]{0,4}\b")
# Hex or base64 of a key or id: a long run of token characters with a digit in it
# (identifiers and words in messages and tracebacks rarely have digits).
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-+=]{20,}")
_DIGIT = re.compile(r"\d")
REDACTED = "[redacted]"


def _mask(text: str) -> str:
    text = _IPV4.sub(REDACTED, text)
    text = _IPV6.sub(REDACTED, text)
    return _LONG_TOKEN.sub(lambda m: REDACTED if _DIGIT.search(m[0]) else m[0], text)


def redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if isinstance(value, bytes | bytearray):
            event[key] = REDACTED
        elif isinstance(value, str) and key not in ("level", "timestamp", "logger"):
            event[key] = _mask(value)
    return event


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as one JSON object per line."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_backchannel", False):
            root.removeHandler(old)
    handler._backchannel = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn: no access log at all; its "error" logger says "('addr', port) - WebSocket ..."
    # at INFO, so only warnings and worse get through (and those are redacted).
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
