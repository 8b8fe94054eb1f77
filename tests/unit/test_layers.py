"""The tier map, enforced on every module by reading its imports and call sites (ast).

Tiers:

- **pure core** (``PURE``, by path pattern, so a new package under a pure path is covered the
  day it appears): imports no asyncio, nats, prometheus_client, sqlite3 or other I/O and
  concurrency modules, reads no clock (``time.time``, ``time.monotonic``, ``datetime.now``,
  ... anywhere, even as a default argument), draws no randomness from a global source
  (``random.<function>``, ``os.urandom``, ``secrets``, ``uuid.uuid4``; a seeded
  ``random.Random`` passed in is fine), and imports from broker only pure modules (importing
  ``broker.x.y`` runs ``broker/x/__init__.py`` too, so that must be pure as well, unless
  ``broker.x`` is the importer's own package);
- **adapters** (every other module of ``broker/``): never import ``services``;
- **services** may import anything.

A checker that passes everything proves nothing: ``test_the_checker_flags_*`` feed it
synthetic violating modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PURE: dict[str, str] = {
    "broker/__init__.py": "re-exports the error root",
    "broker/errors.py": "the error tree",
    "broker/crdt/*": "CRDTs",
    "broker/merkle/*": "Merkle trees and the reconciliation machine",
    "broker/codec/*": "the wire codec",
    "broker/repair.py": "key digests and repair deltas",
    "broker/rpc/_protocol.py": "RPC bodies, bounds, deadlines",
    "broker/rpc/_capability.py": "token checks",
    "broker/replication/*": "the replication machine",
    "broker/healing/_wire.py": "heal wire forms",
    "broker/healing/_planner*.py": "the heal planner",
    "broker/healing/_plan/*": "the heal planner, should it grow into a package",
    "broker/transport/_subjects.py": "the subject layout",
    "broker/transport/_auth.py": "NATS identities and their permissions",
    "broker/lincheck/__init__.py": "the linearizability checker (its CLI, __main__, reads a clock)",
    "broker/lincheck/_[!_]*.py": "the linearizability checker",
    "broker/kinds/*": "typed kinds, kind schemas, lenses and migrations",
}
"""Path patterns (``*`` spans folders) of the pure core, and what each holds."""

FUTURE: frozenset[str] = frozenset({
    "broker/replication/*", "broker/healing/_wire.py", "broker/healing/_planner*.py",
    "broker/healing/_plan/*",
})
"""Patterns of pure modules that issue 13 is adding; every other pattern must match a file
(a stale pattern would silently stop checking anything)."""

IMPURE_MODULES: frozenset[str] = frozenset({
    "asyncio", "nats", "prometheus_client", "sqlite3", "socket", "selectors", "ssl",
    "subprocess", "threading", "multiprocessing", "concurrent", "signal", "aiohttp",
    "secrets", "services",
})
"""Modules (and their submodules) the pure core never imports."""

CLOCK_READS: frozenset[str] = frozenset({
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.perf_counter",
    "time.perf_counter_ns", "time.process_time", "time.process_time_ns", "time.localtime",
    "time.gmtime", "time.ctime", "time.asctime", "time.strftime", "time.sleep",
    "datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today",
    "datetime.date.today",
})
RANDOM_READS: frozenset[str] = frozenset({"os.urandom", "os.getrandom", "uuid.uuid1",
                                          "uuid.uuid4", "random.SystemRandom"})
"""Global sources of time and randomness; ``random.<any function>`` is added in code (only
the ``random.Random`` class, seeded by the caller, is allowed)."""


def module_name(rel: str) -> str:
    """``broker/codec/__init__.py`` -> ``broker.codec``; ``broker/x.py`` -> ``broker.x``."""
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_pure(rel: str) -> bool:
    """Whether the module at ``rel`` (a path from the repository root) is in the pure core."""
    return any(fnmatch(rel, pattern) for pattern in PURE)


def module_path(name: str) -> str | None:
    """The file of broker module ``name`` (``None`` when it is not one, e.g. a class)."""
    base = name.replace(".", "/")
    for rel in (f"{base}.py", f"{base}/__init__.py"):
        if (ROOT / rel).is_file():
            return rel
    return None


@dataclass(frozen=True)
class Use:
    """One import or one use of a global name, with the line it is on."""

    line: int
    name: str
    imported: bool


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def uses(source: str, rel: str) -> list[Use]:
    """Every module imported (absolute names) and every dotted global name used, resolved
    through the module's import aliases (``from time import monotonic as m; m()`` is a use
    of ``time.monotonic``)."""
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    package = module_name(rel) if rel.endswith("__init__.py") else module_name(rel).rpartition(
        "."
    )[0]
    aliases: dict[str, str] = {}
    out: list[Use] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Use(node.lineno, a.name, True))
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else (
                    a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            out.append(Use(node.lineno, base, True))
            for a in node.names:
                full = f"{base}.{a.name}"
                aliases[a.asname or a.name] = full
                if module_path(full) is not None:  # ``from broker import errors``
                    out.append(Use(node.lineno, full, True))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(
            getattr(node, "ctx", None), ast.Load
        ):
            dotted = _dotted(node)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head in aliases:
                out.append(Use(node.lineno, f"{aliases[head]}.{rest}" if rest else aliases[head],
                               False))
    return out


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _under(name: str, roots: frozenset[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _global_source(name: str) -> bool:
    if name in CLOCK_READS or name in RANDOM_READS:
        return True
    # random.random(), random.choice, random.seed ...: the module's hidden global generator.
    return name.startswith("random.") and name.split(".")[1] not in ("Random",)


def violations(source: str, rel: str) -> list[str]:
    """What the module at ``rel`` does that its tier forbids (empty when it keeps to it)."""
    out: list[str] = []
    pure = is_pure(rel)
    for use in uses(source, rel):
        where = f"{rel}:{use.line}"
        if rel.startswith("broker/") and use.imported and _under(use.name, frozenset({"services"})):
            out.append(f"{where} imports {use.name} (only services import services)")
        if not pure:
            continue
        if use.imported and _under(use.name, IMPURE_MODULES):
            out.append(f"{where} imports {use.name} (pure core)")
        elif use.imported and _under(use.name, frozenset({"broker"})):
            # Importing broker.a.b runs broker/a/__init__.py and broker/a/b.py: both must be
            # pure, except the importer's own packages (their __init__ has run already: a
            # pure module beside adapters, as in broker/rpc, is a layout, not an import).
            own = module_name(rel)
            parts = use.name.split(".")
            for i in range(2, len(parts) + 1):
                name = ".".join(parts[:i])
                if i < len(parts) and own.startswith(name + "."):
                    continue
                dep = module_path(name)
                if dep is not None and not is_pure(dep):
                    out.append(f"{where} imports {use.name}, which runs the adapter {dep}")
                    break
        elif not use.imported and _global_source(use.name):
            out.append(f"{where} reads {use.name} (time and randomness come in as arguments)")
    return sorted(set(out))


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in ("broker", "services")
                  for p in (ROOT / d).rglob("*.py"))


MODULES = _modules()


@pytest.mark.parametrize("rel", MODULES)
def test_every_module_keeps_to_its_tier(rel: str) -> None:
    assert violations((ROOT / rel).read_text(), rel) == []


def test_the_pure_core_is_where_the_design_says() -> None:
    pure = [m for m in MODULES if is_pure(m)]
    for expected in ("broker/crdt/_stores.py", "broker/merkle/_reconcile.py",
                     "broker/codec/_wire.py", "broker/repair.py", "broker/rpc/_protocol.py",
                     "broker/rpc/_capability.py", "broker/errors.py"):
        assert expected in pure
    for adapter in ("broker/replica.py", "broker/store.py", "broker/rpc/_server.py",
                    "broker/transport/_nats.py"):
        assert adapter not in pure
    # a new module in a pure package is pure by its path
    assert is_pure("broker/crdt/_new_kind.py")
    assert is_pure("broker/replication/_anything.py")
    assert not is_pure("services/healer/_service.py")
    assert is_pure("broker/lincheck/_checker.py")
    assert not is_pure("broker/lincheck/__main__.py")


@pytest.mark.parametrize("pattern", sorted(set(PURE) - FUTURE))
def test_no_pure_pattern_is_stale(pattern: str) -> None:
    assert any(fnmatch(m, pattern) for m in MODULES), f"{pattern} matches no module"


# -- the checker can fail -------------------------------------------------------------------

FLAGGED = [
    ("broker/crdt/_x.py", "import asyncio\n"),
    ("broker/crdt/_x.py", "from nats.aio.client import Client\n"),
    ("broker/merkle/_x.py", "import prometheus_client as p\n"),
    ("broker/codec/_x.py", "def f():\n    import sqlite3\n    return sqlite3\n"),
    ("broker/crdt/_x.py", "import time\n\ndef now():\n    return time.time()\n"),
    ("broker/crdt/_x.py", "from time import monotonic as m\n\ndef f(c=m):\n    return c()\n"),
    ("broker/repair.py", "import datetime\n\nx = datetime.datetime.now()\n"),
    ("broker/repair.py", "from datetime import datetime\n\nx = datetime.now()\n"),
    ("broker/replication/_x.py", "import random\n\ndef jitter():\n    return random.random()\n"),
    ("broker/replication/_x.py", "from random import choice\n\ny = choice([1, 2])\n"),
    ("broker/rpc/_protocol.py", "import os\n\ntoken = os.urandom(8)\n"),
    ("broker/crdt/_x.py", "from broker.replica import Replica\n"),
    ("broker/crdt/_x.py", "from broker.rpc._protocol import Request\n"),  # runs rpc/__init__
    ("broker/rpc/_protocol.py", "from broker.rpc import _server\n"),
    ("broker/rpc/_protocol.py", "from broker.rpc._client import RpcClient\n"),
    ("broker/crdt/_x.py", "from . import _y\nfrom ..store import Store\n"),
    ("broker/replica.py", "from services.worknode import WorknodeService\n"),
    ("broker/transport/_x.py", "import services.healer\n"),
]


@pytest.mark.parametrize(("rel", "source"), FLAGGED)
def test_the_checker_flags_a_violating_module(rel: str, source: str) -> None:
    assert violations(source, rel), f"{rel} passed with:\n{source}"


PASSED = [
    ("broker/crdt/_x.py", "import random\n\ndef f(rng: random.Random) -> float:\n"
                          "    return rng.random()\n"),
    ("broker/crdt/_x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    import asyncio\n"),
    ("broker/crdt/_x.py", "from broker.errors import InvalidKeyError\nfrom . import _stores\n"),
    ("broker/rpc/_protocol.py", "from broker.rpc._capability import mint\n"),  # own package
    ("broker/healing/_planner.py", "from broker.healing._wire import RootView\n"),
    ("broker/merkle/_x.py", "from datetime import UTC, datetime\n\n"
                            "def ts(s: float) -> datetime:\n"
                            "    return datetime.fromtimestamp(s, tz=UTC)\n"),
    ("broker/replica.py", "import asyncio\nimport time\n\nt = time.monotonic()\n"),
    ("services/healer/_x.py", "import services.worknode\nimport asyncio\n"),
]


@pytest.mark.parametrize(("rel", "source"), PASSED)
def test_the_checker_passes_a_module_in_its_tier(rel: str, source: str) -> None:
    assert violations(source, rel) == []
