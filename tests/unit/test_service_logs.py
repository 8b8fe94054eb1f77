"""Structured log lines of the services: logfmt by default, JSON when asked, rate-limited
where an event can repeat, and the replica events logged at the level an operator reads."""

from __future__ import annotations

import json
import logging

import pytest

from services.worknode._events import ReplicaEvents
from services.worknode._logging import (
    JsonFormatter,
    KeyValueFormatter,
    RateLimited,
    configure_logging,
    event,
)
from services.worknode._metrics import ServiceMetrics


def _record(msg: object, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("services.worknode", level, __file__, 1, msg, args or None, None)


def test_an_event_renders_as_logfmt_and_quotes_what_needs_it() -> None:
    line = KeyValueFormatter().format(
        _record(event("heal", subject="orders", error='a "b" c', ok=True, ms=1.23456))
    )
    assert line.startswith("time=")
    assert line.endswith(
        'level=info logger=services.worknode event=heal subject=orders error="a \\"b\\" c" '
        "ok=true ms=1.235"
    )
    plain = KeyValueFormatter().format(_record("heal of %s failed", "orders"))
    assert plain.endswith('msg="heal of orders failed"')


def test_json_lines_carry_the_same_fields() -> None:
    out = json.loads(JsonFormatter().format(
        _record(event("envelope_rejected", subject="orders", reason="malformed", n=2),
                level=logging.WARNING)
    ))
    assert out["event"] == "envelope_rejected"
    assert out["level"] == "warning"
    assert (out["subject"], out["reason"], out["n"]) == ("orders", "malformed", 2)
    assert json.loads(JsonFormatter().format(_record("x %d", 1)))["msg"] == "x 1"


def test_configure_logging_selects_the_format_and_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        monkeypatch.setenv("WORKNODE_LOG_FORMAT", "json")
        monkeypatch.delenv("WORKNODE_LOG_LEVEL", raising=False)
        configure_logging("INFO")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert root.level == logging.INFO
        monkeypatch.setenv("WORKNODE_LOG_FORMAT", "kv")
        monkeypatch.setenv("WORKNODE_LOG_LEVEL", "debug")
        configure_logging("INFO")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, KeyValueFormatter)
        assert root.level == logging.DEBUG
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(saved[0])
        for h in saved[1]:
            root.addHandler(h)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_holds_back_repeats_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = _Clock()
    limit = RateLimited(10.0, clock)
    log = logging.getLogger("test.limit")
    assert limit(log, logging.INFO, "k", "e", n=1)
    assert not limit(log, logging.INFO, "k", "e", n=2)
    assert limit(log, logging.INFO, "other", "e", n=3)  # another key has its own window
    clock.now = 9.9
    assert not limit(log, logging.INFO, "k", "e", n=4)
    clock.now = 10.0
    assert limit(log, logging.INFO, "k", "e", n=5)
    assert [r.getMessage() for r in caplog.records] == [
        "event=e n=1", "event=e n=3", "event=e n=5 suppressed=2",
    ]


def test_replica_events_count_and_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    metrics = ServiceMetrics(["orders"], "0", 2)
    clock = _Clock()
    events = ReplicaEvents(metrics, "n1", clock)
    events.rejected("orders", "bad_signature", writer="mallory")
    events.rejected("orders", "bad_signature")
    events.catchup("orders", "gave_up")
    events.catchup("orders", "retry")  # beside every failure: not a line of its own
    events.catchup("orders", "ok")
    events.gap("orders", "w1", 3)
    assert metrics.rejected_envelopes.labels("orders", "bad_signature")._value.get() == 2
    assert metrics.catchups.labels("orders", "retry")._value.get() == 1
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (logging.WARNING,
         "event=envelope_rejected node=n1 subject=orders reason=bad_signature writer=mallory"),
        (logging.WARNING, "event=catchup node=n1 subject=orders outcome=gave_up"),
        (logging.INFO, "event=catchup node=n1 subject=orders outcome=ok"),
        (logging.INFO, "event=sequence_gap node=n1 subject=orders writer=w1 missing=3"),
    ]
