"""Fixtures for the observability tests: Debian's ``promtool`` and ``prometheus``.

On a developer machine without them the tests that need them are skipped (install with
``apt-get install prometheus``); under CI (``CI`` set, as ``.ci/run`` runs) they fail instead,
so a missing install step can never pass for green.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of ``name`` on PATH; skip (fail under CI) when it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: apt-get install prometheus; .ci/run does it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``."""
    return require_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of the ``prometheus`` server."""
    return require_tool("prometheus")
