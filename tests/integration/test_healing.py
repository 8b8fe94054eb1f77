"""The healer over a real nats-server: lost deltas are repaired by the healer alone, the
report is signed and published, and forged repairs are refused."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from broker.codec import REPORT_DOMAIN, Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.errors import StatusCode
from broker.healing import HealClient
from broker.repair import key_digests
from broker.replica import Consistency
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    RequestSigner,
    ServiceCallError,
    call,
    heal_subject,
    merkle_subject,
)
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.integration._nodes import run_cli

SUBJECT = "orders"


def _setup(
    tmp: Path, url: str, names: list[str]
) -> tuple[list[WorknodeSettings], HealerSettings, TrustRoster]:
    secret = tmp / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    nodes = [
        WorknodeSettings(node_id=n, subjects=[SUBJECT], nats_urls=[url], state_dir=tmp / n,
                         metrics_port=None, store_sync="normal", cluster_secret_file=secret)
        for n in names
    ]
    healer = HealerSettings(nats_urls=[url], state_dir=tmp / "healer", cluster_secret_file=secret,
                            subjects=[SUBJECT], metrics_port=None, interval_s=3600)
    roster = TrustRoster({s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key
                          for s in nodes})
    roster.add("healer", load_or_create_signer("healer", healer.key_path()).public_key)
    return nodes, healer, roster


@pytest.mark.parametrize(
    ("wire", "pinned"),
    [
        pytest.param({}, False, id="cut-values-and-item-digests"),
        pytest.param({"hash_bytes": 32, "item_bytes": 0}, False, id="whole-values-and-keys"),
        # A node pinned to wire v1 for its deltas (first nodes of an upgrade) still speaks
        # the current healer protocol: it is healed like the others.
        pytest.param({}, True, id="one-node-pinned-to-wire-v1"),
    ],
)
async def test_lost_deltas_are_repaired_by_the_healer_alone(
    tmp_path: Path, nats_server: EmbeddedNatsServer, wire: dict[str, int], pinned: bool
) -> None:
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b", "c"])
    hs = hs.model_copy(update=wire)
    if pinned:
        nodes[0] = nodes[0].model_copy(update={"wire_version": 1})
    svcs = [WorknodeService(s, roster=roster) for s in nodes]
    reports: list[Msg] = []
    try:
        for svc in svcs:
            await svc.start()
        ra, rb, rc = (s.replica(SUBJECT) for s in svcs)
        for r in (ra, rb, rc):
            # The healer alone: an idle announce (1 s after a replica's last publish) would
            # let catch-up carry part of the difference first on a slow machine.
            r.machine.config = dataclasses.replace(r.machine.config, idle_announce=3600.0)
        # LOCAL writes are never published: exactly like deltas lost on the way.
        for i in range(120):
            await ra.write(lambda t, r, ts, i=i: t.state.assign(r, (f"a{i}", "v"), i, ts),
                           Consistency.LOCAL)
        for i in range(80):
            await rb.write(lambda t, r, ts, i=i: t.state.increment(r, (f"b{i}", "n"), i),
                           Consistency.LOCAL)
        await rb.write(lambda t, r, ts: t.state.remove(("nothing",)), Consistency.LOCAL)
        await rc.write(lambda t, r, ts: t.state.add(r, ("shared", "tags"), "c"))
        await rc.write(lambda t, r, ts: t.state.assign(r, ("gone", "v"), 1, ts))
        await rc.flush()
        for _ in range(100):
            if all("gone" in r.state for r in (ra, rb)):
                break
            await asyncio.sleep(0.02)
        # a removal seen by one replica only: the healer must carry it, not undo it
        await ra.write(lambda t, r, ts: t.state.remove(("gone",)), Consistency.LOCAL)
        assert len({tuple(sorted(key_digests(r.state).items())) for r in (ra, rb, rc)}) == 3

        async with NatsTransport([nats_server.url], name="listener") as listener:
            async def on_report(msg: Msg) -> None:
                reports.append(msg)

            await listener.subscribe(heal_subject("default", SUBJECT), on_report)
            healer = HealerService(hs, roster=roster)
            async with healer:
                outcomes = await healer.heal_all()
                await listener.flush()
                for _ in range(50):
                    if reports:
                        break
                    await asyncio.sleep(0.05)
        (last,) = outcomes
        assert last.converged
        # The heal that did the work: this call's, or the loop's first heal, which may find
        # the replicas first (discovery ends as soon as they have answered).
        out = next(o for o in healer.reports if o.rounds)
        assert out.converged
        assert out.divergent_keys >= 120 + 80
        assert out.rounds <= hs.max_rounds
        assert out.round_trips <= 200  # chunked, parallel calls; see README
        states = [key_digests(r.state) for r in (ra, rb, rc)]
        assert states[0] == states[1] == states[2]
        assert len(states[0]) == 120 + 80 + 1
        assert rb.state.value()["a7"] == {"v": 7}
        assert all("gone" not in r.state for r in (ra, rb, rc))
        # The signed report says so.
        assert reports
        codec = WireCodec()
        signed = codec.schema.envelope.SignedEnvelope.from_bytes_packed(reports[-1].data)
        roster.verify(str(signed.signer), bytes(signed.body), bytes(signed.signature),
                      REPORT_DOMAIN)
        report = codec.schema.healer.HealReport.from_bytes_packed(bytes(signed.body))
        assert report.converged
        assert report.keysRepaired >= 200
        assert len(set(report.rootsAfter)) == 1
        assert len(set(report.rootsBefore)) == 3
        # Repairs were logged: a restart keeps them.
        await svcs[1].stop()
        again = WorknodeService(nodes[1], roster=roster)
        async with again:
            assert key_digests(again.replica(SUBJECT).state) == states[0]
    finally:
        for svc in svcs:
            await svc.stop()


async def test_repairs_signed_by_strangers_are_refused(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    nodes, _, roster = _setup(tmp_path, nats_server.url, ["a"])
    svc = WorknodeService(nodes[0], roster=roster)
    async with svc, NatsTransport([nats_server.url], name="mallory") as t:
        mallory = Signer("mallory", b"m" * 32)
        a_key = load_or_create_signer("a", nodes[0].key_path()).public_key
        client = HealClient(t, namespace="default", codec=WireCodec(), signer=mallory,
                            roster=TrustRoster({"a": a_key}))
        forged = ORMap().assign("mallory", ("evil",), 1, 1)
        forged.is_delta = True
        with pytest.raises(ServiceCallError) as err:
            await client.apply(SUBJECT, "a", forged)
        assert err.value.code is StatusCode.UNAUTHENTICATED  # a bad signature
        assert "evil" not in svc.replica(SUBJECT).state


async def test_signed_envelopes_cannot_be_replayed_for_another_purpose(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A node's announce probe (its whole context, no entries) replayed at a repair
    endpoint would make the target drop that node's writes forever: it is refused."""
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "x"])
    a, x = (WorknodeService(s, roster=roster) for s in nodes)
    # Sent by the healer itself (the request is signed by a healer identity): the envelope
    # inside is what must be refused.
    healer = RequestSigner(load_or_create_signer("healer", hs.key_path()), roster)
    async with a, x, NatsTransport([nats_server.url], name="outsider") as t:
        rx = x.replica(SUBJECT)
        for i in range(3):
            await rx.write(lambda tr, r, ts, i=i: tr.state.assign(r, (f"k{i}", "v"), i, ts),
                           Consistency.LOCAL)
        probe = rx._context_envelope()  # what x broadcasts on wn.default.sync.orders
        with pytest.raises(ServiceCallError) as err:
            await call(t, merkle_subject("default", SUBJECT, "a", "apply"), probe, timeout=5,
                       signer=healer, signers=["a"])
        assert err.value.code is StatusCode.UNAUTHENTICATED  # a bad signature
        assert "replayed" in err.value.description
        assert a.replica(SUBJECT).state.context.size() == 0  # a claims none of x's dots


async def test_the_loop_keeps_a_replica_that_always_answers_late(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Membership polls end ``discover_idle_s`` after the last answer, but only once as many
    replicas answered as last time: a replica that always answers later than the others
    stays a member (no heal at every poll), and a new one is healed at once."""
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b"])
    hs = hs.model_copy(update={"membership_poll_s": 0.05, "discover_idle_s": 0.05,
                               "discover_timeout_s": 1.0})
    svcs = [WorknodeService(s, roster=roster) for s in nodes]

    async def slow_info(msg: Msg) -> None:
        await asyncio.sleep(0.3)  # much later than the idle pause after the others
        doc = {"name": "worknode-replica", "id": "slow-1", "version": "1.0.0",
               "metadata": {"namespace": "default", "node": "slow", "subjects": ""}}
        await peer.respond(msg, json.dumps(doc).encode())

    try:
        for svc in svcs:
            await svc.start()
        async with NatsTransport([nats_server.url], name="slow") as peer:
            await peer.subscribe("$SRV.INFO.worknode-replica", slow_info)
            await peer.flush()
            async with HealerService(hs, roster=roster) as healer:
                for _ in range(100):  # the first heal waits the whole timeout: all 3 found
                    if healer.reports:
                        break
                    await asyncio.sleep(0.05)
                assert {m[0] for m in healer._membership} == {"a", "b", "slow"}
                await asyncio.sleep(1.5)  # several polls
                assert len(healer.reports) == 1, "membership flapped: the late replica was lost"
                assert {m[0] for m in healer._membership} == {"a", "b", "slow"}
                # A new replica is healed at the next poll, without waiting for the interval.
                newcomer = WorknodeService(
                    nodes[0].model_copy(update={"node_id": "c", "state_dir": tmp_path / "c"}),
                    roster=roster,
                )
                roster.add("c", load_or_create_signer("c", newcomer.settings.key_path())
                           .public_key)
                svcs.append(newcomer)
                await newcomer.start()
                for _ in range(100):
                    if len(healer.reports) > 1:
                        break
                    await asyncio.sleep(0.05)
                assert healer.reports[-1].replicas == ["a", "b", "c"]
    finally:
        for svc in svcs:
            await svc.stop()


async def test_an_unexpected_error_is_counted_and_the_loop_heals_on(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one heal (or in discovery) is logged with its traceback and counted; the
    healer retries after ``retry_s`` instead of dying silently."""
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b"])
    hs = hs.model_copy(update={"membership_poll_s": 0.05, "retry_s": 0.1})
    svcs = [WorknodeService(s, roster=roster) for s in nodes]
    try:
        for svc in svcs:
            await svc.start()
        await svcs[0].replica(SUBJECT).write(
            lambda t, r, ts: t.state.assign(r, ("k", "v"), 1, ts), Consistency.LOCAL
        )
        healer = HealerService(hs, roster=roster)
        real_heal, real_discover = healer._heal_subject, healer._discover
        faults = {"heal": 1, "discover": 1}

        async def flaky_heal(subject: str, names: list[str]) -> Any:
            if faults["heal"]:
                faults["heal"] -= 1
                raise RuntimeError("bug in a heal")
            return await real_heal(subject, names)

        async def flaky_discover(*args: Any, **kw: Any) -> Any:
            if faults["discover"]:
                faults["discover"] -= 1
                raise KeyError("bug in discovery")
            return await real_discover(*args, **kw)

        healer._heal_subject = flaky_heal  # type: ignore[method-assign]
        healer._discover = flaky_discover  # type: ignore[method-assign]
        async with healer:
            for _ in range(200):
                if any(o.converged and o.rounds for o in healer.reports):
                    break
                await asyncio.sleep(0.02)
            assert any(o.converged and o.rounds for o in healer.reports)
            m = healer.metrics
            assert m.loop_errors._value.get() == 1
            assert m.failures.labels(SUBJECT)._value.get() == 1
            assert m.heals.labels(SUBJECT, "failed")._value.get() == 1
        assert "bug in a heal" in caplog.text
        assert "bug in discovery" in caplog.text
        assert "k" in svcs[1].replica(SUBJECT).state
    finally:
        for svc in svcs:
            await svc.stop()


async def test_trees_follow_writes_in_the_background(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Without any healer request, a replica's Merkle tree is built after start and follows
    its writes in chunks; it then equals a tree built from scratch."""
    from broker.healing import REFRESH_CHUNK
    from broker.merkle import MerkleTree
    from broker.repair import item_digest

    nodes, _, roster = _setup(tmp_path, nats_server.url, ["a"])
    async with WorknodeService(nodes[0], roster=roster) as svc:
        assert svc.heal_endpoints is not None
        tree = svc.heal_endpoints.trees[SUBJECT]
        replica = svc.replica(SUBJECT)
        n = 3 * REFRESH_CHUNK + 7
        for i in range(0, n, 100):
            await replica.write_many([
                lambda t, r, ts, k=f"k{j}": t.state.assign(r, (k, "v"), 1, ts)
                for j in range(i, min(n, i + 100))
            ])
        await replica.flush()
        for _ in range(300):
            if tree._dirty == set() and tree.tree.count() == n:
                break
            await asyncio.sleep(0.02)
        assert tree._dirty == set(), "the background refresh did not catch up"
        assert tree.background_keys >= n
        secret = nodes[0].cluster_secret_file.read_bytes()
        store = replica.state.store or {}
        fresh = MerkleTree.build(
            [(k, item_digest(k, v, secret)) for k, v in store.items()], key=secret
        )
        assert tree.tree.root() == fresh.root()
    assert tree._handle is None  # stopped with the node: nothing left scheduled


async def test_healer_once_from_the_command_line(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """``worknode healer --once`` heals, prints one line per subject and exits 0."""

    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b"])
    roster_file = tmp_path / "roster.json"
    keys = {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key.hex()
            for s in nodes}
    keys["healer"] = load_or_create_signer("healer", hs.key_path()).public_key.hex()
    roster_file.write_text(json.dumps(keys))
    config = tmp_path / "healer.toml"
    config.write_text(
        f'nats_urls = ["{nats_server.url}"]\nstate_dir = "{hs.state_dir}"\n'
        f'cluster_secret_file = "{hs.cluster_secret_file}"\nroster_file = "{roster_file}"\n'
        'metrics_port = 0\n'
    )
    svcs = [WorknodeService(s, roster=roster) for s in nodes]
    try:
        for svc in svcs:
            await svc.start()
        await svcs[0].replica(SUBJECT).write(
            lambda t, r, ts: t.state.assign(r, ("once", "v"), 1, ts), Consistency.LOCAL
        )
        rc, out, err = await run_cli("healer", "--once", "--config", str(config))
        assert rc == 0, err
        assert f"{SUBJECT}: 2 replicas" in out
        assert "converged" in out
        assert "once" in svcs[1].replica(SUBJECT).state
    finally:
        for svc in svcs:
            await svc.stop()


async def test_a_v1_node_and_a_v3_node_with_a_flag_converge_in_one_heal(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Issue 13, bug 3: a node pinned to wire v1 keeps a v3 node's enable-wins flag as an
    opaque store. One heal makes the replicas agree, the next finds nothing to do, and
    neither loses a value: the v1 node's other keys are untouched and the v3 node still
    holds its flag."""
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b"])
    nodes[0] = nodes[0].model_copy(update={"wire_version": 1})
    svcs = [WorknodeService(s, roster=roster) for s in nodes]
    try:
        for svc in svcs:
            await svc.start()
        old, new = (s.replica(SUBJECT) for s in svcs)
        for i in range(5):
            await old.write(lambda t, r, ts, i=i: t.state.assign(r, (f"o{i}", "v"), i, ts))
        await new.write(lambda t, r, ts: t.state.enable(r, ("feature", "dark-mode")))
        await new.write(lambda t, r, ts: t.state.assign(r, ("feature", "owner"), "b", ts))
        # a write the v1 node lacks (lost on the way): the heal must carry it
        await new.write(lambda t, r, ts: t.state.assign(r, ("lost", "v"), 7, ts),
                        Consistency.LOCAL)
        for r in (old, new):
            await r.flush()
        for _ in range(200):
            if "feature" in old.state and all(f"o{i}" in new.state for i in range(5)):
                break
            await asyncio.sleep(0.02)
        assert "feature" in old.state, "the v1 node never received the v3 node's flag"
        old_values = {f"o{i}": old.state.value()[f"o{i}"] for i in range(5)}
        assert new.state.value()["feature"]["dark-mode"] is True

        async with HealerService(hs, roster=roster) as healer:
            await healer.heal_subject(SUBJECT, ["a", "b"])
            second = await healer.heal_subject(SUBJECT, ["a", "b"])
        # The heal that did the work: this test's first, or the loop's first heal, which
        # may find the replicas before it (heals of one healer never overlap).
        worked = [o for o in healer.reports if o.rounds]
        assert len(worked) == 1, [
            f"{o.divergent_keys} keys differed, {o.keys_repaired} repaired, {o.rounds} rounds,"
            f" {'converged' if o.converged else 'NOT converged'}" for o in worked
        ]
        (first,) = worked
        assert first.converged
        assert first.rounds == 1
        # The runbook's promise: the next heal finds no divergence.
        assert second.converged
        assert second.rounds == 0
        assert second.keys_repaired == 0
        # Values: the heal carried the lost write, kept the flag, left the rest alone.
        assert old.state.value()["lost"] == {"v": 7}
        assert new.state.value()["feature"] == {"dark-mode": True, "owner": "b"}
        assert {k: old.state.value()[k] for k in old_values} == old_values
        assert {k: new.state.value()[k] for k in old_values} == old_values
        assert old.state.value()["feature"]["owner"] == "b"
    finally:
        for svc in svcs:
            await svc.stop()
