"""A worknode's start against a real nats-server: the first catch-ups of its subjects run
together.

Each replica's start ends with its first catch-up, which a node alone (no peer answers) waits
out for the whole catch-up timeout. Started one after the other, a lone node hosting N
subjects (with RPC, the revocation subject is one more) took N timeouts to start; the test
suite paid it on every node that started first. The check is not timed: it records how many
first catch-up requests were in flight at once (one at a time before the change).
"""

from __future__ import annotations

from typing import Any

from broker.transport import EmbeddedNatsServer, NatsTransport, sync_subject
from services.worknode import WorknodeService
from tests.integration._nodes import node_settings

SUBJECTS = ["orders", "payments", "stock"]


class CountingTransport(NatsTransport):
    """Records the most first catch-up requests (each subject's first ``request_many`` on
    its sync subject; a failed one is retried in the background) in flight at once."""

    def __init__(self, urls: list[str], **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.in_flight = 0
        self.most = 0
        self.asked: set[str] = set()

    async def request_many(self, subject: str, data: bytes, **kw: Any) -> Any:
        syncs = {sync_subject("default", s) for s in SUBJECTS}
        if subject not in syncs or subject in self.asked:
            return await super().request_many(subject, data, **kw)
        self.asked.add(subject)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await super().request_many(subject, data, **kw)
        finally:
            self.in_flight -= 1


async def test_a_lone_node_asks_for_every_subject_at_once(
    tmp_path: Any, nats_server: EmbeddedNatsServer
) -> None:
    settings = node_settings(tmp_path, nats_server.url, "a", subjects=SUBJECTS)
    transport = CountingTransport([nats_server.url], name="a")
    try:
        async with WorknodeService(settings, transport=transport) as svc:
            assert sorted(svc.replicas) == sorted(SUBJECTS)
            assert transport.asked == {sync_subject("default", s) for s in SUBJECTS}
            assert transport.most == len(SUBJECTS), transport.most
    finally:
        await transport.stop()
