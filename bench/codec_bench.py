"""Wire codec benchmark: encode/decode rates against msgpack and orjson, bytes per operation
against pycrdt (Yjs) — all in the same run.

    python -m bench.codec_bench [--quick] [--out bench/results/codec.md]

Throughput sides run interleaved in rounds (order alternated each round), because these CPUs
change speed by about 2x every few seconds; each row reports the median over rounds and the
min-max, and the comparison rows the median of per-round ratios with their spread.

Bytes per operation are exact counts (no timing): batches of 1,000 operations encoded as one
delta batch, beside pycrdt's update for the equivalent operations in one transaction.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pycrdt

from broker.codec import Signer, TrustRoster, WireCodec
from broker.codec._document import decode_document, encode_document
from broker.codec._fast import read_holder, unpack
from broker.codec._fast_write import write_document
from broker.codec._packed import segment_words
from broker.crdt import CausalContext, HybridClock, ORMap
from broker.crdt._stores import CLASS_OF_KIND, KindStore, MapStore, SetStore, Whole

DEFAULT_OUT = Path("bench/results/codec.md")
RID = "node-1"
T_MS = 1_767_225_600_000
BATCH_OPS = 100  # a typical flush window's batch
BYTES_OPS = 1_000


# ------------------------------------------------------------------------------------------
# content


def typical_batch(history: int = 5_000) -> tuple[ORMap, ORMap]:
    """A replica with history, and a delta batch of BATCH_OPS mixed writes made after it:
    60% nested register sets (overwrites), 20% counter increments, 20% set adds."""
    clock = HybridClock()
    state = ORMap()
    for i in range(history):
        state.merge(
            state.assign(RID, ("orders", f"o{i % 500}", "total"), i, clock.now(physical_ms=T_MS))
        )
    batch = ORMap(is_delta=True)
    for i in range(BATCH_OPS):
        r = i % 5
        if r < 3:
            d = state.assign(RID, ("orders", f"o{i}", "total"), i * 7, clock.now(physical_ms=T_MS))
        elif r == 3:
            d = state.increment(RID, ("stats", f"c{i % 10}"), 1)
        else:
            d = state.add(RID, ("tags",), f"tag-{i}")
        state.merge(d)
        batch.merge(d)
    return state, batch


def plain(entry: Any) -> Any:
    """The same content as plain lists/dicts (what msgpack/orjson would carry instead)."""
    if entry is None:
        return None
    t = type(entry)
    if t is MapStore:
        return {k: plain(v) for k, v in entry.items()}
    if t is SetStore:
        return [[e, list(ds)] for e, ds in entry.items()]
    if t is KindStore:
        return {str(int(k)): plain(v) for k, v in entry.items()}
    if t is Whole:
        return {"whole": plain(entry.store)}
    return [int(entry.KIND), list(entry)]


def plain_doc(doc: ORMap) -> dict[str, Any]:
    ctx = doc.context
    return {
        "vv": ctx.version_vector,
        "cloud": {r: sorted(n for q, n in ctx.cloud if q == r) for r in {q for q, _ in ctx.cloud}},
        "delta": doc.is_delta,
        "root": plain(doc.store),
    }


_STORE_OF = {int(k): v for k, v in CLASS_OF_KIND.items()}


def from_plain(x: Any) -> Any:
    """The CRDT store of ``plain`` content (maps, dot functions and sets as the bench's batch
    has them), built without any validation: the least Python work that ends with the same
    objects (the floor for a decoder that builds them)."""
    if type(x) is dict:
        return MapStore({k: from_plain(v) for k, v in x.items()})
    if x and type(x[0]) is int:
        return _STORE_OF[x[0]](x[1])
    return SetStore({e: tuple(ds) for e, ds in x})


def crdt_from_msgpack(data: bytes) -> ORMap:
    """msgpack's decode of ``plain_doc`` content, then the same CRDT objects built from it."""
    d = msgpack.unpackb(data)
    # The cheapest construction of the same context (the fast reader's too).
    ctx = CausalContext.from_parts(d["vv"], {r: set(ns) for r, ns in d["cloud"].items()})
    return ORMap(from_plain(d["root"]), ctx, is_delta=d["delta"])


# ------------------------------------------------------------------------------------------
# throughput


@dataclass
class Series:
    name: str
    rates: list[float] = field(default_factory=list)


def _rate(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


FAST_DEC = "decode: worknode fast reader (packed, validated)"
PYCAPNP_DEC = "decode: worknode Cap'n Proto (packed, validated)"
FAST_OPEN = "open: worknode signed envelope, fast reader (verify + decode)"
FLOOR = "decode: msgpack + building the same CRDT objects (no validation)"
FAST_SEAL = "seal: worknode signed envelope, fast writer"
FAST_WRITE = "write the document's segment (unpacked): fast writer"
PYCAPNP_FILL = "write the document's segment (unpacked): pycapnp builder"


def throughput(rounds: int, batch_s: float) -> dict[str, Series]:
    _, batch = typical_batch()
    codec = WireCodec(fast=False)  # the pycapnp rows (the codec before the fast reader)
    fast = WireCodec()
    signer = Signer(RID, b"s" * 32)
    roster = TrustRoster({RID: signer.public_key})
    raw = codec.encode_document(batch)
    env = codec.seal(signer, subject="wn.bench.s", hlc=1, sequence=1, document=batch)
    content = plain_doc(batch)
    mp = msgpack.packb(content)
    oj = orjson.dumps(content)
    assert codec.decode_document(raw) == batch
    assert fast.decode_document(raw) == batch
    assert crdt_from_msgpack(mp) == batch
    kinds = fast.schema.kinds
    assert fast.seal(signer, subject="wn.bench.s", hlc=1, sequence=1, document=batch) == env
    sides: dict[str, Callable[[], object]] = {
        "encode: worknode Cap'n Proto (packed)": lambda: codec.encode_document(batch),
        "encode: msgpack": lambda: msgpack.packb(plain_doc(batch)),
        "encode: orjson": lambda: orjson.dumps(plain_doc(batch)),
        PYCAPNP_DEC: lambda: codec.decode_document(raw),
        FAST_DEC: lambda: fast.decode_document(raw),
        "decode: msgpack": lambda: msgpack.unpackb(mp),
        FLOOR: lambda: crdt_from_msgpack(mp),
        "decode: orjson": lambda: orjson.loads(oj),
        "seal: worknode signed envelope": lambda: codec.seal(
            signer, subject="wn.bench.s", hlc=1, sequence=1, document=batch
        ),
        "open: worknode signed envelope (verify + decode)": lambda: codec.open(env, roster),
        FAST_OPEN: lambda: fast.open(env, roster),
        FAST_SEAL: lambda: fast.seal(
            signer, subject="wn.bench.s", hlc=1, sequence=1, document=batch
        ),
        FAST_WRITE: lambda: write_document(batch, kinds),
        PYCAPNP_FILL: lambda: encode_document(codec.schema, batch),
    }
    sizes = {}
    for name, fn in sides.items():  # calibrate (and warm up)
        sizes[name] = max(5, int(_rate(fn, 20) * batch_s))
    series = {name: Series(name) for name in sides}
    names = list(sides)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else reversed(names):
            series[name].rates.append(_rate(sides[name], sizes[name]))
    return series


def breakdown(rounds: int, batch_s: float) -> dict[str, Series]:
    """Microseconds per 100-op batch of each decode step, interleaved like ``throughput``."""
    _, batch = typical_batch()
    fast = WireCodec()
    schema = fast.schema
    raw = fast.encode_document(batch)
    limit = fast.traversal_limit_words
    words = segment_words(raw)

    def parse() -> Any:
        return schema.crdt.Document.from_bytes_packed(raw, traversal_limit_in_words=limit)

    def copy(doc: Any) -> bytes:
        holder = schema.envelope.Envelope.new_message(num_first_segment_words=words + 512)
        holder.deltaBatch = doc
        return holder.to_segments()[0]  # type: ignore[no-any-return]

    doc = parse()
    seg = copy(doc)
    steps: dict[str, Callable[[], object]] = {
        "fast path 1. unpack: pycapnp parse (C++)": parse,
        "fast path 1+2. unpack + bounds-check: parse and checked copy to one segment (C++)": (
            lambda: copy(parse())  # a copy counts against its reader's traversal limit
        ),
        "fast path 3. parse + validate + build CRDT objects (Python, fused)": lambda: read_holder(
            seg, schema.kinds
        ),
        "pycapnp path: parse + field reads + validate + build": lambda: (
            decode_document(schema, parse())  # reads count against the reader's limit
        ),
        "reference: pure-Python unpack of the packed batch (not on the hot path)": lambda: (
            unpack(raw)
        ),
    }
    sizes = {name: max(5, int(_rate(fn, 20) * batch_s)) for name, fn in steps.items()}
    series = {name: Series(name) for name in steps}
    names = list(steps)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else reversed(names):
            series[name].rates.append(1e6 / _rate(steps[name], sizes[name]))
    return series


# ------------------------------------------------------------------------------------------
# bytes per operation


def _ormap_batch(op: str, n: int, prior: int) -> ORMap:
    clock = HybridClock()
    state = ORMap()
    for i in range(prior):
        state.merge(state.assign(RID, (f"k{i}",), i, clock.now(physical_ms=T_MS)))
    batch = ORMap(is_delta=True)
    for i in range(n):
        if op == "register":
            d = state.assign(RID, (f"k{i}",), i + 1, clock.now(physical_ms=T_MS + i // 10))
        elif op == "counter":
            d = state.increment(RID, (f"c{i}",), 1)
        else:
            d = state.add(RID, ("tags",), f"t{i}")
        state.merge(d)
        batch.merge(d)
    return batch


def _pycrdt_bytes(op: str, n: int, prior: int) -> int:
    doc = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    with doc.transaction():
        for i in range(prior):
            m[f"k{i}"] = i
    sv = doc.get_state()
    if op == "set":
        arr = doc.get("tags", type=pycrdt.Array)
        with doc.transaction():
            for i in range(n):
                arr.append(f"t{i}")
    else:
        with doc.transaction():
            for i in range(n):
                # Yjs has no counter: the equivalent write is setting the new count.
                key = f"k{i}" if op == "register" else f"c{i}"
                m[key] = i + 1
    return len(doc.get_update(sv))


@dataclass(frozen=True)
class BytesRow:
    label: str
    ops: int
    doc: float
    envelope: float
    compressed: float
    msgpack: float
    orjson: float
    pycrdt: float


def bytes_per_op() -> list[BytesRow]:
    signer = Signer(RID, b"s" * 32)
    mixed = WireCodec()  # peer_version 1: a cluster with v1 nodes, no compression
    upgraded = WireCodec(peer_version=2)
    rows = []
    cases = [
        ("register sets, new keys", "register", 0),
        ("register sets, overwriting 1,000 existing keys", "register", 1_000),
        ("counter increments (new counters)", "counter", 0),
        ("set adds (one set)", "set", 0),
    ]
    for label, op, prior in cases:
        for n in (BYTES_OPS, 1):
            batch = _ormap_batch(op, n, prior)
            content = plain_doc(batch)

            def env(codec: WireCodec, batch: ORMap = batch) -> int:
                return len(
                    codec.seal(signer, subject="wn.bench.s", hlc=1, sequence=1, document=batch)
                )

            rows.append(
                BytesRow(
                    label=label,
                    ops=n,
                    doc=len(mixed.encode_document(batch)) / n,
                    envelope=env(mixed) / n,
                    compressed=env(upgraded) / n,
                    msgpack=len(msgpack.packb(content)) / n,
                    orjson=len(orjson.dumps(content)) / n,
                    pycrdt=_pycrdt_bytes(op, n, prior) / n,
                )
            )
    return rows


# ------------------------------------------------------------------------------------------
# report


def _ratio_rows(series: dict[str, Series], a: str, b: str) -> tuple[float, float, float]:
    ratios = [x / y for x, y in zip(series[a].rates, series[b].rates, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(
    series: dict[str, Series],
    rows: list[BytesRow],
    argv: list[str],
    rounds: int,
    steps: dict[str, Series] | None = None,
) -> str:
    out = [
        "# worknode wire codec benchmark",
        "",
        "Command: `" + " ".join(["python -m bench.codec_bench", *argv]) + "`",
        "",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"{platform.platform()}",
        f"- Libraries: pycapnp (capnp), msgpack {msgpack.version}, orjson {orjson.__version__}, "
        f"pycrdt {getattr(pycrdt, '__version__', '?')}",
        "",
        f"## Throughput: a typical delta batch ({BATCH_OPS} ops: 60 nested register "
        "overwrites, 20 counter increments, 20 set adds, from a replica with history)",
        "",
        f"{rounds} interleaved rounds; messages/s (each message is the whole batch).",
        "",
        "| Side | Median msgs/s | Min - max | ops/s at median |",
        "|---|---:|---:|---:|",
    ]
    for s in series.values():
        med = statistics.median(s.rates)
        out.append(
            f"| {s.name} | {med:,.0f} | {min(s.rates):,.0f} - {max(s.rates):,.0f} | "
            f"{med * BATCH_OPS:,.0f} |"
        )
    out += ["", "| Comparison (per-round ratio) | Median | Min - max |", "|---|---:|---:|"]
    wn_enc, wn_dec = (
        "encode: worknode Cap'n Proto (packed)",
        ("decode: worknode Cap'n Proto (packed, validated)"),
    )
    for a, b in [
        (wn_enc, "encode: msgpack"),
        (wn_enc, "encode: orjson"),
        (wn_dec, "decode: msgpack"),
        (wn_dec, "decode: orjson"),
    ]:
        med, lo, hi = _ratio_rows(series, a, b)
        out.append(
            f"| {a.split(':')[0]}: worknode / {b.split(': ')[1]} | {med:.2f}x | "
            f"{lo:.2f}x - {hi:.2f}x |"
        )
    for a, b, label in [
        (FAST_DEC, "decode: msgpack", "decode (100-op batch): worknode fast reader / msgpack"),
        (FAST_DEC, "decode: orjson", "decode: worknode fast reader / orjson"),
        (FAST_DEC, PYCAPNP_DEC, "decode: fast reader / pycapnp"),
        (FAST_DEC, FLOOR, "decode: fast reader / floor (msgpack + the same CRDT objects)"),
        (FAST_OPEN, "open: worknode signed envelope (verify + decode)",
         "open: fast reader / pycapnp"),
        (FAST_SEAL, "seal: worknode signed envelope", "seal: fast writer / pycapnp"),
        (FAST_WRITE, PYCAPNP_FILL, "write the segment: fast writer / pycapnp builder"),
    ]:
        med, lo, hi = _ratio_rows(series, a, b)
        out.append(f"| {label} | {med:.2f}x | {lo:.2f}x - {hi:.2f}x |")
    if steps:
        out += [
            "",
            f"### Decode of the {BATCH_OPS}-op batch, per step (us per batch, {rounds} "
            "interleaved rounds)",
            "",
            "| Step | Median us | Min - max |",
            "|---|---:|---:|",
        ]
        for st_ in steps.values():
            out.append(
                f"| {st_.name} | {statistics.median(st_.rates):,.0f} | "
                f"{min(st_.rates):,.0f} - {max(st_.rates):,.0f} |"
            )
        out += [
            "",
            "The fast path lets pycapnp (C++) unpack and bounds-check the bytes (steps 1-2: "
            "parse, then a checked copy into one segment, which raises on a bad pointer; row "
            "1+2 is both), and "
            "reads the struct fields in Python with `struct.unpack_from` at offsets generated "
            "from the schemas (step 3; parsing, validation and building the CRDT objects are one "
            "pass there: each list in one `iter_unpack`, an int register, a path's last map "
            "or a one-entry counter in one wider read, and a wide list of one shape (the "
            "batch's 60 paths, its 20 set texts) as columns of words: its structural words "
            "compared with their only values (one masked big-int compare for a list under 2 "
            "KiB, else one memoryview compare per fixed column), C-level range checks, "
            "stores built by `map`/`zip`; all "
            "checked word for word against the layout of pycapnp's copy). Unpacking in pure "
            "Python (last row) would cost more than the pycapnp path it replaces: it is used "
            "only by tests and the fuzz targets. Sealing writes "
            "the document with the fast writer (pycapnp's segment word for word) and lets "
            "pycapnp copy it into the envelope and pack it; `encode_document` (packed bytes) "
            "still packs a pycapnp builder (packing in Python would cost more than it saves).",
        ]
    out += [
        "",
        "msgpack and orjson encode the same content as plain lists and dicts: no schema, no "
        "validation, no CRDT objects built on decode. worknode's decode validates every dot, "
        "key and value and builds the CRDT state ready to join. The floor row decodes the "
        "msgpack content and builds the same CRDT objects with the same constructors, "
        "unchecked (the context with `CausalContext.from_parts` from counters grouped by "
        "replica, as the fast reader builds it): the least Python work that ends with the "
        "objects a replica joins.",
        "",
        f"## Wire bytes per operation (batches of {BYTES_OPS:,} and of 1)",
        "",
        "| Operations | Ops per batch | Cap'n Proto document | Signed envelope (mixed "
        "v1/v2 cluster) | Signed envelope, zlib (all v2) | msgpack | orjson | pycrdt update |"
        " worknode (all v2) <= pycrdt? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "yes" if r.compressed <= r.pycrdt else "no"
        out.append(
            f"| {r.label} | {r.ops:,} | {r.doc:.1f} | {r.envelope:.1f} | {r.compressed:.1f} | "
            f"{r.msgpack:.1f} | {r.orjson:.1f} | {r.pycrdt:.1f} | {verdict} |"
        )
    out += [
        "",
        "Envelopes include the 64-byte Ed25519 signature, writer id, subject, clock and "
        "sequence. Compression (zlib, wire v2) is used only when every reader runs v2 "
        "(`WireCodec(peer_version=2)`) and the batch is at least 512 bytes, so single "
        "operations go uncompressed. pycrdt has no counter: its counter row sets the new "
        "count in a map. Target (issue 3): <= pycrdt's bytes per op for register/map sets in "
        "batches.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rounds, batch_s = (3, 0.02) if args.quick else (9, 0.3)
    series = throughput(rounds, batch_s)
    steps = breakdown(rounds, batch_s)
    rows = bytes_per_op()
    text = report(series, rows, list(argv if argv is not None else sys.argv[1:]), rounds, steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
