"""Key-level repair deltas equal a full join, key by key, and touch nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import MAX_NESTING_DEPTH, ORMap
from broker.repair import adds_nothing, item_digest, key_digests, repair_deltas, subset
from tests.unit.strategies import histories, run_history


@st.composite
def two_states(draw: st.DrawFn) -> tuple[ORMap, ORMap]:
    states, _ = run_history(ORMap, draw(histories(ORMap, max_size=40)))
    a, b = states[0], states[1]
    assert isinstance(a, ORMap)
    assert isinstance(b, ORMap)
    return a, b


@settings(max_examples=300, deadline=None)
@given(two_states(), st.data())
def test_repairing_differing_keys_equals_a_full_join(
    ab: tuple[ORMap, ORMap], data: st.DataObject
) -> None:
    a, b = ab
    da, db = key_digests(a), key_digests(b)
    differing = {k for k in da.keys() | db.keys() if da.get(k) != db.get(k)}
    to_a, to_b = repair_deltas(subset(a, differing), subset(b, differing), differing)
    full = a.join(b)
    a2, b2 = a.join(to_a), b.join(to_b)
    assert key_digests(a2) == key_digests(b2) == key_digests(full)
    # Deltas speak only of the repaired keys: applying them again, or to a third state, is
    # harmless, and a later full join changes no entry.
    assert key_digests(a2.join(to_a)) == key_digests(a2)
    assert key_digests(a2.join(b)) == key_digests(full)
    # Keys that were equal were not touched at all.
    for k in da.keys() & db.keys():
        if k not in differing:
            assert k not in (to_a.store or {})
    # Repairing only some of the differing keys fixes exactly those.
    some = data.draw(st.sets(st.sampled_from(sorted(differing)))) if differing else set()
    pa, pb = repair_deltas(subset(a, some), subset(b, some), some)
    a3, b3 = a.join(pa), b.join(pb)
    for k in some:
        assert key_digests(a3).get(k) == key_digests(b3).get(k) == key_digests(full).get(k)


def test_item_digests_bind_the_key_the_content_and_the_secret() -> None:
    entry = ORMap().assign("r1", ("x",), "v", 1).store["x"]  # type: ignore[index]
    other = ORMap().assign("r1", ("x",), "w", 1).store["x"]  # type: ignore[index]
    secret, other_secret = b"s" * 32, b"t" * 32
    base = item_digest("ab", entry, secret)
    assert len(base) == 32
    assert item_digest("ab", entry, secret) == base  # deterministic
    assert item_digest("a", entry, secret) != base
    assert item_digest("abc", entry, secret) != base
    assert item_digest("ab", other, secret) != base
    assert item_digest("ab", entry, other_secret) != base


def _flags_and_friends() -> ORMap:
    s = ORMap()
    s.merge(s.enable("b", ("top",)))  # a flag as a whole top-level entry
    s.merge(s.enable("b", ("feature", "dark")))  # nested
    s.merge(s.enable("c", ("feature", "dark")))
    s.merge(s.assign("b", ("feature", "owner"), "b", 5))
    s.merge(s.enable("b", ("both", "x")))  # two kinds under one name
    s.merge(s.assign("c", ("both", "x"), 1, 6))
    s.merge(s.assign("b", ("plain",), 3, 7))
    deep = tuple(f"d{i}" for i in range(MAX_NESTING_DEPTH))  # a flag as deep as maps go
    s.merge(s.enable("c", deep))
    return s


def test_digests_do_not_depend_on_the_wire_version_that_read_the_state() -> None:
    """Issue 13, bug 3: a v1 reader keeps a flag as an opaque store; its Merkle digests
    must equal a v3 reader's, or a mixed cluster never converges through the healer."""
    from broker.codec import WireCodec
    from broker.crdt._stores import OpaqueStore
    from broker.repair import newest_state

    s = _flags_and_friends()
    for version in (1, 2, 3):
        read = WireCodec(version).decode_document(WireCodec().encode_document(s))
        assert isinstance(read, ORMap)
        if version == 1:  # the case at stake: the v1 reader holds opaque stores
            assert isinstance((read.store or {})["top"], OpaqueStore)
        assert key_digests(read, b"k") == key_digests(s, b"k")
        for key, entry in (s.store or {}).items():
            assert item_digest(key, (read.store or {})[key], b"k") == item_digest(key, entry, b"k")
        assert newest_state(read).digest() == s.digest()
        # passed back to a newer node, nothing was lost
        back = WireCodec().decode_document(WireCodec(version).encode_document(read))
        assert back.value() == s.value()


def test_a_kind_no_release_knows_is_digested_as_it_is() -> None:
    """An opaque store of a kind this code does not know stays opaque on every node: it is
    digested as it is, and differs from any known kind's digest."""
    from broker.crdt._stores import MapStore, opaque_store_class
    from broker.repair import newest_reading

    cls = opaque_store_class(200)
    entry = MapStore({"x": cls(("b", 1, b"\x00"))})
    assert newest_reading(entry) is entry


def test_an_opaque_store_the_newest_release_refuses_is_digested_as_it_is() -> None:
    """A v1 node keeps any kind-6 item opaque, even one whose payload is no flag (a newer
    node refuses it). Its digest must not raise: a raising digest leaves the node's Merkle
    tree unbuildable, so every heal of the subject would fail while the entry exists."""
    from broker.codec import CURRENT_VERSION, WireCodec, load_schema
    from broker.crdt._stores import Kind, MapStore, opaque_store_class
    from broker.repair import newest_reading, newest_state

    item = load_schema(CURRENT_VERSION).crdt.Item.new_message()
    lww = item.init("payload").init("lww")
    lww.hlc = 5
    lww.init("value").text = "not a flag"
    entry = MapStore({"f": opaque_store_class(Kind.FLAG)(("b", 1, item.to_bytes_packed()))})
    assert newest_reading(entry) is entry
    assert len(item_digest("k", entry, b"s")) == 32
    assert len(key_digests(ORMap(MapStore({"k": entry})), b"s")) == 1
    good = _flags_and_friends()
    v1 = WireCodec(1).decode_document(WireCodec().encode_document(good))
    assert isinstance(v1, ORMap)
    mixed = ORMap(MapStore({**(v1.store or {}), "bad": entry}), v1.context.copy())
    read = newest_state(mixed)
    assert (read.store or {})["bad"] is entry
    assert key_digests(read, b"k")["top"] == key_digests(good, b"k")["top"]


def test_the_digest_rule_switched_off_brings_the_mixed_version_bug_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mutation switch the simulation and the chaos test use: without the rule a v1
    reader's digest of a key holding a flag differs from a newer reader's (issue 13, bug 3)."""
    import broker.repair
    from broker.codec import WireCodec

    s = _flags_and_friends()
    v1 = WireCodec(1).decode_document(WireCodec().encode_document(s))
    assert isinstance(v1, ORMap)
    assert key_digests(v1, b"k") == key_digests(s, b"k")
    monkeypatch.setattr(broker.repair, "DIGEST_AS_NEWEST", False)
    differ = {k for k, d in key_digests(v1, b"k").items() if key_digests(s, b"k")[k] != d}
    assert {"top", "feature", "both"} <= differ
    assert "plain" not in differ  # keys without flags are not affected


@settings(max_examples=300, deadline=None)
@given(two_states(), st.data())
def test_adds_nothing_says_exactly_whether_a_repair_changes_the_state(
    ab: tuple[ORMap, ORMap], data: st.DataObject
) -> None:
    """``adds_nothing`` (why a replayed repair is not logged again) is True exactly when the
    join leaves the state equal, and never changes the state it looks at."""
    a, b = ab
    keys = sorted(set(key_digests(a)) | set(key_digests(b)))
    picked = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    to_a, _ = repair_deltas(subset(a, picked), subset(b, picked), picked)
    before = a.digest()
    changes = a.join(to_a) != a
    assert adds_nothing(a, to_a) is not changes
    assert a.digest() == before
    repaired = a.join(to_a)
    assert adds_nothing(repaired, to_a)  # a replay: nothing more


def test_a_removal_alone_is_not_nothing() -> None:
    """A repair carrying no entry, only the dots of a removal, changes the state."""
    a = ORMap()
    a.merge(a.assign("a", ("k", "v"), 1, 1))
    b = a.copy()
    b.merge(b.remove(("k",)))
    to_a, _ = repair_deltas(subset(a, ["k"]), subset(b, ["k"]), ["k"])
    assert not adds_nothing(a, to_a)
    a.merge(to_a)
    assert "k" not in a
    assert adds_nothing(a, to_a)
