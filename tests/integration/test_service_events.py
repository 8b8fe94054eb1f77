"""What a worknode service (and the healer) tells its operator, over a real nats-server: a
line per NATS disconnect and reconnect, a line per rejected envelope (reason and subject),
and store errors counted (``worknode_store_errors_total``) and logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.errors import StoreError
from broker.transport import EmbeddedNatsServer, NatsTransport
from services.healer import HealerService
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, node_settings, roster_of
from tests.integration.test_healing import _setup


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` until it holds (a generous deadline; never a fixed sleep)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"event={name} ")]


async def test_disconnect_and_reconnect_are_logged_at_info(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path, nats_server.url, "a")
    async with WorknodeService(settings, roster=roster_of([settings])) as svc:
        await nats_server.restart()
        await eventually(lambda: bool(_lines(caplog, "nats_reconnected")))
        assert svc.metrics.nats_connected._value.get() == 1
    (down,) = _lines(caplog, "nats_disconnected")
    (up,) = _lines(caplog, "nats_reconnected")
    assert down.levelno == logging.WARNING
    assert down.getMessage() == "event=nats_disconnected node=a"
    assert up.levelno == logging.INFO
    assert up.getMessage().startswith("event=nats_reconnected node=a down_s=")
    assert float(up.getMessage().rsplit("=", 1)[1]) >= 0


async def test_a_rejected_envelope_is_logged_with_its_reason(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path, nats_server.url, "a")
    async with (
        WorknodeService(settings, roster=roster_of([settings])) as svc,
        NatsTransport([nats_server.url], name="hostile") as hostile,
    ):
        counter = svc.metrics.rejected_envelopes.labels(SUBJECT, "malformed")
        for _ in range(3):
            await hostile.publish(svc.replica(SUBJECT).delta_subject, b"not an envelope")
        await eventually(lambda: counter._value.get() == 3)
    # Three refused, one line: the others within the window are held back (rate-limited).
    (line,) = _lines(caplog, "envelope_rejected")
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        f"event=envelope_rejected node=a subject={SUBJECT} reason=malformed writer=unknown"
    )


async def test_a_store_error_is_counted_and_logged(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The store fails under a running replica (closed here: every call then raises
    ``StoreError``): the failed commit reaches the writer, and the operator sees it in
    ``worknode_store_errors_total{operation="append"}`` and one log line."""
    settings = node_settings(tmp_path, nats_server.url, "a")
    async with WorknodeService(settings, roster=roster_of([settings])) as svc:
        errors = svc.metrics.store_errors
        assert errors.labels("append")._value.get() == 0
        assert svc.store is not None
        svc.store.close()
        with pytest.raises(StoreError):
            await svc.replica(SUBJECT).create("x")
        assert errors.labels("append")._value.get() == 1
        (line,) = _lines(caplog, "store_error")
        assert line.levelno == logging.ERROR
        assert "operation=append" in line.getMessage()
        assert "not open" in line.getMessage()


async def test_the_healer_logs_its_disconnects_and_reconnects_too(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, hs, roster = _setup(tmp_path, nats_server.url, [])
    async with HealerService(hs, roster=roster):
        await nats_server.restart()
        await eventually(lambda: bool(_lines(caplog, "nats_reconnected")))
    (down,) = _lines(caplog, "nats_disconnected")
    assert down.getMessage() == "event=nats_disconnected node=healer"
    assert down.levelno == logging.WARNING
