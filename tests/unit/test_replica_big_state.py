"""A replica's stored state is bounded by the store (``max_record_bytes``), not by the wire's
``max_payload``: a snapshot larger than one NATS message still loads on restart (it did not:
the store's decoder applied the wire's limit, and the replica could never start again)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import Assign, Create, ORMap
from broker.errors import MessageTooLargeError
from broker.replica import Replica, ReplicaConfig
from broker.store import DurableStore
from broker.testing import memory_transport_pair

SA = Signer("a", b"a" * 32)
ROSTER = TrustRoster({"a": SA.public_key})
MAX_PAYLOAD = 64 * 1024
KEYS = 3_000  # about 3x MAX_PAYLOAD once packed


async def _replica(path: Path) -> tuple[Replica, DurableStore]:
    transport, _ = memory_transport_pair(names=("a", "b"))
    store = DurableStore(path)
    store.open()
    replica = Replica(
        signer=SA, roster=ROSTER, codec=WireCodec(max_payload=MAX_PAYLOAD), transport=transport,
        store=store, config=ReplicaConfig(namespace="ns", subject="s", catchup_timeout=0.05),
    )
    await replica.start()
    return replica, store


@pytest.mark.parametrize("snapshot", [True, False])
async def test_a_state_larger_than_max_payload_loads_on_restart(
    tmp_path: Path, snapshot: bool
) -> None:
    r, store = await _replica(tmp_path / "a.db")
    await r.write(Create("b"))
    for j in range(0, KEYS, 500):
        await r.write_many([Assign("b", (f"field-{i:05d}",), f"value {i}" * 3)
                            for i in range(j, j + 500)])
    if snapshot:
        await r._snapshot()
        assert len(store.load("s").snapshot or b"") > MAX_PAYLOAD
    want = r.state.copy()
    await r.stop()
    store.close()
    r, store = await _replica(tmp_path / "a.db")
    try:
        assert r.state.digest() == want.digest()
        assert len(r.tree.fields("b")) == KEYS
        assert not r.load_errors
    finally:
        await r.stop()
        store.close()


def test_decode_record_reads_past_max_payload_and_decode_document_does_not() -> None:
    codec = WireCodec(max_payload=MAX_PAYLOAD)
    state = ORMap()
    for i in range(KEYS):
        state.merge(state.assign("a", (f"field-{i:05d}",), f"value {i}" * 3, 1))
    packed = codec.encode_document(state)
    assert len(packed) > MAX_PAYLOAD
    assert codec.decode_record(packed).digest() == state.digest()
    assert codec.decode_record(packed, ORMap, bad_keys=[]).digest() == state.digest()
    with pytest.raises(MessageTooLargeError):  # the wire's limit, for what comes off the wire
        codec.decode_document(packed)


def test_a_record_past_the_first_segment_is_one_unpacked_segment() -> None:
    codec = WireCodec()
    state = ORMap()
    for i in range(KEYS):
        state.merge(state.assign("a", (f"field-{i:05d}",), i, 1))
    record = codec.encode_record(state)
    assert record[:1] == b"\x00"  # unpacked, though pycapnp would need several segments
    assert len(record) > 8 * 8192
    assert codec.decode_record(record).digest() == state.digest()


async def test_a_snapshot_too_large_unpacked_for_the_store_is_stored_packed(
    tmp_path: Path,
) -> None:
    transport, _ = memory_transport_pair(names=("a", "b"))
    store = DurableStore(tmp_path / "a.db", max_record_bytes=150 * 1024)
    store.open()
    r = Replica(signer=SA, roster=ROSTER, codec=WireCodec(), transport=transport, store=store,
                config=ReplicaConfig(namespace="ns", subject="s", catchup_timeout=0.05))
    await r.start()
    try:
        await r.write(Create("b"))
        for j in range(0, KEYS, 500):
            await r.write_many([Assign("b", (f"field-{i:05d}",), i) for i in range(j, j + 500)])
        assert len(r.codec.encode_record(r.state)) > 150 * 1024  # unpacked: too large
        await r._snapshot()
        stored = store.load("s").snapshot
        assert stored is not None
        assert stored[:1] != b"\x00"  # packed: fits
        assert r.codec.decode_record(stored).digest() == r.state.digest()
    finally:
        await r.stop()
        store.close()
