"""The worknode service's durable store: ``broker.store.DurableStore`` that counts its
failures.

Every ``StoreError`` a store call raises is counted in ``worknode_store_errors_total
{operation}`` and logged once per operation and minute, whoever catches it afterwards (the
replica's committer turns a failed append into refused writes, a failed progress save is only
logged there, a failed snapshot is retried): the store is the one place that sees them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import StoreError
from broker.store import BytesLike, DurableStore, Loaded
from services.worknode._logging import event

__all__ = ["ObservedStore"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_LOG_EVERY_S = 60.0


class ObservedStore(DurableStore):
    """A ``DurableStore`` calling ``on_error(operation, exc)`` for every ``StoreError``."""

    def __init__(
        self, path: Path, *, on_error: Callable[[str, StoreError], None], **kw: Any
    ) -> None:
        super().__init__(path, **kw)
        self._on_error = on_error
        self._logged: dict[str, float] = {}

    def _observe(self, operation: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except StoreError as exc:
            self._on_error(operation, exc)
            now = time.monotonic()
            if now - self._logged.get(operation, -_LOG_EVERY_S) >= _LOG_EVERY_S:
                self._logged[operation] = now
                log.error(event("store_error", operation=operation, path=self.path,
                                error=exc))
            raise

    def open(self) -> None:
        """``DurableStore.open``, counted."""
        self._observe("open", super().open)

    def append(
        self, subject: str, records: Sequence[BytesLike], *, received: Collection[int] = ()
    ) -> int:
        """``DurableStore.append``, counted."""
        return self._observe(
            "append",
            lambda: super(ObservedStore, self).append(subject, records, received=received),
        )

    def load(self, subject: str) -> Loaded:
        """``DurableStore.load``, counted."""
        return self._observe("load", lambda: super(ObservedStore, self).load(subject))

    def write_snapshot(self, subject: str, state: BytesLike, upto_seq: int) -> None:
        """``DurableStore.write_snapshot``, counted."""
        self._observe("write_snapshot",
                      lambda: super(ObservedStore, self).write_snapshot(subject, state, upto_seq))

    def get_meta(self, subject: str | None, key: str) -> bytes | None:
        """``DurableStore.get_meta``, counted."""
        return self._observe("get_meta", lambda: super(ObservedStore, self).get_meta(subject, key))

    def set_meta(self, subject: str | None, key: str, value: BytesLike | None) -> None:
        """``DurableStore.set_meta``, counted."""
        self._observe("set_meta",
                      lambda: super(ObservedStore, self).set_meta(subject, key, value))
