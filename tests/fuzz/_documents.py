"""A seeded generator of CRDT documents (states and delta batches) over every kind, and the
differential check of the fast codec against pycapnp on them.

    python -m tests.fuzz._documents [--documents 100000] [--seed 19] [--out FILE]

Documents: every CRDT kind at the root and nested in maps down to ``MAX_NESTING_DEPTH``,
several replicas writing concurrently (multi-value registers, keys holding several kinds),
removes and clears (``Whole`` markers, element markers with no dots in deltas), values small
and big (int64 bounds, -0.0, unicode, 0-60 KiB text and bytes, 256-byte keys).

The check (``check``) for each document: pycapnp's decode of its packed bytes is the oracle;
the fast reader must accept it (both over pycapnp's checked copy, the production path, and
over the pure-Python ``unpack`` of the bytes) and build an equal document; the fast writer
must write pycapnp's segment byte for byte, and a sealed envelope must be byte-identical.
``tests/unit/test_fast_codec.py`` runs a CI budget of it; the command above runs the long
campaign and prints a summary (committed in ``bench/results/fast_codec_proof.md``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from broker.codec import Signer, WireCodec
from broker.codec._document import encode_document
from broker.codec._fast import FastPathError, read_document, unpack
from broker.codec._fast_write import write_document
from broker.codec._packed import segment_words
from broker.crdt import (
    MAX_NESTING_DEPTH,
    Causal,
    EWFlag,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    PNCounter,
)
from broker.errors import WorknodeError

T0 = 1_767_225_600_000 << 16
RIDS = ("r0", "node-1", "n" * 24, "B_2")
KEYS = ("a", "b", "total", "ü", "k" * 256, "zz", "0")
SIGNER = Signer("writer-1", b"w" * 32)


def _text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return rng.choice(("", "x", "tag-1", "Ada Lovelace", "ü∑€", "a\u00e9b"))
    if r < 0.95:
        return "".join(rng.choice("abcü€ 0") for _ in range(rng.randrange(1, 300)))
    return "y" * rng.randrange(1_000, 60_000)


def _bytes(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.6:
        return rng.choice((b"", b"\x00", b"\x89PNG", b"\xff" * 9))
    return rng.randbytes(rng.randrange(1, 2_000 if r < 0.95 else 60_000))


def _int(rng: random.Random) -> int:
    return rng.choice((0, 1, -1, 7, 1 << 40, (1 << 63) - 1, -(1 << 63), rng.randrange(-999, 999)))


def atom(rng: random.Random) -> Any:
    """A value a register can hold."""
    r = rng.randrange(6)
    if r == 0:
        return None
    if r == 1:
        return rng.random() < 0.5
    if r == 2:
        return _int(rng)
    if r == 3:
        return rng.choice((0.0, -0.0, 1.5, -1e308, 5e-324, rng.random()))
    if r == 4:
        return _text(rng)
    return _bytes(rng)


def element(rng: random.Random) -> Any:
    """A value a set can contain."""
    r = rng.randrange(3)
    return _int(rng) if r == 0 else _text(rng) if r == 1 else _bytes(rng)


def _path(rng: random.Random) -> tuple[str, ...]:
    depth = rng.choice((1, 1, 2, 2, 3, rng.randrange(1, MAX_NESTING_DEPTH + 1)))
    return tuple(rng.choice(KEYS[:4] if rng.random() < 0.8 else KEYS) for _ in range(depth))


def _map_op(rng: random.Random, m: ORMap, rid: str, t: int) -> ORMap:
    path = _path(rng)
    op = rng.randrange(11)
    if op < 3:
        return m.assign(rid, path, atom(rng), t)
    if op == 3:
        return m.assign_multi(rid, path, atom(rng))
    if op == 4:
        return m.increment(rid, path, rng.choice((1, 5, 1 << 40)))
    if op == 5:
        return m.add(rid, path, element(rng))
    if op == 6:
        return m.discard(rid, path, element(rng))
    if op == 7:
        return m.enable(rid, path)
    if op == 8:
        return m.disable(path)
    if op == 9:
        return m.remove(path[: rng.randrange(1, len(path) + 1)])
    return m.clear() if rng.random() < 0.1 else m.assign(rid, path, atom(rng), t)


def _leaf_op(rng: random.Random, c: Any, rid: str, t: int) -> Any:
    if isinstance(c, LWWRegister):
        return c.assign(rid, atom(rng), t)
    if isinstance(c, MVRegister):
        return c.assign(rid, atom(rng))
    if isinstance(c, PNCounter):
        n = rng.choice((1, 3, 1 << 40))
        return c.increment(rid, n) if rng.random() < 0.7 else c.decrement(rid, n)
    if isinstance(c, ORSet):
        r = rng.random()
        return c.add(rid, element(rng)) if r < 0.7 else c.clear() if r < 0.75 else c.remove(
            element(rng)
        )
    return c.enable(rid) if rng.random() < 0.7 else c.disable()


def wide(rng: random.Random, t: int, shape: int | None = None, n: int | None = None) -> ORMap:
    """A batch of many writes of one shape under short keys (the shapes the fast reader
    reads as columns: int registers, paths ending in one, one-entry counters, sets of short
    texts), sometimes with one write of another shape, key or value mixed in (the fast
    reader then reads the list entry by entry), from one or two replicas. ``shape``: 0-3
    (registers, paths, counters, set texts), else random; ``n``: the writes."""
    state, batch = ORMap(), ORMap(is_delta=True)
    shape = rng.randrange(4) if shape is None else shape
    n = rng.choice((rng.randrange(1, 12), rng.randrange(8, 70))) if n is None else n
    under = tuple(rng.choice(KEYS[:3]) for _ in range(rng.randrange(0, MAX_NESTING_DEPTH - 1)))
    odd = rng.randrange(n) if rng.random() < 0.3 else -1
    for i in range(n):
        rid = RIDS[rng.randrange(2)] if rng.random() < 0.2 else RIDS[1]
        key = rng.choice(("k" * 8, "ü" * 4, "é", "")) if i == odd else f"k{i}"
        if not key:
            key = f"k{i}"
        t += rng.randrange(1, 1 << 20)
        value: Any = _int(rng) if i != odd else atom(rng)
        if shape == 0:
            d = state.assign(rid, (*under, key), value, t)
        elif shape == 1:
            d = state.assign(rid, (*under, key, rng.choice(("total", "v", "ü"))), value, t)
        elif shape == 2:
            d = state.increment(rid, (*under, key), rng.choice((1, 7, 1 << 40)))
        else:
            text = f"t-{i}" if i != odd else _text(rng)
            d = state.add(rid, (*under, "tags"), text)
        state.merge(d)
        batch.merge(d)
    return batch if rng.random() < 0.7 else state


def documents(rng: random.Random) -> Iterator[Causal]:
    """An endless stream of states and delta batches (a few per history), with wide batches
    of one shape (``wide``) among them."""
    t = T0
    while True:
        if rng.random() < 0.15:
            t += 1 << 30
            yield wide(rng, t)
        cls = rng.choice((ORMap, ORMap, ORMap, LWWRegister, MVRegister, PNCounter, ORSet, EWFlag))
        replicas = [cls() for _ in range(rng.randrange(1, 4))]
        batch = cls(is_delta=True)
        deltas: list[Causal] = []
        for _ in range(rng.randrange(1, 25)):
            i = rng.randrange(len(replicas))
            rep, rid = replicas[i], RIDS[i]
            t += rng.randrange(1, 1 << 20)
            try:
                d = _map_op(rng, rep, rid, t) if cls is ORMap else _leaf_op(rng, rep, rid, t)
            except WorknodeError:  # a kind conflict, a too deep path: not a document
                continue
            rep.merge(d)
            batch.merge(d)
            deltas.append(d)
            if rng.random() < 0.2 and len(replicas) > 1:  # a sync between two replicas
                replicas[rng.randrange(len(replicas))].merge(rep)
        yield batch
        yield rng.choice(replicas)
        if deltas:
            yield rng.choice(deltas)
        if len(replicas) > 1:
            joined = replicas[0].copy()
            for r in replicas[1:]:
                joined.merge(r)
            yield joined


def check(fast: WireCodec, oracle: WireCodec, doc: Causal) -> None:
    """Raise AssertionError unless the fast codec reads ``doc`` exactly as pycapnp does (and
    by its fast path, not by falling back)."""
    packed = oracle.encode_document(doc)
    expected = oracle.decode_document(packed)
    parsed = fast.schema.crdt.Document.from_bytes_packed(
        packed, traversal_limit_in_words=fast.traversal_limit_words
    )
    got = fast.fast_decode(parsed, None, segment_words(packed))
    assert got is not None, "the fast path refused a valid document"
    assert got == expected, "the fast path read other content than pycapnp"
    assert got.is_delta == expected.is_delta
    words = unpack(packed)
    if words[:4] == b"\0\0\0\0":  # one segment (the fast reader refuses more: far pointers)
        raw = read_document(words, fast.schema.kinds)
        assert raw == expected, "the fast reader over unpack() read other content than pycapnp"
    assert fast.decode_document(packed) == expected
    # The fast writer: word for word pycapnp's segment (or a refusal, only past its first
    # segment), and so byte-identical packed documents and sealed envelopes.
    segments = encode_document(oracle.schema, doc).to_segments()
    try:
        segment = write_document(doc, fast.schema.kinds)
    except FastPathError:
        assert len(segments) > 1, "the fast writer refused a one-segment document"
    else:
        assert [segment] == segments, "the fast writer wrote other bytes than pycapnp"
    state = not doc.is_delta and len(packed) % 3 == 0
    sealed = fast.seal(SIGNER, subject="wn.t", hlc=1, sequence=1, document=doc, is_state=state)
    assert sealed == oracle.seal(SIGNER, subject="wn.t", hlc=1, sequence=1, document=doc,
                                 is_state=state), "a sealed envelope differs from pycapnp's"


def run(n: int, seed: int) -> dict[str, Any]:
    """Check ``n`` generated documents; a summary of what they covered."""
    fast, oracle = WireCodec(), WireCodec(fast=False)
    rng = random.Random(seed)
    kinds: dict[str, int] = {}
    deltas = 0
    start = time.perf_counter()
    for i, doc in zip(range(n), documents(rng), strict=False):
        try:
            check(fast, oracle, doc)
        except AssertionError as exc:
            raise AssertionError(f"document {i} (seed {seed}): {exc}") from exc
        kinds[type(doc).__name__] = kinds.get(type(doc).__name__, 0) + 1
        deltas += doc.is_delta
    return {"documents": n, "seed": seed, "by_type": kinds, "deltas": deltas,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the long campaign and print (or write) its summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--documents", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    s = run(args.documents, args.seed)
    text = (
        "# Fast codec: differential check on generated documents\n\n"
        f"Command: `python -m tests.fuzz._documents --documents {args.documents} "
        f"--seed {args.seed}`\n\n"
        f"- documents checked: {s['documents']:,} ({s['deltas']:,} deltas), all read by the "
        "fast path (pycapnp's checked copy and the pure-Python unpack) exactly as pycapnp "
        "reads them; the fast writer's segment byte-identical to pycapnp's for every one that "
        "fits pycapnp's first segment (the others: refused, written by pycapnp), and every "
        "sealed envelope byte-identical\n"
        f"- by root type: {', '.join(f'{k} {v:,}' for k, v in sorted(s['by_type'].items()))}\n"
        f"- time: {s['seconds']} s\n"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
