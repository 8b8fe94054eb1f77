"""Fixtures for the observability tests: Debian's ``promtool`` and ``prometheus``.

On a developer machine without them the tests that need them are skipped (install with
``apt-get install prometheus``); under CI (``CI`` set, as ``.ci/run`` runs) they fail instead,
so a missing install step can never pass for green.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


# compose-keys.sh runs about 16 ``worknode`` commands (10-20 s here): the tests that only read
# what one run made share these two runs; a test that changes the files works on a copy.


@pytest.fixture(scope="session")
def compose_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the keygen service's script with every owner this process's uid: its
    directory (``keys`` the volume only it mounts, ``out`` each service's volume). Read it
    only (``shutil.copytree`` it to change anything)."""
    from tests.observability.test_compose import _run_compose_keys

    tmp = tmp_path_factory.mktemp("compose-keys")
    _run_compose_keys(tmp)
    return tmp


@pytest.fixture(scope="session")
def compose_keys_as_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another run (another stack: its own seeds and passwords), as root (CI) handing the
    files to the users the stack's images run as: the worknodes' 10001, Grafana's 472, 0
    for NATS (as another user, its uid for all). Read it only."""
    from tests.observability.test_compose import _run_compose_keys

    tmp = tmp_path_factory.mktemp("compose-keys-stack")
    _run_compose_keys(tmp, STACK_OWNERS if os.getuid() == 0 else None)
    return tmp


STACK_OWNERS = {"OWNER": 10001, "GRAFANA_OWNER": 472, "NATS_OWNER": 0}
"""``compose_keys_as_stack``'s owners when root."""
