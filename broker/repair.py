"""Key-level repair: the smallest deltas that make two replicas agree on chosen keys.

The healer learns from Merkle trees which top-level keys differ between replicas A and B. It
fetches those keys' entries and each side's causal context, and computes, per key ``k``:

    delta for B = ( {k: Whole(A_k)},  dots(A_k) + { d in dots(B_k) : C_A has seen d } )
    delta for A = symmetric

Joined into B, a dot of ``B_k`` survives iff A holds it too or A never saw it, and a dot of
``A_k`` arrives iff B holds it or never saw it: exactly what a full join does for key ``k``,
while the delta's context speaks only of dots under ``k``. A full state's context cannot be
sent with a few keys' entries (the receiver would take every other dot it covers as removed);
this construction is why healing can move only the keys that differ.

Each half is ``repair_for(theirs, mine, keys)``. Since issue 17 the healer computes neither
for joining: it forwards A's signed fetch reply (``subset(..., absent=True)``: a key A lacks is
named as ``Whole(None)``, so the reply says which keys its context speaks for) and B computes
``repair_for(A's reply, B's state, its keys)`` itself, keeping what A vouches for
(``broker.replication._gate.relayed``). The healer still runs ``repair_deltas`` over both
replies to decide which side needs a push.

Invariant (tested): after applying both deltas, A and B hold equal entries for every repaired
key, equal to the entries of the full join ``A ⊔ B``.

Digests are taken over an entry *as the newest release reads it* (``newest_reading``): a
node pinned to an older wire version keeps a kind its schema lacks (an enable-wins flag on
wire v1) as an ``OpaqueStore`` holding the payload bytes, while a newer node holds the known
store. Both hold the same logical content, so their digests must agree; otherwise the Merkle
roots of a mixed-version cluster never agree and every heal re-pushes the same keys
(issue 13, bug 3). Opaque stores of kinds this code does not know either stay opaque on every
node and are digested as they are.

Pure: states in, deltas out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Final

from broker.codec import CURRENT_VERSION, KINDS_BY_VERSION, WireCodec
from broker.crdt import CausalContext, ORMap
from broker.crdt._stores import (
    DIGEST_SIZE,
    KindStore,
    MapStore,
    OpaqueStore,
    Whole,
    canonical_bytes,
    digest_entry,
    dots_of,
)
from broker.errors import CodecError
from broker.replication._gate import Relayed, relayed

__all__ = [
    "DIGEST_AS_NEWEST",
    "adds_nothing",
    "entry_digest",
    "item_digest",
    "key_digests",
    "newest_reading",
    "newest_state",
    "repair_deltas",
    "repair_for",
    "subset",
    "vouched",
]

_PERSON_ITEM: Final = b"wn-merkle-item2"
_NEWEST_KINDS: Final = KINDS_BY_VERSION[CURRENT_VERSION]

DIGEST_AS_NEWEST = True
"""The rule of ``newest_reading`` in digests. Only mutation tests turn it off, to show that
the tests and the simulation catch issue 13's bug 3 (a v1-pinned node's digests of keys
holding flags differing from a newer node's, so mixed versions never converge)."""


def _holds_readable_opaque(entry: Any) -> bool:
    # Exact type checks first: this walk runs for every digest taken (hot), and almost never
    # finds anything.
    t = type(entry)
    if t is MapStore or t is KindStore:
        return any(_holds_readable_opaque(v) for v in entry.values())
    if t is Whole:
        return _holds_readable_opaque(entry.store)
    return isinstance(entry, OpaqueStore) and entry.KIND in _NEWEST_KINDS


def newest_reading(entry: Any) -> Any:
    """``entry`` with every ``OpaqueStore`` of a kind the newest wire release knows read as
    that kind (the entry itself when it holds none: the common case costs one walk).

    An opaque store's payloads are the exact structs they arrived as, so passing the entry
    through the newest codec (it copies opaque payloads verbatim, then reads them with the
    schema that knows their kind) gives the store a newest-version node holds."""
    if not DIGEST_AS_NEWEST or not _holds_readable_opaque(entry):
        return entry
    holder = ORMap(MapStore({"k": entry}), CausalContext(), is_delta=isinstance(entry, Whole))
    codec = WireCodec(CURRENT_VERSION)
    try:
        read = codec.decode_document(codec.encode_document(holder))
    except CodecError:
        # Content the newest release refuses (a kind-6 item whose payload is no flag, say)
        # is held opaque by an older reader only: no newer node can hold it, so it is
        # digested as it is. Raising would leave this node's Merkle tree unbuildable, and
        # every heal of the subject failing, for as long as the entry exists.
        return entry
    return (read.store or {}).get("k")


def newest_state(state: ORMap) -> ORMap:
    """``state`` (with its context) as the newest release reads it: ``newest_reading`` of a
    whole state, for digests of a whole state (``ORMap.digest``) that must not depend on the
    wire version of the node holding it."""
    if not _holds_readable_opaque(state.store):
        return state
    codec = WireCodec(CURRENT_VERSION)
    try:
        read = codec.decode_document(codec.encode_document(state))
    except CodecError:  # some entry the newest release refuses: entry by entry instead
        store = state.store or {}
        return ORMap(MapStore({k: newest_reading(v) for k, v in store.items()}) or None,
                     state.context.copy(), is_delta=state.is_delta)
    assert isinstance(read, ORMap)
    return read


def entry_digest(entry: Any, secret: bytes = b"") -> bytes:
    """Content digest of one top-level entry (depends on the content only, not the key, nor
    on the wire version that read it)."""
    return digest_entry(newest_reading(entry), key=secret, depth=2)


def item_digest(key: str, entry: Any, secret: bytes) -> bytes:
    """A Merkle item's digest: BLAKE2b-256 keyed with the cluster secret over
    ``len(key) || key || canonical bytes of the entry`` (length as 4 big-endian bytes).

    It binds the key and the content and no one without the secret can compute it, so the
    tree adds it as the item's value without hashing again (``broker.merkle``, scheme 2).
    The content is read as the newest release reads it (``newest_reading``), so replicas
    pinned to different wire versions agree on equal content.
    """
    kb = key.encode()
    return hashlib.blake2b(
        len(kb).to_bytes(4, "big") + kb + canonical_bytes(newest_reading(entry), 2),
        digest_size=DIGEST_SIZE,
        key=secret,
        person=_PERSON_ITEM,
    ).digest()


def key_digests(state: ORMap, secret: bytes = b"") -> dict[str, bytes]:
    """``{key: entry digest}`` for every top-level key of ``state``."""
    store = state.store or {}
    return {k: entry_digest(v, secret) for k, v in store.items()}


def subset(state: ORMap, keys: Iterable[str], *, absent: bool = False) -> ORMap:
    """A state holding only ``keys``' entries, with the full context (for a fetch reply).

    Marked as a delta so that, should anyone join it by mistake, only those keys are
    touched; the healer reads it, it never joins it. ``absent``: a key ``state`` lacks is
    named as ``Whole(None)`` (a fetch reply is self-describing: whoever reads it, e.g. a
    replica handed it as a voucher, knows which keys its context speaks for).
    """
    store = state.store or {}
    if absent:
        picked = MapStore({k: store[k] if k in store else Whole(None) for k in keys})
    else:
        picked = MapStore({k: store[k] for k in keys if k in store})
    return ORMap(picked or None, state.context.copy(), is_delta=True)


def adds_nothing(state: ORMap, delta: ORMap) -> bool:
    """Whether joining repair ``delta`` into ``state`` leaves it exactly as it is (a repair
    replayed or pushed twice): ``state`` already holds every dot of the delta's context and
    the join changes none of the delta's keys' entries.

    Cost: the delta's keys' entries and ``state``'s context copied once (a delta touches only
    its keys, so the rest of the state needs no look). ``state`` is not modified."""
    if not delta.is_delta:
        return False  # a full state speaks of every key: not worth proving unchanged here
    keys = list(delta.store or ())
    trial = subset(state, keys)  # the entries themselves, shared: copy before joining
    before = trial.store
    trial = trial.copy()
    trial.is_delta = state.is_delta
    trial.merge(delta)
    return trial.store == before and trial.context == state.context


def _delta_for(
    target_entry: Any, source_entry: Any, source_ctx: CausalContext
) -> tuple[Any, list[tuple[str, int]]]:
    dots = list(dots_of(source_entry, 2))
    dots += [d for d in dots_of(target_entry, 2) if source_ctx.covers(d[0], d[1])]
    return Whole(source_entry), dots


def _entry(store: Any, key: str) -> Any:
    """The entry under ``key`` of a fetched or held store; None when absent. A fetch reply
    names a key asked and absent at its source as ``Whole(None)`` (self-describing: the
    source's context speaks for that key too); any ``Whole`` marker is read through."""
    entry = store.get(key)
    return entry.store if type(entry) is Whole else entry


def repair_for(theirs: ORMap, mine: ORMap, keys: Iterable[str]) -> ORMap:
    """The repair delta that makes ``mine`` agree with ``theirs`` on ``keys`` (the "delta for
    B" of the module doc, with ``theirs`` = A and ``mine`` = B).

    ``theirs`` holds at least ``keys``' entries (absent ones as ``Whole(None)`` or missing)
    and its replica's full context (a fetch reply, ``subset``); ``mine`` is the receiver's
    state or a subset of it. Pure: neither is modified; the delta shares their entries."""
    ts, ms = theirs.store or {}, mine.store or {}
    out = MapStore()
    dots: list[tuple[str, int]] = []
    for k in sorted(set(keys)):
        a, b = _entry(ts, k), _entry(ms, k)
        if a is None and b is None:
            continue
        entry, d = _delta_for(b, a, theirs.context)
        # Skip no-op deltas: the source has no entry and the target holds no dot it saw.
        if a is not None or d:
            out[k] = entry
            dots += d
    return ORMap(out or None, CausalContext.from_dots(dots), is_delta=True)


def repair_deltas(left: ORMap, right: ORMap, keys: Iterable[str]) -> tuple[ORMap, ORMap]:
    """``(delta for left, delta for right)`` repairing ``keys``: ``repair_for`` each way.

    ``left``/``right`` hold at least the entries of ``keys`` and each replica's full context
    (as ``subset`` returns them).
    """
    keys = sorted(set(keys))
    return repair_for(right, left, keys), repair_for(left, right, keys)


def vouched(voucher: ORMap, source: str, state: ORMap, hlc: int) -> Relayed:
    """What a replica holding ``state`` joins of replica ``source``'s fetch reply
    ``voucher`` (sealed by ``source`` at hybrid time ``hlc``): the repair of the reply's keys
    computed against ``state`` (``repair_for``), less what ``source`` cannot vouch for
    (``relayed``: other writers' dots ``state`` never saw are stripped and named; a dot or a
    timestamp out of range refuses it all, ``Relayed.reason``). What the replica's apply
    endpoint joins, and what a simulation of it must join. Pure."""
    delta = repair_for(voucher, state, list(voucher.store or ()))
    return relayed(delta, source, state.context, hlc=hlc)
