"""Hostile bytes: random, truncated and mutated valid messages never crash or hang a reader.

Every failure must be a ``CodecError`` subclass; nothing else may escape. Envelope bodies are
re-signed by a trusted key after mutation so the mutated bytes reach the body decoder (the
signature check would otherwise stop them first, which is tested separately).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from broker.codec import CURRENT_VERSION, Signer, TrustRoster, WireCodec
from broker.crdt import ORMap, ORSet, PNCounter
from broker.crdt._causal import Causal
from broker.errors import CodecError

CASES = int(os.environ.get("WORKNODE_FUZZ_CASES", "25000"))
"""Cases in CI (seeded, the same every run); the README's long run sets 1,000,000."""
T0 = 1_700_000_000_000 << 16
SIGNER = Signer("fuzzer", b"f" * 32)
ROSTER = TrustRoster({"fuzzer": SIGNER.public_key})


def _seed_documents() -> list[Causal]:
    m = ORMap()
    batch = ORMap(is_delta=True)
    ops = [
        lambda: m.assign("r1", ("a",), "text", T0),
        lambda: m.assign("r2", ("n", "m", "o"), 2**62, T0 + 1),
        lambda: m.assign_multi("r3", ("mv",), b"\x00\xff"),
        lambda: m.increment("r1", ("c",), -7),
        lambda: m.add("r2", ("s",), "x"),
        lambda: m.add("r3", ("s",), 5),
        lambda: m.discard("r1", ("s",), "x"),
        lambda: m.assign("r1", ("f",), 1.5, T0 + 2),
        lambda: m.remove(("n", "m")),
    ]
    for op in ops:
        d = op()
        m.merge(d)
        batch.merge(d)
    s = ORSet()
    s.merge(s.add("r1", b"e"))
    c = PNCounter()
    c.merge(c.increment("r2", 3))
    return [m, batch, s, c]


def _mutations(rng: random.Random, seed: bytes) -> bytes:
    b = bytearray(seed)
    choice = rng.random()
    if choice < 0.1:
        return rng.randbytes(rng.randrange(0, 200))
    if choice < 0.25:
        return bytes(b[: rng.randrange(0, len(b))])
    for _ in range(rng.randrange(1, 6)):
        if not b:
            break
        op = rng.randrange(5)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
        elif op == 2:
            del b[i : i + rng.randrange(1, 9)]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
        else:  # copy a run of bytes elsewhere (splice pointers onto other pointers)
            j = rng.randrange(len(b))
            n = rng.randrange(1, 17)
            b[j : j + n] = b[i : i + n]
    return bytes(b)


@pytest.mark.slow
def test_decoders_survive_hostile_bytes() -> None:
    rng = random.Random(20261127)
    readers = [WireCodec(1), WireCodec(CURRENT_VERSION)]
    writer = WireCodec(CURRENT_VERSION, peer_version=2)
    docs = _seed_documents()
    doc_seeds = [r.encode_document(d) for r in readers for d in docs]
    bodies: list[bytes] = []
    for d in docs:
        for w in (WireCodec(1), writer):
            raw = w.seal(SIGNER, subject="wn.fuzz", hlc=T0, sequence=1, document=d, trace_id=b"")
            outer = w.schema.envelope.SignedEnvelope.from_bytes_packed(raw)
            bodies.append(bytes(outer.body))
    big = ORMap(is_delta=True)
    for i in range(200):
        big.merge(big.assign("r1", (f"k{i}",), i, T0 + i))
    compressed = writer.seal(SIGNER, subject="wn.fuzz", hlc=T0, sequence=1, document=big)
    bodies.append(bytes(writer.schema.envelope.SignedEnvelope.from_bytes_packed(compressed).body))

    def sealed(body: bytes) -> bytes:
        outer = writer.schema.envelope.SignedEnvelope.new_message()
        outer.signer = "fuzzer"
        outer.signature = SIGNER.sign(body)
        outer.body = body
        return outer.to_bytes_packed()  # type: ignore[no-any-return]

    targets: list[tuple[list[bytes], Callable[[WireCodec, bytes], object]]] = [
        (doc_seeds, lambda c, data: c.decode_document(data).value()),
        (bodies, lambda c, data: c.open(sealed(data), ROSTER).document.value()),
        ([sealed(b) for b in bodies], lambda c, data: c.open(data, ROSTER)),
    ]
    outcomes = {"ok": 0, "refused": 0}
    errors: dict[str, int] = {}
    for n in range(CASES):
        seeds, fn = targets[n % 3] if n % 10 else targets[n % 2]
        data = _mutations(rng, rng.choice(seeds))
        reader = readers[n % 2]
        try:
            fn(reader, data)
        except CodecError as exc:
            outcomes["refused"] += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        else:
            outcomes["ok"] += 1
    assert outcomes["ok"] + outcomes["refused"] == CASES
    assert outcomes["refused"] > CASES // 4  # the mutations really were hostile
    print(f"fuzz: {CASES} cases, {outcomes}, errors by class: {errors}")
