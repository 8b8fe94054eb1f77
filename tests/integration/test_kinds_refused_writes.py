"""Typed writes refused through a real replica (real nats-server, SQLite store): nothing
of a refused write is committed, in memory or on disk.

A write whose values fail validation never reaches ``write_many``; a write whose counter
total would leave the 64-bit range fails inside it, at its first write (the kind's guard),
so the register written beside the counter is not committed alone either: the replica's
digest is unchanged, and a restarted node (its state reloaded from SQLite) holds only what
was written before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.kinds import LWW, Counter, KindModel, KindValidationError, KindView
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, node_settings, roster_of


class Meter(KindModel, kind="meter", version=1):
    label: LWW[str] = ""
    total: Counter = 0


async def test_a_refused_typed_write_commits_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    settings = node_settings(tmp_path, nats_server.url, "node-a", subjects=[SUBJECT])
    roster = roster_of([settings])
    view = KindView(Meter)
    async with WorknodeService(settings, roster=roster) as node:
        replica = node.replica(SUBJECT)
        await replica.write_many(view.create_ops("m1", label="kept", total=2**63 - 1))
        await replica.flush()
        before = replica.content_digest()
        with pytest.raises(KindValidationError):
            await replica.write_many(view.ops("m1", label=None))
        with pytest.raises(KindValidationError) as info:
            await replica.write_many(view.ops("m1", label="lost", total=1))
        assert info.value.field == "total"
        await replica.flush()
        assert replica.content_digest() == before
    async with WorknodeService(settings, roster=roster) as node:  # reloaded from SQLite
        replica = node.replica(SUBJECT)
        assert replica.content_digest() == before
        assert view.read(replica.tree, "m1") == Meter(label="kept", total=2**63 - 1)
