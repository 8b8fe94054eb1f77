"""Structured logs of the services: one line per operator-relevant event.

An event is ``event(name, key=value, ...)``: a log message that renders as ``event=name
key=value ...`` (logfmt) and that the JSON formatter writes as one object. Plain messages
(from the broker, nats-py) are formatted the same way, as ``msg="..."``.

``configure_logging`` installs the formatter on the root logger: the format comes from
``WORKNODE_LOG_FORMAT`` (``kv``, the default, or ``json``), the level from
``WORKNODE_LOG_LEVEL`` (the caller's default otherwise). What is logged at INFO is bounded
in rate so the default level never floods: NATS disconnects and reconnects, heals that
repaired something or failed, skipped heals and membership changes, catch-up outcomes and
rejected envelopes (``RateLimited``: one line per key and window, with the count of the
lines held back).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "LOG_FORMATS",
    "Event",
    "JsonFormatter",
    "KeyValueFormatter",
    "RateLimited",
    "configure_logging",
    "event",
]

LOG_FORMATS: Final = ("kv", "json")


class Event:
    """A structured log message: an event name and its fields (in the order given)."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: dict[str, object]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{k}={_kv(v)}" for k, v in (("event", self.name),
                                                      *self.fields.items()))


def event(name: str, **fields: object) -> Event:
    """The log message of event ``name`` with ``fields`` (``log.info(event(...))``)."""
    return Event(name, fields)


def _kv(value: object) -> str:
    """``value`` as a logfmt value: bare when it has no space, quote or ``=``, else quoted."""
    if isinstance(value, float):
        value = round(value, 3)
    text = str(value) if not isinstance(value, bool) else str(value).lower()
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class KeyValueFormatter(logging.Formatter):
    """``time=... level=... logger=... event=... key=value ...`` (logfmt), one line per
    record; a traceback follows on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line."""
        head = (f"time={_timestamp(record)} level={record.levelname.lower()} "
                f"logger={record.name}")
        if isinstance(record.msg, Event) and not record.args:
            line = f"{head} {record.msg}"
        else:
            line = f"{head} msg={_kv(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, then ``event`` and its
    fields, or ``msg``; ``exc`` holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        out: dict[str, object] = {
            "time": _timestamp(record), "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, Event) and not record.args:
            out["event"] = record.msg.name
            for k, v in record.msg.fields.items():
                out.setdefault(k, _jsonable(v))
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(default_level: str = "INFO") -> None:
    """Log to stderr in ``WORKNODE_LOG_FORMAT`` (``kv`` or ``json``) at ``WORKNODE_LOG_LEVEL``
    (``default_level`` when unset). An unknown format or level falls back to the default
    (logging must not be what stops a service from starting)."""
    fmt = os.environ.get("WORKNODE_LOG_FORMAT", "kv").strip().lower()
    level_name = os.environ.get("WORKNODE_LOG_LEVEL", default_level).strip().upper()
    level = logging.getLevelNamesMapping().get(level_name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level is not None else default_level.upper())
    if fmt not in LOG_FORMATS:
        logging.getLogger(__name__).warning(
            event("bad_log_format", value=fmt, using="kv", allowed=",".join(LOG_FORMATS)))


class RateLimited:
    """At most one line per key per ``window_s`` seconds; the lines held back in between are
    counted and reported (``suppressed=N``) on the next line let through."""

    def __init__(self, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def __call__(self, logger: logging.Logger, level: int, key: Hashable, name: str,
                 **fields: Any) -> bool:
        """Log ``event(name, **fields)`` at ``level`` unless a line for ``key`` went out
        less than ``window_s`` ago; returns whether it was logged."""
        if not logger.isEnabledFor(level):
            return False
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            fields["suppressed"] = held
        logger.log(level, event(name, **fields), stacklevel=2)
        return True
