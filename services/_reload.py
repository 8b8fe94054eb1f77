"""Key files reloaded without a restart: the trust roster and the RPC keyring.

A ``KeyFileWatch`` polls its file's (mtime, size, inode) every ``interval_s`` seconds and
reloads it when any of them changed (a file replaced by rename, as every worknode tool writes
it, gets a new inode); SIGHUP reloads every watched file of the process at once (for an
immediate removal). A reload reads and validates the whole file first and then swaps it, in
one step, into the SAME object every replica and endpoint holds (``TrustRoster.replace``,
``TokenVerifier.set_keyring``), so all of them see the new keys together; an invalid file is
refused with one error line and ``worknode_key_reloads_total{result="failed"}``, and the
keys in force stay. Polling, not inotify: no new dependency, and it works on every file
system a container mounts.

The roster's overlap windows are not checked here: ``TrustRoster`` takes the wall clock
(``now``) from the service and checks a previous key's ``previous_until`` on every verify, so
an old key stops verifying the moment its window ends, reload or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.codec import RosterEntry, TrustRoster
from broker.errors import InvalidArgumentError

__all__ = ["RELOAD_RESULTS", "KeyFileWatch", "TrustMetrics", "on_sighup", "roster_watch"]

log = logging.getLogger(__name__)

RELOAD_RESULTS = ("ok", "failed")
KEY_FILES = ("roster", "rpc_keyring")

_Signature = tuple[int, int, int] | None


def _signature(path: Path) -> _Signature:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TrustMetrics:
    """The key-file series of one service's registry: reloads by file and result, whether
    the file on disk was refused, roster size, roster keys inside an overlap window, keyring
    size."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "worknode_key_reloads_total",
            "Reloads of a key file (roster, rpc_keyring), by result: failed = the file was "
            "invalid and the keys in force were kept.",
            ["file", "result"], registry=registry)
        for f in KEY_FILES:
            for r in RELOAD_RESULTS:
                self.reloads.labels(f, r)
        self.refused = Gauge(
            "worknode_key_file_refused",
            "1 while the key file on disk is one the last reload refused (the keys in force "
            "are older than the file), by file.",
            ["file"], registry=registry)
        for f in KEY_FILES:
            self.refused.labels(f)
        self.roster_keys = Gauge(
            "worknode_roster_keys", "Identities the trust roster in force holds.",
            registry=registry)
        self.overlap_keys = Gauge(
            "worknode_roster_keys_in_overlap",
            "Roster identities whose previous key is still accepted (a rotation's window).",
            registry=registry)
        self.keyring_keys = Gauge(
            "worknode_rpc_keyring_keys", "RPC root public keys the keyring in force holds.",
            registry=registry)

    def watch_roster(self, roster: TrustRoster) -> None:
        """Export ``roster``'s size and overlap count, read at each scrape."""
        self.roster_keys.set_function(lambda: len(roster))
        self.overlap_keys.set_function(roster.in_overlap)


class KeyFileWatch:
    """Reload ``path`` with ``load`` when it changes (poll) or on SIGHUP (see module doc).

    ``load`` reads, validates and swaps, raising ``InvalidArgumentError`` (and changing
    nothing) for a file it refuses. ``what`` names the file in logs and metrics."""

    def __init__(self, path: Path, load: Callable[[], None], *, what: str, owner: str,
                 metrics: TrustMetrics | None, interval_s: float) -> None:
        self.path = path
        self.what = what
        self.owner = owner
        self.interval_s = interval_s
        self._load = load
        self._metrics = metrics
        self._seen = _signature(path)  # the file the service just loaded at start
        self._task: asyncio.Task[None] | None = None
        self._unhook: Callable[[], None] | None = None
        self.reloads = 0
        self.failures = 0

    def start(self) -> None:
        """Start polling (unless ``interval_s`` is 0) and listen for SIGHUP."""
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._poll(), name=f"watch {self.what}")
        if self._unhook is None:
            self._unhook = on_sighup(self.reload)

    async def stop(self) -> None:
        """Stop polling and listening (idempotent)."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self) -> bool | None:
        """Reload if the file changed since it was last read; the reload's result, or None
        when it had not changed."""
        if _signature(self.path) == self._seen:
            return None
        return self.reload()

    def reload(self) -> bool:
        """Read, validate and swap the file now; False (logged, counted) if it was refused
        and the keys in force were kept."""
        self._seen = _signature(self.path)  # a refused file is not retried until it changes
        try:
            self._load()
        except InvalidArgumentError as exc:
            self.failures += 1
            if self._metrics is not None:
                self._metrics.reloads.labels(self.what, "failed").inc()
                self._metrics.refused.labels(self.what).set(1)
            log.error("%s: %s reload refused, the keys in force are kept: %s",
                      self.owner, self.what, exc)
            return False
        self.reloads += 1
        if self._metrics is not None:
            self._metrics.reloads.labels(self.what, "ok").inc()
            self._metrics.refused.labels(self.what).set(0)
        log.info("%s: %s reloaded from %s", self.owner, self.what, self.path)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()


_hooks: dict[int, Callable[[], object]] = {}
_next_hook = 0
_handler_loop: asyncio.AbstractEventLoop | None = None


def _on_signal() -> None:
    for hook in list(_hooks.values()):
        hook()


def on_sighup(hook: Callable[[], object]) -> Callable[[], None]:
    """Call ``hook`` on SIGHUP (every hook of the process, in the running loop); returns the
    function that unregisters it. Several services in one process (``worknode up``, tests)
    share the one handler. Where the loop cannot handle signals (not the main thread) the
    file watch alone reloads."""
    global _next_hook, _handler_loop
    loop = asyncio.get_running_loop()
    if _handler_loop is not loop:  # the first hook, or a new loop (the old one is gone)
        try:
            loop.add_signal_handler(signal.SIGHUP, _on_signal)
        except (RuntimeError, NotImplementedError, ValueError):
            log.debug("SIGHUP cannot be handled here (pid %d): file watch only", os.getpid())
            return lambda: None
        _handler_loop = loop
    _next_hook += 1
    key = _next_hook
    _hooks[key] = hook

    def unhook() -> None:
        global _handler_loop
        if _hooks.pop(key, None) is not None and not _hooks and _handler_loop is loop:
            # Back to SIGHUP's default action once no service listens.
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            _handler_loop = None

    return unhook


def roster_watch(roster: TrustRoster, roster_file: Path, own_id: str, own_key: bytes, *,
                 read: Callable[[Path], dict[str, RosterEntry]], role: str,
                 metrics: TrustMetrics | None, interval_s: float) -> KeyFileWatch:
    """A watch that makes ``roster`` exactly the entries ``read`` finds in the file plus this
    process's own identity (its own key, as the file's role for it or ``role``), like
    ``load_identity`` at start."""

    def load() -> None:
        entries = read(roster_file)
        own = entries.get(own_id)
        entries[own_id] = RosterEntry(own_key, own.role if own is not None else role)
        roster.replace(entries)

    return KeyFileWatch(roster_file, load, what="roster", owner=own_id, metrics=metrics,
                        interval_s=interval_s)
