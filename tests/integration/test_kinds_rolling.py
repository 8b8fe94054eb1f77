"""A rolling upgrade of a kind across three worknodes (real nats-server, real services and
SQLite stores), with writes throughout: nothing is lost.

Three nodes serve ``orders`` and the registry subject ``kinds``; each runs a service on
``order`` v1. Version 2 (``total`` renamed ``amount``, ``note`` added with a default) is
registered through the gate; then one node at a time is stopped (the others keep writing)
and restarted on v2, whose model it builds from the registry's stored schema (it was not
built with it). Every round each running node writes through its own version: one to a
shared counter, a fresh tag, and its own register. At the end the replicas converge, and
v1 and v2 readers each see every write in their own shape: the counter equals the number of
writes, every tag is there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.kinds import (
    LWW,
    AddField,
    Counter,
    KindModel,
    KindSchema,
    KindView,
    ORSet,
    Registry,
    RenameField,
)
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, eventually, node_settings, roster_of

REGISTRY = "kinds"
NODES = ("node-a", "node-b", "node-c")


class OrderV1(KindModel, kind="order", version=1):
    total: Counter = 0
    tags: ORSet[str] = frozenset()
    owner: LWW[str] = ""


class OrderV2(KindModel, kind="order", version=2,
              lens=[RenameField(("total",), "amount"), AddField(("note",), "")]):
    amount: Counter = 0
    tags: ORSet[str] = frozenset()
    owner: LWW[str] = ""
    note: LWW[str] = ""


async def test_a_rolling_upgrade_with_writes_throughout_loses_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    settings = {n: node_settings(tmp_path, nats_server.url, n, subjects=[SUBJECT, REGISTRY])
                for n in NODES}
    roster = roster_of(list(settings.values()))
    services: dict[str, WorknodeService] = {}
    views: dict[str, KindView] = {}
    written_tags: set[str] = set()
    writes = 0

    async def start(name: str, upgraded: bool) -> None:
        svc = WorknodeService(settings[name], roster=roster)
        await svc.start()
        services[name] = svc
        registry = Registry.from_tree(svc.replica(REGISTRY).tree)
        # v1 services are built with OrderV1; upgraded ones load v2 from the registry alone
        views[name] = registry.view("order", 2) if upgraded else registry.view_for(OrderV1)

    async def round_of_writes(step: int) -> None:
        nonlocal writes

        async def one(name: str) -> None:
            nonlocal writes
            view = views[name]
            counter = "amount" if view.info.version == 2 else "total"
            tag = f"{name}-{step}"
            await services[name].replica(SUBJECT).write_many(
                view.ops("o1", **{counter: 1, "tags": {tag}, "owner": name}))
            written_tags.add(tag)
            writes += 1

        await asyncio.gather(*(one(n) for n in sorted(services)))

    try:
        # node-a registers v1 and creates the worknode; the others start after it
        first = WorknodeService(settings["node-a"], roster=roster)
        await first.start()
        services["node-a"] = first
        kinds = first.replica(REGISTRY)
        await kinds.write_many(Registry.from_tree(kinds.tree).register_ops(
            KindSchema.of_model(OrderV1)))
        views["node-a"] = KindView(OrderV1)
        await first.replica(SUBJECT).write_many(views["node-a"].create_ops("o1"))
        await kinds.flush()
        await first.replica(SUBJECT).flush()
        for name in NODES[1:]:
            await start(name, upgraded=False)
        await eventually(lambda: all("o1" in s.replica(SUBJECT).tree
                                     for s in services.values()), 30, "o1 everywhere")
        step = 0
        for _ in range(3):
            step += 1
            await round_of_writes(step)

        # register v2 through the gate (on node-b: the registry replicates like any subject)
        kinds_b = services["node-b"].replica(REGISTRY)
        await eventually(lambda: "order" in Registry.from_tree(kinds_b.tree).schemas, 30,
                         "v1 registered everywhere")
        await kinds_b.write_many(Registry.from_tree(kinds_b.tree).register_ops(
            KindSchema.of_model(OrderV2)))
        await kinds_b.flush()
        await eventually(lambda: all(
            2 in Registry.from_tree(s.replica(REGISTRY).tree).schemas.get("order", {})
            for s in services.values()), 30, "v2 registered everywhere")

        for name in NODES:  # the rolling upgrade
            await services.pop(name).stop()
            views.pop(name)
            for _ in range(2):  # the others keep writing while it is down
                step += 1
                await round_of_writes(step)
            await start(name, upgraded=True)
            step += 1
            await round_of_writes(step)
        for svc in services.values():
            await svc.replica(SUBJECT).flush()

        replicas = [s.replica(SUBJECT) for s in services.values()]
        await eventually(lambda: len({r.content_digest() for r in replicas}) == 1, 60,
                         "the replicas converge")
        tree = replicas[0].tree
        v2 = views["node-a"].read(tree, "o1")
        v1 = KindView(OrderV1).read(tree, "o1")  # a v1 reader of the same state
        assert v2.amount == v1.total == writes  # type: ignore[attr-defined]
        assert v2.tags == v1.tags == written_tags  # type: ignore[attr-defined]
        assert v2.note == ""  # type: ignore[attr-defined]
        assert type(v2).__name__ == "OrderV2"  # built from the registry's schema
        assert writes == 3 * 3 + 3 * (2 * 2 + 3)
    finally:
        for svc in services.values():
            await svc.stop()
