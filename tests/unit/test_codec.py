"""The Cap'n Proto codec: round trips for every kind, cross-version reads, limits, signatures."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import (
    CURRENT_VERSION,
    NESTING_LIMIT,
    Signer,
    TrustRoster,
    WireCodec,
    load_schema,
)
from broker.crdt import MAX_NESTING_DEPTH, EWFlag, HybridClock, ORMap
from broker.crdt._causal import Causal
from broker.errors import (
    BadSignatureError,
    CodecError,
    MalformedMessageError,
    MessageTooDeepError,
    MessageTooLargeError,
    UnknownSignerError,
    UnsignedMessageError,
    UnsupportedContentError,
    UnsupportedVersionError,
)
from tests.unit.strategies import atoms, histories, kinds_at, run_history

CODECS = {v: WireCodec(v) for v in (1, CURRENT_VERSION)}
T0 = 1_700_000_000_000 << 16


def same(a: Causal, b: Causal) -> None:
    assert type(a) is type(b)
    assert a.is_delta == b.is_delta
    assert a.context == b.context
    assert a.digest() == b.digest()
    assert a.value() == b.value()


@st.composite
def versions_and_history(
    draw: st.DrawFn,
) -> tuple[int, int, tuple[list[Causal], list[Causal]]]:
    """A writer and a reader version and a history of what both carry (every kind when both
    are current; v1's kinds when either is v1)."""
    writer = draw(st.sampled_from([1, CURRENT_VERSION]))
    reader = draw(st.sampled_from([1, CURRENT_VERSION]))
    oldest = min(writer, reader)
    kind = draw(st.sampled_from(kinds_at(oldest)))
    return writer, reader, run_history(kind, draw(histories(kind, version=oldest)))


@settings(max_examples=150)
@given(versions_and_history())
def test_states_and_deltas_round_trip_across_versions(
    wrh: tuple[int, int, tuple[list[Causal], list[Causal]]],
) -> None:
    writer, reader, (states, deltas) = wrh
    w, r = CODECS[writer], CODECS[reader]
    for s in states:
        same(r.decode_document(w.encode_document(s)), s)
    for d in deltas:
        same(r.decode_document(w.encode_document(d)), d)
    if deltas:  # a batch: deltas joined into one delta
        batch = deltas[0].copy()
        for d in deltas[1:]:
            batch.merge(d)
        same(r.decode_document(w.encode_document(batch)), batch)


deep_paths = st.lists(st.sampled_from(["a", "b", "ü"]), min_size=1, max_size=MAX_NESTING_DEPTH)


@settings(max_examples=60)
@given(st.lists(st.tuples(deep_paths, st.integers(0, 7), atoms), min_size=1, max_size=12))
def test_nested_maps_round_trip_to_max_depth(writes: list[tuple[list[str], int, Any]]) -> None:
    state = ORMap()
    batch = ORMap(is_delta=True)
    for n, (path, op, value) in enumerate(writes):
        rid = f"r{op % 3}"
        if op == 0:
            d = state.assign(rid, path, value, T0 + n)
        elif op == 1:
            d = state.increment(rid, path, 3)
        elif op == 2:
            d = state.add(rid, path, "e")
        elif op == 3:
            d = state.assign_multi(rid, path, value)
        elif op == 4:
            d = state.discard(rid, path, "e")
        elif op == 5:
            d = state.enable(rid, path)  # the v2 flag kind
        elif op == 6:
            d = state.disable(path)
        else:
            d = state.remove(path)
        state.merge(d)
        batch.merge(d)
    c = CODECS[CURRENT_VERSION]
    same(c.decode_document(c.encode_document(state)), state)
    same(c.decode_document(c.encode_document(batch)), batch)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.booleans()), max_size=15))
def test_flags_round_trip(ops: list[tuple[str, bool]]) -> None:
    flags = {r: EWFlag() for r in ("r1", "r2", "r3")}
    batch = EWFlag(is_delta=True)
    for rid, on in ops:
        f = flags[rid]
        d = f.enable(rid) if on else f.disable()
        f.merge(d)
        batch.merge(d)
        flags["r1"].merge(d)
    c = CODECS[CURRENT_VERSION]
    for f in (*flags.values(), batch):
        same(c.decode_document(c.encode_document(f)), f)


def _deep_document(levels: int) -> bytes:
    """A hand-built map document ``levels`` maps deep (the core refuses to build it)."""
    schema = load_schema()
    doc = schema.crdt.Document.new_message()
    doc.init("replicas", 1)[0] = "r1"
    e = doc.init("root")
    e.kind = 5
    for _ in range(levels - 1):
        e = e.init("entries", 1)[0]
        e.key = "k"
        e.kind = 5
    leaf = e.init("entries", 1)[0]
    leaf.key = "v"
    leaf.kind = 1
    it = leaf.init("items", 1)[0]
    it.replica = 0
    it.counter = 1
    p = it.init("payload").init("lww")
    p.hlc = 1
    p.init("value").int = 1
    return doc.to_bytes_packed()  # type: ignore[no-any-return]


def test_depth_at_the_limit_reads_and_one_more_is_refused() -> None:
    c = CODECS[CURRENT_VERSION]
    ok = c.decode_document(_deep_document(MAX_NESTING_DEPTH))
    assert isinstance(ok, ORMap)
    with pytest.raises(MessageTooDeepError):
        c.decode_document(_deep_document(MAX_NESTING_DEPTH + 1))
    with pytest.raises(MessageTooDeepError):
        c.decode_document(_deep_document(NESTING_LIMIT + 4))


def test_oversized_and_traversal_heavy_messages_are_refused() -> None:
    c = WireCodec(max_payload=4096)
    with pytest.raises(MessageTooLargeError):
        c.decode_document(b"\x00" * 5000)
    state = ORMap()
    for i in range(200):
        state.merge(state.assign("r1", (f"key-{i}",), "x" * 20, T0 + i))
    raw = CODECS[CURRENT_VERSION].encode_document(state)
    assert len(raw) > 4096
    with pytest.raises(MessageTooLargeError):
        c.decode_document(raw)
    # A small packed message that claims a huge segment: refused by the traversal limit,
    # before anything is allocated.
    bomb = b"\x10\x00" + b"\x00\xff" * 8
    with pytest.raises(CodecError):
        c.decode_document(bomb)


def _mutated_doc(edit: Any) -> bytes:
    schema = load_schema()
    state = ORMap()
    state.merge(state.assign("r1", ("a",), 1, T0))
    state.merge(state.add("r2", ("s",), "x"))
    state.merge(state.add("r3", ("s",), "y"))
    b = schema.crdt.Document.from_bytes_packed(
        CODECS[CURRENT_VERSION].encode_document(state)
    ).as_builder()
    edit(b)
    return b.to_bytes_packed()  # type: ignore[no-any-return]


def _set(path: str, value: Any) -> Any:
    def edit(b: Any) -> None:
        *parts, last = path.split(".")
        obj = b
        for p in parts:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        if last.isdigit():
            obj[int(last)] = value
        else:
            setattr(obj, last, value)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("root.entries.0.items.0.replica", 9), "replica index"),
        (_set("root.entries.0.items.0.counter", 0), "dot counter"),
        (_set("root.entries.0.key", ""), "map key"),
        (_set("root.entries.0.key", "z"), "sorted"),
        (_set("root.entries.0.kind", 4), "does not hold"),
        (_set("root.entries.0.kind", 0), "absent"),
        (_set("root.entries.0.whole", True), "Whole"),
        (_set("root.entries.1.elements.0.dots.0.counter", 0), "dot counter"),
        (_set("root.kind", 1), "does not hold map entries"),
        (_set("root.key", "x"), "no key"),
        (_set("replicas.0", "bad id!"), "replica id"),
        (_set("replicas.1", "r1"), "repeats"),
        (_set("context.versions.0.replica", 7), "replica index"),
    ],
)
def test_contract_violations_are_specific_errors(edit: Any, message: str) -> None:
    with pytest.raises(MalformedMessageError, match=message):
        CODECS[CURRENT_VERSION].decode_document(_mutated_doc(edit))


def test_invalid_utf8_text_is_a_codec_error() -> None:
    raw = _mutated_doc(_set("root.entries.0.key", "KEYX"))
    CODECS[CURRENT_VERSION].decode_document(raw)
    pos = raw.find(b"KEYX")
    assert pos > 0
    bad = raw[: pos + 1] + b"\xff" + raw[pos + 2 :]
    with pytest.raises(MalformedMessageError):
        CODECS[CURRENT_VERSION].decode_document(bad)


# -- envelopes and signatures ------------------------------------------------------------


@pytest.fixture
def keys() -> tuple[Signer, Signer, TrustRoster]:
    alice = Signer("alice", b"a" * 32)
    mallory = Signer("mallory", b"m" * 32)
    return alice, mallory, TrustRoster({"alice": alice.public_key})


def _delta() -> ORMap:
    s = ORMap()
    return s.assign("alice", ("k",), "v", T0)


def test_envelope_round_trip_with_trace_id(keys: tuple[Signer, Signer, TrustRoster]) -> None:
    alice, _, roster = keys
    c = CODECS[CURRENT_VERSION]
    d = _delta()
    raw = c.seal(alice, subject="wn.ns.s1", hlc=T0, sequence=7, document=d, trace_id=b"t" * 16)
    env = c.open(raw, roster)
    assert (env.version, env.writer, env.subject, env.hlc, env.sequence) == (
        CURRENT_VERSION,
        "alice",
        "wn.ns.s1",
        T0,
        7,
    )
    assert env.trace_id == b"t" * 16
    assert not env.is_state
    same(env.document, d)
    # an old reader reads the same bytes; it just does not know trace ids
    old = CODECS[1].open(raw, roster)
    same(old.document, d)
    assert old.trace_id == b""
    # a new reader reads an old writer's envelope with defaults
    raw1 = CODECS[1].seal(alice, subject="wn.ns.s1", hlc=T0, sequence=8, document=d)
    env1 = c.open(raw1, roster)
    assert env1.version == 1
    assert env1.trace_id == b""
    same(env1.document, d)


def test_state_transfer_envelope(keys: tuple[Signer, Signer, TrustRoster]) -> None:
    alice, _, roster = keys
    s = ORMap()
    s.merge(_delta())
    env = CODECS[1].open(
        CODECS[1].seal(alice, subject="x", hlc=1, sequence=1, document=s, is_state=True), roster
    )
    assert env.is_state
    same(env.document, s)


def test_unsigned_forged_and_unknown_signers_are_refused(
    keys: tuple[Signer, Signer, TrustRoster],
) -> None:
    alice, mallory, roster = keys
    c = CODECS[CURRENT_VERSION]
    schema = c.schema
    raw = c.seal(alice, subject="x", hlc=1, sequence=1, document=_delta())
    o = schema.envelope.SignedEnvelope.from_bytes_packed(raw).as_builder()
    o.signature = b""
    with pytest.raises(UnsignedMessageError):
        c.open(o.to_bytes_packed(), roster)

    o = schema.envelope.SignedEnvelope.from_bytes_packed(raw).as_builder()
    sig = bytearray(o.signature)
    sig[0] ^= 1
    o.signature = bytes(sig)
    with pytest.raises(BadSignatureError):
        c.open(o.to_bytes_packed(), roster)

    # the body altered after signing
    o = schema.envelope.SignedEnvelope.from_bytes_packed(raw).as_builder()
    env = schema.envelope.Envelope.from_bytes_packed(bytes(o.body)).as_builder()
    env.sequence = 99
    o.body = env.to_bytes_packed()
    with pytest.raises(BadSignatureError):
        c.open(o.to_bytes_packed(), roster)

    # mallory is not trusted
    with pytest.raises(UnknownSignerError):
        c.open(c.seal(mallory, subject="x", hlc=1, sequence=1, document=_delta()), roster)

    # mallory is trusted, but claims to be alice inside a body she signed herself
    roster.add("mallory", mallory.public_key)
    o = schema.envelope.SignedEnvelope.from_bytes_packed(
        c.seal(mallory, subject="x", hlc=1, sequence=1, document=_delta())
    ).as_builder()
    env = schema.envelope.Envelope.from_bytes_packed(bytes(o.body)).as_builder()
    env.writer = "alice"
    o.body = env.to_bytes_packed()
    o.signature = mallory.sign(bytes(o.body))
    with pytest.raises(BadSignatureError, match="signed by"):
        c.open(o.to_bytes_packed(), roster)


def test_replaying_an_old_valid_envelope_is_harmless(
    keys: tuple[Signer, Signer, TrustRoster],
) -> None:
    alice, _, roster = keys
    c = CODECS[CURRENT_VERSION]
    clock = HybridClock()
    state = ORMap()
    d1 = state.assign("alice", ("k",), "old", clock.now(physical_ms=1_000))
    state.merge(d1)
    old = c.seal(alice, subject="x", hlc=1, sequence=1, document=d1)
    d2 = state.assign("alice", ("k",), "new", clock.now(physical_ms=2_000))
    state.merge(d2)
    d3 = state.remove(("k",))
    replica = ORMap()
    for raw in (old, c.seal(alice, subject="x", hlc=2, sequence=2, document=d2)):
        replica.merge(c.open(raw, roster).document)
    assert replica.value() == {"k": "new"}
    replica.merge(c.open(old, roster).document)  # replay: no effect
    assert replica.value() == {"k": "new"}
    state.merge(d3)
    replica.merge(d3)
    replica.merge(c.open(old, roster).document)  # replay after a remove: still removed
    assert replica.value() == {}
    assert replica.digest() == state.digest()


def test_unsupported_version_is_refused(keys: tuple[Signer, Signer, TrustRoster]) -> None:
    alice, _, roster = keys
    c = CODECS[CURRENT_VERSION]
    schema = c.schema
    o = schema.envelope.SignedEnvelope.from_bytes_packed(
        c.seal(alice, subject="x", hlc=1, sequence=1, document=_delta())
    ).as_builder()
    env = schema.envelope.Envelope.from_bytes_packed(bytes(o.body)).as_builder()
    env.version = 0
    o.body = env.to_bytes_packed()
    o.signature = alice.sign(bytes(o.body))
    with pytest.raises(UnsupportedVersionError):
        c.open(o.to_bytes_packed(), roster)


def test_compressed_batches_only_for_v2_peers(keys: tuple[Signer, Signer, TrustRoster]) -> None:
    alice, _, roster = keys
    state = ORMap()
    batch = ORMap(is_delta=True)
    for i in range(300):
        d = state.assign("alice", (f"key-{i}",), i, T0 + i)
        state.merge(d)
        batch.merge(d)
    mixed = WireCodec(CURRENT_VERSION)  # peer_version defaults to the oldest: no compression
    upgraded = WireCodec(CURRENT_VERSION, peer_version=2)
    plain = mixed.seal(alice, subject="x", hlc=1, sequence=1, document=batch)
    small = upgraded.seal(alice, subject="x", hlc=1, sequence=1, document=batch)
    assert len(small) < len(plain) / 2
    same(upgraded.open(small, roster).document, batch)
    same(CODECS[1].open(plain, roster).document, batch)
    with pytest.raises(UnsupportedContentError, match="peer_version"):
        CODECS[1].open(small, roster)


@pytest.mark.parametrize("size", [3, 300])  # under and over the compression threshold
@pytest.mark.parametrize("peer", [1, 2])
@pytest.mark.parametrize("encode", ["encode_document", "encode_record"])
def test_seal_reusing_an_encoded_record_gives_the_same_envelope(
    keys: tuple[Signer, Signer, TrustRoster], size: int, peer: int, encode: str
) -> None:
    """A replica seals a batch from its durable record's bytes (packed, or the unpacked
    record the fast writer gives): byte-identical envelope."""
    alice, _, roster = keys
    state, batch = ORMap(), ORMap(is_delta=True)
    for i in range(size):
        d = state.assign("alice", (f"key-{i}",), i, T0 + i)
        state.merge(d)
        batch.merge(d)
    codec = WireCodec(CURRENT_VERSION, peer_version=peer)
    record = getattr(codec, encode)(batch)
    assert (record[:1] == b"\x00") == (encode == "encode_record")
    args: dict[str, Any] = {"subject": "x", "hlc": 1, "sequence": 1, "document": batch}
    assert codec.seal(alice, packed=record, **args) == codec.seal(alice, **args)
    same(codec.open(codec.seal(alice, packed=record, **args), roster).document, batch)
    same(codec.decode_record(record), batch)


def test_a_record_the_fast_writer_cannot_write_is_packed() -> None:
    codec, old = WireCodec(), WireCodec(2)  # the fast writer knows the current layouts only
    batch = ORMap(is_delta=True)
    batch.merge(batch.assign("alice", ("k",), "v", T0))
    assert codec.encode_record(batch)[:1] == b"\x00"
    assert old.encode_record(batch) == old.encode_document(batch)
    same(old.decode_record(old.encode_record(batch)), batch)


@pytest.mark.parametrize("mangle", [
    lambda r: r[:-8],  # a word short of its table
    lambda r: r + bytes(8),  # a word past it
    lambda r: r[:-3],  # not whole words
    lambda r: b"\x00\x00\x00\x00" + (len(r) // 8).to_bytes(4, "little") + r[8:],  # size off
    lambda r: b"\x01" + r[1:],  # two segments declared (not 0 first: read as packed, refused)
    lambda r: b"\x00\x00\x00\x01" + r[4:],  # 2**24 + 1 segments declared
    lambda r: r[:8],  # the table alone
    lambda r: r[:16] + bytes([0xFF]) * (len(r) - 16),  # pointers out of bounds
])
def test_a_damaged_unpacked_record_is_refused_with_a_codec_error(mangle: Any) -> None:
    codec = WireCodec()
    batch = ORMap(is_delta=True)
    for i in range(5):
        batch.merge(batch.assign("alice", (f"k{i}",), i, T0 + i))
    record = codec.encode_record(batch)
    with pytest.raises(CodecError):
        codec.decode_record(mangle(record))
    with pytest.raises(CodecError):
        codec.decode_record(mangle(record), ORMap, bad_keys=[])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_unpacked_records_of_random_bytes_never_crash(tail: bytes) -> None:
    codec = WireCodec()
    data = b"\x00\x00\x00\x00" + (len(tail) // 8).to_bytes(4, "little") + tail
    with contextlib.suppress(CodecError):
        codec.decode_record(data)


def test_seal_refuses_an_envelope_over_max_payload(
    keys: tuple[Signer, Signer, TrustRoster],
) -> None:
    alice, _, _ = keys
    state = ORMap()
    for i in range(100):
        state.merge(state.assign("alice", (f"key-{i}",), "x" * 40, T0 + i))
    with pytest.raises(MessageTooLargeError, match="flush smaller"):
        WireCodec(max_payload=2048).seal(alice, subject="x", hlc=1, sequence=1, document=state)


def test_truncated_multi_segment_stream_is_refused_not_aborted() -> None:
    # Found by the fuzzer: a two-segment table with no data. pycapnp alone aborts the
    # interpreter on it (an exception thrown from a destructor); the pre-check refuses it.
    for codec in CODECS.values():
        with pytest.raises(MalformedMessageError, match="segment table"):
            codec.decode_document(bytes.fromhex("0101110580"))


@given(st.binary(max_size=64), st.integers(0, 15).map(lambda high: high << 4))
def test_the_one_byte_fast_path_of_the_packed_precheck_agrees_with_the_full_check(
    tail: bytes, tag: int
) -> None:
    # check_segments skips the table walk when the first tag's low four bits are clear (a
    # one-segment table); the full check must accept every such stream too.
    from broker.codec._packed import _check_table, check_segments

    data = bytes([tag]) + tail
    check_segments(data)
    _check_table(data)  # would raise MalformedMessageError if the fast path were wrong


def test_the_packed_precheck_still_walks_multi_segment_tables() -> None:
    from broker.codec._packed import check_segments

    with pytest.raises(MalformedMessageError, match="segment table"):
        check_segments(bytes.fromhex("0101110580"))


def test_large_multi_segment_messages_pass_the_packed_precheck() -> None:
    from broker.codec._packed import unpacked_words

    state = ORMap()
    for i in range(3000):
        state.merge(state.assign("r1", (f"key-{i}",), "v" * (i % 50), T0 + i))
    c = CODECS[CURRENT_VERSION]
    raw = c.encode_document(state)
    seg_count = c.schema.crdt.Document.from_bytes_packed(raw)  # parses
    del seg_count
    assert unpacked_words(raw) > 1024  # more than one default-size segment
    assert unpacked_words(raw[:-1]) == -1 or unpacked_words(raw[:-1]) < unpacked_words(raw)
    same(c.decode_document(raw), state)


def test_a_compressed_batch_that_inflates_past_the_limit_is_refused(
    keys: tuple[Signer, Signer, TrustRoster],
) -> None:
    import zlib

    alice, _, roster = keys
    c = WireCodec(max_payload=64 * 1024, peer_version=2)
    env = c.schema.envelope.Envelope.new_message()
    env.version = 2
    env.writer = "alice"
    env.subject = "x"
    env.deltaBatchZlib = zlib.compress(bytes(8 * 64 * 1024 + 1), 9)  # a few hundred bytes
    body = env.to_bytes_packed()
    outer = c.schema.envelope.SignedEnvelope.new_message()
    outer.signer = "alice"
    outer.signature = alice.sign(body)
    outer.body = body
    with pytest.raises(MessageTooLargeError, match="inflates past"):
        c.open(outer.to_bytes_packed(), roster)


@pytest.mark.parametrize("size", [3, 300])  # under and over the compression threshold
@pytest.mark.parametrize("peer", [1, 2])
def test_open_keeping_the_packed_document(
    keys: tuple[Signer, Signer, TrustRoster], size: int, peer: int
) -> None:
    """``keep_packed``: the document's bytes come back (copied, not re-encoded) and decode to
    the same document; a replica logs them as its record of a repair."""
    alice, _, roster = keys
    state, batch = ORMap(), ORMap(is_delta=True)
    for i in range(size):
        d = state.assign("alice", (f"key-{i}",), i, T0 + i)
        state.merge(d)
        batch.merge(d)
    codec = WireCodec(CURRENT_VERSION, peer_version=peer)
    raw = codec.seal(alice, subject="x", hlc=1, sequence=1, document=batch)
    assert codec.open(raw, roster).packed_document == b""
    env = codec.open(raw, roster, keep_packed=True)
    same(env.document, batch)
    same(codec.decode_document(env.packed_document), batch)


@pytest.mark.parametrize("peer", [1, 2])
def test_a_large_envelope_body_is_one_segment(
    keys: tuple[Signer, Signer, TrustRoster], peer: int
) -> None:
    """The body is sized for its document, so a reader's segment pre-check (a pass over every
    byte of a multi-segment stream) has nothing to do."""
    import struct

    from broker.codec._packed import _unpack_prefix

    alice, _, roster = keys
    state, batch = ORMap(), ORMap(is_delta=True)
    for i in range(3_000):
        d = state.assign("alice", (f"key-{i}", "v"), f"value-{i}", T0 + i)
        state.merge(d)
        batch.merge(d)
    codec = WireCodec(CURRENT_VERSION, peer_version=peer, compress=False)
    raw = codec.seal(alice, subject="x", hlc=1, sequence=1, document=batch)
    body = bytes(codec.read(codec.schema.envelope.SignedEnvelope, raw, "envelope").body)
    first = _unpack_prefix(body, 1)
    assert first is not None
    assert struct.unpack_from("<I", first)[0] == 0  # segment count - 1
    same(codec.open(raw, roster).document, batch)


def test_an_envelope_timestamp_beyond_the_clocks_range_is_malformed() -> None:
    """Found by the delta fuzz target: a signed envelope whose hybrid timestamp is above
    2**63 - 1 reached the replica's clock, which raised InvalidArgumentError, not a refusal
    the replica counts."""
    from broker.codec import Signer, TrustRoster, WireCodec
    from broker.crdt import ORMap
    from broker.errors import MalformedMessageError

    signer = Signer("n", b"\x02" * 32)
    roster = TrustRoster({"n": signer.public_key})
    codec = WireCodec()
    doc = ORMap(is_delta=True)
    ok = codec.seal(signer, subject="s", hlc=(1 << 63) - 1, sequence=1, document=doc)
    assert codec.open(ok, roster).hlc == (1 << 63) - 1
    # A writer's codec refuses to seal it; a hostile signer writes the body itself.
    body = codec.schema.envelope.SignedEnvelope.from_bytes_packed(ok).body
    env = codec.schema.envelope.Envelope.from_bytes_packed(bytes(body)).as_builder()
    env.hlc = 1 << 63
    raw = env.to_bytes_packed()
    outer = codec.schema.envelope.SignedEnvelope.new_message()
    outer.signer, outer.signature, outer.body = "n", signer.sign(raw), raw
    with pytest.raises(MalformedMessageError, match="hybrid timestamp"):
        codec.open(outer.to_bytes_packed(), roster)


@pytest.mark.parametrize("size", [3, 300])
@pytest.mark.parametrize("peer", [1, 2])
def test_packed_document_is_what_open_keeps(
    keys: tuple[Signer, Signer, TrustRoster], size: int, peer: int
) -> None:
    """A replica logs a received batch from ``packed_document`` (no second verify and
    decode): the same bytes ``open(keep_packed=True)`` returns, compressed or not."""
    alice, _, roster = keys
    batch = ORMap(is_delta=True)
    for i in range(size):
        batch.merge(batch.assign("alice", (f"key-{i}",), i, T0 + i))
    codec = WireCodec(CURRENT_VERSION, peer_version=peer)
    raw = codec.seal(alice, subject="x", hlc=1, sequence=1, document=batch)
    assert codec.packed_document(raw) == codec.open(raw, roster, keep_packed=True).packed_document
    same(codec.decode_record(codec.packed_document(raw)), batch)
    with pytest.raises(CodecError):
        codec.packed_document(raw[: len(raw) // 2])


@pytest.mark.parametrize("size", [50, 3_000])  # within and past pycapnp's first segment
def test_seal_by_the_fast_writer_equals_pycapnp_past_the_first_segment(
    keys: tuple[Signer, Signer, TrustRoster], size: int
) -> None:
    """The fast writer seals a batch of any size (one segment, copied into the envelope):
    the same envelope as pycapnp's own encoding, which spreads a large one over segments."""
    alice, _, roster = keys
    batch = ORMap(is_delta=True)
    for i in range(size):
        batch.merge(batch.assign("alice", (f"key-{i:05d}",), f"value {i}", T0 + i))
    args: dict[str, Any] = {"subject": "x", "hlc": 1, "sequence": 1, "document": batch}
    fast, slow = WireCodec(), WireCodec(fast=False)
    assert fast.seal(alice, **args) == slow.seal(alice, **args)
    assert fast.seal(alice, packed=fast.encode_record(batch), **args) == slow.seal(alice, **args)
    same(fast.open(fast.seal(alice, **args), roster).document, batch)
