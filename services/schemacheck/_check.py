"""``worknode schema check`` end to end: find the releases, dump each schema directory in a
worker subprocess, then compare every older snapshot with every newer one.

Invariants:

- pycapnp never runs in this process. Directories are dumped by ``python -m
  services.schemacheck._dump`` in batches; a worker that dies (a schema error aborts the
  parser) costs only the directory it was on: the batch resumes after it in a new worker.
- The check is transitive (FULL_TRANSITIVE in schema-registry terms): releases are ordered
  ``v1 < v2 < ... < current`` and every pair (older, newer) is compared, so a sequence of
  individually safe steps that adds up to a break is still caught.
- A report with errors is incomplete: its exit code is 2 even if violations were found.
- Lint findings (``ID_MISSING``, only for the newest directory: the one being edited) are
  kept apart from breaking ones: they never make the exit code 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import WorknodeError
from services.schemacheck._compare import (
    Snapshot,
    Violation,
    compare,
    merge,
    missing_ids,
    transitive_pairs,
)
from services.schemacheck._rules import LINT

__all__ = [
    "CURRENT_LABEL",
    "EXIT_BREAKING",
    "EXIT_INCOMPLETE",
    "EXIT_LINT",
    "EXIT_OK",
    "CheckReport",
    "SchemaLoadError",
    "check",
    "check_directories",
    "check_snapshots",
    "dump_directories",
    "find_releases",
    "load_snapshots",
]

CURRENT_LABEL = "current"
"""Label of the ``schemas/`` snapshot in messages (releases are labelled by directory name)."""

EXIT_OK = 0
"""Exit code: nothing breaks (and, with ``--lint``, no lint warning)."""
EXIT_BREAKING = 1
"""Exit code: at least one breaking finding."""
EXIT_INCOMPLETE = 2
"""Exit code: usage error, or a schema directory that does not parse (check incomplete)."""
EXIT_LINT = 3
"""Exit code with ``--lint``: lint warnings only, nothing breaking."""

_WORKER = "services.schemacheck._dump"
_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``services`` package
_CAPNP_ERROR = re.compile(r"^(?:\s*what\(\):\s*)?(\S+\.capnp:\d+: failed: .*)$", re.MULTILINE)


class SchemaLoadError(WorknodeError):
    """A schema directory is missing, empty or unreadable, so nothing can be checked.

    Fix the path (or the ``--schemas`` / ``--releases`` options) and run the check again.
    """


@dataclass(frozen=True)
class CheckReport:
    """What a check found: breaking findings, lint warnings, errors (unparsable
    directories), and the pairs compared."""

    violations: tuple[Violation, ...]
    errors: tuple[str, ...]
    pairs: tuple[str, ...]
    warnings: tuple[Violation, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 when clean, 1 when breaking findings were found, 2 when the check could not
        complete (lint warnings do not count: see :meth:`exit_code_with_lint`)."""
        if self.errors:
            return EXIT_INCOMPLETE
        return EXIT_BREAKING if self.violations else EXIT_OK

    def exit_code_with_lint(self) -> int:
        """As :attr:`exit_code`, but 3 when the only findings are lint warnings."""
        code = self.exit_code
        return EXIT_LINT if code == EXIT_OK and self.warnings else code


def find_releases(releases: Path) -> list[Path]:
    """Subdirectories of ``releases`` holding ``*.capnp`` files, oldest first (``v2 < v10``)."""
    if not releases.is_dir():
        return []
    found = [d for d in releases.iterdir() if d.is_dir() and any(d.glob("*.capnp"))]

    def key(d: Path) -> tuple[int, int, str]:
        m = re.fullmatch(r"v(\d+)", d.name)
        return (0, int(m.group(1)), "") if m else (1, 0, d.name)

    return sorted(found, key=key)


def dump_directories(dirs: Sequence[Path], *, timeout: float = 300.0,
                     imports: Sequence[Path] = ()) -> dict[Path, Any]:
    """Dump each directory in worker subprocesses: a JSON dump, or an error message (str).

    One worker handles as many directories as it can; after a crash (or ``timeout`` seconds
    without finishing) the next worker starts after the directory it was on. ``imports``
    are extra import paths for every directory (``-I``).
    """
    include = [arg for path in imports for arg in ("-I", str(path))]
    out: dict[Path, Any] = {}
    pending = list(dirs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p
    )
    while pending:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", _WORKER, *include, *map(str, pending)],
                capture_output=True, text=True, timeout=timeout, env=env, check=False,
            )
        except subprocess.TimeoutExpired as exc:  # keep what finished, skip the stuck one
            partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else ""
            done = _record(out, pending, _parse_lines(partial))
            if done < len(pending):
                stuck = pending[done]
                out[stuck] = f"{stuck}: schema parser timed out after {timeout:.0f} s"
            pending = pending[done + 1:]
            continue
        done = _record(out, pending, _parse_lines(proc.stdout))
        if proc.returncode == 0 and done == len(pending):
            break
        if proc.returncode < 0 and done < len(pending):
            out[pending[done]] = _crash_message(pending[done], proc.returncode, proc.stderr)
            pending = pending[done + 1:]
            continue
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"
        for d in pending[done:]:
            out[d] = f"{d}: schema worker failed with exit code {proc.returncode}: {tail}"
        break
    return out


def _record(out: dict[Path, Any], pending: Sequence[Path], lines: list[dict[str, Any]]) -> int:
    for d, line in zip(pending, lines, strict=False):
        out[d] = line["dump"] if line["ok"] else f"{d}: cannot load schema: {line['error']}"
    return len(lines)


def _parse_lines(stdout: str) -> list[dict[str, Any]]:
    """The worker's complete JSON lines, in order; a line cut short by a crash ends them."""
    out: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            break
        if not isinstance(item, dict) or "ok" not in item:
            break
        out.append(item)
    return out


def _crash_message(directory: Path, returncode: int, stderr: str) -> str:
    try:
        sig = signal.Signals(-returncode).name
    except ValueError:
        sig = f"signal {-returncode}"
    errors = _CAPNP_ERROR.findall(stderr)
    if errors:
        detail = "; ".join(f"{directory / e}" for e in errors)
    else:
        detail = " | ".join(stderr.strip().splitlines()[-3:]) or "no message"
    return f"{directory}: cannot parse schema: {detail} (the parser aborted with {sig})"


def _read_sources(directory: Path) -> dict[str, str]:
    return {
        p.name: p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(directory.glob("*.capnp"))
    }


def load_snapshots(
    labelled: Sequence[tuple[str, Path]], imports: Sequence[Path] = (),
) -> tuple[list[Snapshot], list[Snapshot], list[str]]:
    """Dump and read each (label, directory), all in as few worker processes as possible.

    Returns the snapshots that parsed, source-only snapshots (no nodes) of those that did not,
    and one error message per directory that did not.
    """
    dumps = dump_directories([d for _, d in labelled], imports=imports)
    parsed: list[Snapshot] = []
    unparsed: list[Snapshot] = []
    errors: list[str] = []
    for label, directory in labelled:
        sources = _read_sources(directory)
        result = dumps.get(directory, f"{directory}: not dumped")
        if isinstance(result, str):
            errors.append(result)
            unparsed.append(Snapshot(label, directory, {}, {}, sources))
        else:
            parsed.append(Snapshot.from_dump(label, directory, result, sources))
    return parsed, unparsed, errors


def check_snapshots(snapshots: Sequence[Snapshot]) -> list[Violation]:
    """Compare every older snapshot with every newer one (oldest first); merged findings,
    ``ID_MISSING`` lint of the newest snapshot included."""
    found: list[Violation] = list(missing_ids(snapshots[-1])) if snapshots else []
    for old, new in transitive_pairs(snapshots):
        found.extend(compare(old, new))
    return merge(found, [s.label for s in snapshots])


def _run(labelled: Sequence[tuple[str, Path]], imports: Sequence[Path] = ()) -> CheckReport:
    snapshots, unparsed, errors = load_snapshots(labelled, imports)
    if errors:
        # Still report what the sources show: a file without an id does not even parse.
        newest = next((s for s in (*snapshots, *unparsed)
                       if s.directory == labelled[-1][1]), None)
        lint = merge(missing_ids(newest)) if newest is not None else []
        return CheckReport((), tuple(errors), (), tuple(lint))
    pairs = tuple(f"{a.label} → {b.label}" for a, b in transitive_pairs(snapshots))
    found = check_snapshots(snapshots)
    return CheckReport(
        tuple(v for v in found if v.kind != LINT), (), pairs,
        tuple(v for v in found if v.kind == LINT),
    )


def _require_schemas(directory: Path) -> None:
    if not directory.is_dir():
        raise SchemaLoadError(f"{directory}: not a directory")
    if not any(directory.glob("*.capnp")):
        raise SchemaLoadError(f"{directory}: no *.capnp files")


def check(schemas: Path, releases: Path) -> CheckReport:
    """Check ``schemas/*.capnp`` against every release under ``releases`` (transitively).

    Raises :class:`SchemaLoadError` when ``schemas`` is not a directory with ``*.capnp`` files.
    """
    _require_schemas(schemas)
    labelled = [(d.name, d) for d in find_releases(releases)]
    labelled.append((CURRENT_LABEL, schemas))
    return _run(labelled)


def check_directories(old: Path, new: Path, imports: Sequence[Path] = ()) -> CheckReport:
    """Compare any two schema directories (``worknode schema check OLD NEW``), both
    directions of the wire; ``imports`` are extra import paths (``-I``) for both.

    The findings' pair reads ``old → new`` with the directories' names (their paths when the
    names are equal). Raises :class:`SchemaLoadError` when either is not a directory with
    ``*.capnp`` files.
    """
    _require_schemas(old)
    _require_schemas(new)
    a, b = (old.name, new.name) if old.name != new.name and old.name and new.name else (
        str(old), str(new))
    return _run([(a, old), (b, new)], imports)
