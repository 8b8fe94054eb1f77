"""Replication over a real nats-server: convergence, subscribers, catch-up, restarts, bounds,
and the rolling-upgrade case (a v1-pinned node beside a current one)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.codec import CURRENT_VERSION
from broker.crdt import INT64_MAX, Increment, OpaqueValue
from broker.errors import (
    BackpressureError,
    InvalidArgumentError,
    InvalidSubjectError,
    PayloadTooLargeError,
    ValueTooLargeError,
)
from broker.replica import Consistency, Replica
from broker.transport import EmbeddedNatsServer, delta_subject
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings, roster_of, running_nodes

REPO = Path(__file__).resolve().parents[2]




_nodes = running_nodes  # started in order, stopped on exit


async def _converged(replicas: Sequence[Replica], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in replicas:
            await r.flush()
        if len({r.digest() for r in replicas}) == 1:
            return
        await asyncio.sleep(0.05)
    values = {r.node_id: r.state.value() for r in replicas}
    raise AssertionError(f"replicas did not converge: {values}")


async def test_three_replicas_converge_under_concurrent_writers(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a", "b", "c"]) as svcs:
        reps = [s.replica(SUBJECT) for s in svcs]
        await reps[0].create("shop")
        await _converged(reps)

        async def writer(r: Replica, k: int) -> None:
            for i in range(150):
                await r.set("shop", (f"item{i % 20}",), f"{r.node_id}-{i}")
                await r.increment("shop", ("orders",), 1)
                if i % 10 == 0:
                    await r.add("shop", ("writers",), r.node_id)

        await asyncio.gather(*(writer(r, k) for k, r in enumerate(reps)))
        await _converged(reps)
        fields = reps[0].tree.fields("shop")
        assert fields["orders"] == 450
        assert fields["writers"] == frozenset({"a", "b", "c"})
        for r in reps:
            assert r.queued_ops == 0


async def test_subscribers_see_every_batch(tmp_path: Path, nats_server: EmbeddedNatsServer) -> None:
    batches = 6
    sub = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "examples" / "subscriber.py"),
            nats_server.url,
            "default",
            SUBJECT,
            "--count",
            str(batches),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "tail",
            SUBJECT,
            "--nats-url",
            nats_server.url,
            "--json",
            "--count",
            str(batches),
            "--timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert sub.stdout is not None
        assert json.loads(sub.stdout.readline()) == {"ready": True}
        await asyncio.sleep(1.0)  # tail has no ready line; give it time to subscribe
        async with _nodes(tmp_path, nats_server.url, ["w"]) as (svc,):
            r = svc.replica(SUBJECT)
            await r.create("n1")
            await r.flush()
            for i in range(batches - 1):
                await r.set("n1", ("v",), i)
                await r.flush()  # one batch per write
        out, err = sub.communicate(timeout=30)
        lines = [json.loads(x) for x in out.splitlines()]
        assert len(lines) == batches, err
        assert [x["sequence"] for x in lines] == list(range(1, batches + 1))
        last = lines[-1]["changes"]
        assert any(
            c["path"].endswith("fields.v") and c["items"][0]["value"] == batches - 2 for c in last
        )
        tout, terr = tail.communicate(timeout=30)
        tlines = [json.loads(x) for x in tout.splitlines()]
        assert len(tlines) == batches, terr
        assert all(x["writer"] == "w" and not x["verified"] for x in tlines)
    finally:
        for p in (sub, tail):
            if p.poll() is None:
                p.kill()
                p.wait()


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from broker.codec import CURRENT_VERSION, TrustRoster
    from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

    async def main():
        url, state = sys.argv[1], Path(sys.argv[2])
        s = WorknodeSettings(node_id="victim", subjects=["orders"], nats_urls=[url],
                             state_dir=state, metrics_port=None, store_sync="full")
        async with WorknodeService(s) as svc:
            r = svc.replica("orders")
            if "n" not in r.tree:
                await r.create("n")
            i = 0
            while True:
                await r.set("n", (f"k{i}",), i)
                print(i, flush=True)
                i += 1

    asyncio.run(main())
    """
)


async def test_kill_9_loses_no_acknowledged_write(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    state = tmp_path / "victim"
    acked: list[int] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, nats_server.url, str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        while len(acked) < 150:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            acked.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        # Whatever else it printed before dying was acknowledged too.
        rest, _ = proc.communicate(timeout=10)
        acked += [int(x) for x in rest.split()]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    victim = node_settings(tmp_path, nats_server.url, "victim", state_dir=state)
    peer = node_settings(tmp_path, nats_server.url, "peer")
    roster = roster_of([victim, peer])
    async with _nodes(tmp_path, nats_server.url, ["peer"], roster=roster) as (psvc,):
        svc = WorknodeService(victim, roster=roster)
        async with svc:
            fields = svc.replica(SUBJECT).tree.fields("n")
            missing = [i for i in acked if fields.get(f"k{i}") != i]
            assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:10]}"
            # and the restarted node republishes what it never published: the peer gets it all
            await _converged([svc.replica(SUBJECT), psvc.replica(SUBJECT)])


async def test_late_replica_fast_forwards(tmp_path: Path, nats_server: EmbeddedNatsServer) -> None:
    settings = [node_settings(tmp_path, nats_server.url, n) for n in ("a", "b", "late")]
    roster = roster_of(settings)
    async with _nodes(tmp_path, nats_server.url, ["a", "b"], roster=roster) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await ra.create("x")
        await _converged([ra, rb])
        for i in range(100):
            await (ra if i % 2 else rb).increment("x", ("n",), 1)
        await _converged([ra, rb])
        late = WorknodeService(settings[2], roster=roster)
        async with late:
            rl = late.replica(SUBJECT)
            # start() caught up: no new write needed
            assert rl.digest() == ra.digest()
            assert rl.tree.fields("x")["n"] == 100


async def test_server_restart_reconnects_and_converges(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await ra.create("x")
        await _converged([ra, rb])
        restart = asyncio.create_task(nats_server.restart())
        for i in range(60):  # keeps writing while the server goes away and comes back
            await (ra if i % 2 else rb).increment("x", ("n",), 1)
            await asyncio.sleep(0.01)
        await restart
        await _converged([ra, rb], timeout=30)
        assert ra.tree.fields("x")["n"] == 60


async def test_bounds_give_specific_errors(tmp_path: Path, nats_server: EmbeddedNatsServer) -> None:
    with pytest.raises(ValidationError, match="subject"):
        node_settings(tmp_path, nats_server.url, "a", subjects=["bad.subject"])
    with pytest.raises(InvalidSubjectError):
        delta_subject("default", "a b")
    async with _nodes(tmp_path, nats_server.url, ["a"], max_pending_ops=5) as (svc,):
        r = svc.replica(SUBJECT)
        await r.create("x")
        with pytest.raises(ValueTooLargeError):  # one value over MAX_VALUE_BYTES
            await r.set("x", ("big",), "v" * 300_000)
        assert "big" not in r.tree.fields("x")  # refused whole: nothing applied
        with pytest.raises(PayloadTooLargeError):  # more operations than one batch holds
            await r.write_many([lambda t, rid, ts: t.increment(rid, "x", ("n",), 1)] * 6000)
        assert "n" not in r.tree.fields("x")
        with pytest.raises(BackpressureError):
            await r.write_many([lambda t, rid, ts: t.increment(rid, "x", ("n",), 1)] * 6)
        await r.increment("x", ("n",), 1)  # below the bound: fine


async def test_increment_runs_commit_as_one_and_keep_per_write_semantics(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Runs of increments are applied as their sum; a bad write still stops the sequence
    exactly where it stands, and a run whose sum overflows is replayed write by write."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await ra.create("x")
        dots_before = ra.tree.state.context.version_vector["a"]
        await ra.write_many([Increment("x", ("n",), 1)] * 100)
        assert ra.tree.fields("x")["n"] == 100
        assert ra.tree.state.context.version_vector["a"] == dots_before + 1  # one dot
        one = Increment("x", ("n",), 1)
        with pytest.raises(InvalidArgumentError):
            await ra.write_many([one] * 3 + [Increment("x", ("n",), True)] + [one] * 2)
        assert ra.tree.fields("x")["n"] == 103  # the three before the bad write committed
        await ra.write_many([Increment("x", ("m",), INT64_MAX - 1)])
        with pytest.raises(ValueTooLargeError):
            await ra.write_many([Increment("x", ("m",), 1)] * 3)
        assert ra.tree.fields("x")["m"] == INT64_MAX  # the first of the run committed
        # Deltas handed back to writers stay as they were, though batches join them later.
        got = await asyncio.gather(*(ra.increment("x", ("c",), i) for i in range(1, 20)))
        local = await ra.write(Increment("x", ("c",), 5), Consistency.LOCAL)
        await ra.write(Increment("x", ("c",), 7), Consistency.LOCAL)
        await ra.sync()
        assert [d.store["x"]["fields"]["c"][2] for d in got] == list(
            itertools.accumulate(range(1, 20))
        )
        assert local.store["x"]["fields"]["c"][2] == 190 + 5
        await _converged([ra, rb])
        assert rb.tree.fields("x") == ra.tree.fields("x")
        assert rb.tree.fields("x")["c"] == 190 + 12


async def test_v1_pinned_node_and_current_node_converge_and_lose_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    old = node_settings(tmp_path, nats_server.url, "old", wire_version=1)
    new = node_settings(tmp_path, nats_server.url, "new", wire_version=2, peer_version=1)
    late = node_settings(tmp_path, nats_server.url, "late", wire_version=2)
    roster = roster_of([old, new, late])
    so, sn = WorknodeService(old, roster=roster), WorknodeService(new, roster=roster)
    async with so, sn:
        ro, rn = so.replica(SUBJECT), sn.replica(SUBJECT)
        await ro.create("doc")
        await _converged([ro, rn])
        await ro.set("doc", ("title",), "from v1")
        await rn.set("doc", ("body",), "from v2")
        # only v2 can express a flag: the v1 node keeps it opaque
        await rn.write(lambda t, r, ts: t.state.enable(r, ("doc", "fields", "beta")))
        await ro.increment("doc", ("edits",), 2)
        await rn.increment("doc", ("edits",), 3)
        for r in (ro, rn):
            await r.flush()
        deadline = time.monotonic() + 10
        # (digests differ across versions while a flag exists: wait on content instead)
        while ro.tree.fields("doc").get("edits") != 5 or "beta" not in ro.tree.fields("doc"):
            assert time.monotonic() < deadline, ro.tree.fields("doc")
            await asyncio.sleep(0.05)
        fo = ro.tree.fields("doc")
        assert fo["beta"] == OpaqueValue((6, 1))
        assert (fo["title"], fo["body"], fo["edits"]) == ("from v1", "from v2", 5)
    # The v2 node is gone; a new v2 node learns everything from the v1 node alone.
    so = WorknodeService(old, roster=roster)
    async with so:
        sl = WorknodeService(late, roster=roster)
        async with sl:
            fl = sl.replica(SUBJECT).tree.fields("doc")
            assert fl == {"title": "from v1", "body": "from v2", "edits": 5, "beta": True}


def test_worknode_up_is_the_main_job(tmp_path) -> None:
    """The README's first command: embedded server, three nodes, a writer, converged table;
    secure by default: TLS on client connections and routes, one nkey user per process."""
    state = tmp_path / "up"
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--writes", "600", "--state-dir",
         str(state)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "security: TLS on client connections and routes" in out.stdout
    assert "a client without credentials: refused\n" in out.stdout
    assert "NATS connection without" not in out.stderr  # no service found its bus open
    for conf in sorted(state.glob("cluster/n*/nats-server.conf")):
        text = conf.read_text()
        assert text.count("nkey:") == 4, conf  # three nodes and the healer, no one else
        assert "tls {" in text
        assert "verify: true" in text.split("cluster {", 1)[1]  # routes: mutual TLS
    assert (state / "tls" / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert "converged: all replicas hold identical digests" in out.stdout
    # ... then a STRONG conditional write wins once, the loser gets a conflict, twice:
    # create-if-absent, then a compare-and-set on the version both read.
    for conf in sorted(state.glob("cluster/n*/nats-server.conf")):
        assert 'sync_interval: "always"' in conf.read_text(), conf
    strong = [line.strip() for line in out.stdout.splitlines()
              if line.startswith(("  node-1 ", "  node-3 "))]
    assert len(strong) == 4, out.stdout
    for race in (strong[:2], strong[2:]):
        assert sum(": won (version " in line for line in race) == 1, race
        assert sum(": conflict: " in line for line in race) == 1, race
    assert "reads lock-leader (linearizable): owner node-" in out.stdout
    assert "STRONG: one winner per race, the losers told the version they lost to" in out.stdout
    # ... then splits the cluster, writes on both sides, and the healer repairs it.
    assert "heal report (signed" in out.stdout
    assert "healed: all replicas hold identical digests" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("node-") and "  " in line
            and "metrics" not in line]
    assert len(rows) == 9  # three tables: converged, partitioned, healed
    assert len({row.split()[-1] for row in rows[:3]}) == 1
    assert len({row.split()[-1] for row in rows[3:6]}) == 2
    assert len({row.split()[-1] for row in rows[6:]}) == 1


def test_worknode_up_insecure_says_so() -> None:
    """``--insecure`` is the only open mode, and it says so (a warning, then the line)."""
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--writes", "50", "--insecure"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--insecure: the embedded NATS servers run without authentication and TLS" in (
        out.stderr)
    assert "security: OFF (--insecure)" in out.stdout


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        lbl = series[len(name):].strip("{}")
        if series[len(name):len(name) + 1] not in ("{", "") or (
            want and not all(p in lbl.split(",") for p in want.split(","))
        ):
            continue
        total += float(value)
        found = True
    assert found, f"no series {name}{{{want}}}"
    return total


async def _scrape(url: str) -> str:
    import urllib.request

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    return await asyncio.to_thread(get)


async def test_metrics_count_writes_batches_and_rejections(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    from broker.codec import Signer, WireCodec
    from broker.crdt import ORMap
    from broker.transport import NatsTransport

    async with _nodes(tmp_path, nats_server.url, ["a", "b"], metrics_port=0) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await ra.create("x")
        for i in range(20):
            await ra.set("x", ("v",), i)
        await _converged([ra, rb])
        # Hostile traffic on the subject: garbage, and a validly signed envelope from a
        # stranger. Both are refused, counted, and the replicas keep working.
        stranger = Signer("mallory", b"m" * 32)
        forged = WireCodec().seal(
            stranger, subject=ra.delta_subject, hlc=1, sequence=1,
            document=ORMap().assign("mallory", ("x",), 1, 1),
        )
        async with NatsTransport([nats_server.url], name="hostile") as t:
            await t.publish(ra.delta_subject, b"\x00\x01garbage")
            await t.publish(ra.delta_subject, forged)
            await t.flush()
        await rb.set("x", ("after",), True)
        await _converged([ra, rb])
        a_text = await _scrape(svcs[0].metrics_url or "")
        b_text = await _scrape(svcs[1].metrics_url or "")
        assert _metric(a_text, "worknode_ops_committed_total", subject=SUBJECT) == 21
        assert _metric(a_text, "worknode_batches_published_total", subject=SUBJECT) >= 1
        assert _metric(b_text, "worknode_deltas_applied_total", subject=SUBJECT,
                       wire_version=str(CURRENT_VERSION)) >= 1
        for text in (a_text, b_text):
            assert _metric(text, "worknode_deltas_rejected_total", subject=SUBJECT,
                           reason="malformed") == 1
            assert _metric(text, "worknode_deltas_rejected_total", subject=SUBJECT,
                           reason="unknown_signer") == 1
        assert 'worknode_build_info{' in a_text
        assert rb.tree.fields("x")["after"] is True


async def test_restart_keeps_the_hybrid_clock_ahead_of_stored_writes(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """After a restart the clock resumes above every stored timestamp, even when the wall
    clock now reads earlier: a new write still wins over the old one."""
    from broker.crdt import hlc_physical

    settings = node_settings(tmp_path, nats_server.url, "a")
    roster = roster_of([settings])
    async with WorknodeService(settings, roster=roster) as svc:
        r = svc.replica(SUBJECT)
        await r.create("x")
        future_ms = r._now_ms() + 3_600_000  # a write stamped an hour ahead
        await r.write(lambda t, rid, ts: t.assign(rid, "x", ("v",), "old", future_ms << 16))
    async with WorknodeService(settings, roster=roster) as svc:
        r = svc.replica(SUBJECT)
        assert hlc_physical(r.clock.last) >= future_ms
        await r.set("x", ("v",), "new")
        assert r.tree.fields("x")["v"] == "new"


async def test_write_commands_drive_a_subject_by_hand(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The README's write commands, each a short-lived writer node that catches up first;
    each exits 0 once a node that trusts the writer holds the write."""
    worknode = Path(sys.executable).parent / "worknode"
    common = ["--nats-url", nats_server.url, "--namespace", "shop",
              "--state-dir", str(tmp_path / "cli")]
    settings = node_settings(tmp_path, nats_server.url, "node-a", namespace="shop")
    roster = roster_of([settings])
    roster.add("cli", load_or_create_signer("cli", tmp_path / "cli" / "cli.key").public_key)
    outputs = []
    async with WorknodeService(settings, roster=roster) as node:
        for args in (["create", "orders", "o1"], ["set", "orders", "o1", "total", "1250"],
                     ["incr", "orders", "o1", "views"], ["add", "orders", "o1", "tags", '"x"'],
                     ["create", "orders", "o2"], ["move", "orders", "o2", "o1"]):
            r = await asyncio.to_thread(
                subprocess.run, [str(worknode), *args, *common], capture_output=True,
                text=True, timeout=60, check=False,
            )
            assert r.returncode == 0, r.stderr
            outputs.append(json.loads(r.stdout))
        assert node.replica(SUBJECT).tree.parent("o2") == "o1"
    assert outputs[1] == {"o1": {"fields": {"total": 1250}}}
    assert outputs[5] == {"o2": {"parent": "o1"}}
    bad = await asyncio.to_thread(
        subprocess.run, [str(worknode), "set", "orders", "no-such-node", "v", "1", *common],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert bad.returncode != 0
    assert bad.stderr == "error: no worknode 'no-such-node'\n"
