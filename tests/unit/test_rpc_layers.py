"""The RPC pure core keeps to its layer: no asyncio, nats, prometheus, clock or transport
imports in the modules that check tokens and encode, decode and bound requests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PURE = ("_protocol.py", "_capability.py", "_errors.py")
FORBIDDEN = ("asyncio", "nats", "prometheus_client", "time", "broker.transport",
             "broker.replica", "services")
RPC = Path(__file__).resolve().parents[2] / "broker" / "rpc"


@pytest.mark.parametrize("name", PURE)
def test_pure_rpc_modules_import_nothing_impure(name: str) -> None:
    tree = ast.parse((RPC / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    bad = {m for m in imported for f in FORBIDDEN if m == f or m.startswith(f + ".")}
    assert not bad, f"{name} imports {sorted(bad)}"
