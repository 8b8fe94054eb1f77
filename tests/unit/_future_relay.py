"""Child process of ``test_future_schema.py``: a "future" release's data relayed by every
release this code reads, along every relay path, read back by the future release.

The future schema is the current one plus a ``Value`` member (``future @6 :Text``) and a
``Payload`` member (``future2 @6 :Value``, a dot-function kind 7). It is loaded with pycapnp
here, in a child process: the parent never loads a generated schema (a broken schema file
aborts the interpreter). Prints one JSON object: ``{"results": [[version, path, problem], ...]}``
(``problem`` empty when the relayed data reads back identical).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import capnp

from broker.codec import SUPPORTED_VERSIONS, WireCodec
from broker.crdt import ORMap
from broker.repair import subset
from schemas import CURRENT_DIR

HLC = 1_700_000_000_000 << 16
KEYS = ("a", "b", "k", "m", "s")


def future_schema(tmp: Path) -> Any:
    """Load the current schemas plus the future members, from copies under ``tmp``."""
    for f in CURRENT_DIR.glob("*.capnp"):
        (tmp / f.name).write_text(f.read_text())
    crdt = tmp / "crdt.capnp"
    text = crdt.read_text()
    value_end = "    data @5 :Data;         # at most 256 KiB\n"
    payload_end = "    flag @5 :Void;"
    assert value_end in text, "the schema changed: update this test"
    assert payload_end in text, "the schema changed: update this test"
    text = text.replace(value_end, value_end + "    future @6 :Text;\n")
    text = text.replace(payload_end, payload_end + "\n    future2 @6 :Value;")
    crdt.write_text(text)
    return capnp.SchemaParser().load(str(crdt), imports=[str(tmp)])


def future_document(fut: Any, delta: bool) -> bytes:
    """A document only the future release can fully read, with ordinary data beside it."""
    d = fut.Document.new_message()
    d.replicas = ["w"]
    v = d.init("context").init("versions", 1)[0]
    v.replica, v.counter = 0, 6
    root = d.init("root")
    root.kind = 5
    es = root.init("entries", 5)

    def items(e: Any, key: str, kind: int, n: int) -> Any:
        e.key, e.kind = key, kind
        it = e.init("items", 1)[0]
        it.replica, it.counter = 0, n
        return it.init("payload")

    p = items(es[0], "a", 1, 1).init("lww")  # a register holding a future value
    p.hlc = HLC
    p.init("value").future = "hello"
    p = items(es[1], "b", 1, 2).init("lww")  # an ordinary register beside it
    p.hlc = HLC
    p.init("value").int = 5
    items(es[2], "k", 7, 3).init("future2").int = 9  # a future kind
    items(es[3], "m", 2, 4).init("mv").future = "mv"  # a multi-value register
    es[4].key, es[4].kind = "s", 4  # a set holding an int and a future element
    els = es[4].init("elements", 2)
    for i, (n, setter) in enumerate(((5, "int"), (6, "future"))):
        setattr(els[i].init("value"), setter, 3 if setter == "int" else "x")
        dot = els[i].init("dots", 1)[0]
        dot.replica, dot.counter = 0, n
    d.delta = delta
    return d.to_bytes_packed()  # type: ignore[no-any-return]


def entries(fut: Any, data: bytes) -> dict[str, bytes | frozenset[bytes]]:
    """Each root entry of ``data`` as the future release reads it: packed bytes of the entry
    (a set's elements as a set: their order on the wire is free)."""
    doc = fut.Document.from_bytes_packed(data)
    out: dict[str, bytes | frozenset[bytes]] = {}
    for e in doc.root.entries:
        if e.which() == "elements":
            els = set()
            for el in e.elements:
                holder = fut.SetElement.new_message()
                holder.value = el.value
                holder.dots = el.dots
                els.add(holder.to_bytes_packed())
            out[e.key] = frozenset(els)
        else:
            holder = fut.Entry.new_message()
            holder.items = e.items
            out[e.key] = holder.to_bytes_packed()
    return out


def relays(codec: WireCodec, current: WireCodec) -> dict[str, Callable[[bytes], bytes]]:
    """Every way data passes through a node of ``codec``'s release, as functions of bytes."""

    def decoded(data: bytes) -> ORMap:
        doc = codec.decode_document(data, ORMap)
        assert isinstance(doc, ORMap)
        return doc

    def delta(data: bytes) -> bytes:  # re-signed into the node's own envelope
        signer_codec = codec
        env = signer_codec.open(
            signer_codec.seal(SIGNER, subject="s", hlc=1, sequence=1, document=decoded(data)),
            ROSTER, subject="s", keep_packed=True,
        )
        return env.packed_document

    def catchup(data: bytes) -> bytes:  # joined into the state, sent whole
        state = ORMap()
        state.merge(decoded(data))
        return codec.encode_document(state)

    def heal(data: bytes) -> bytes:  # fetched by the healer (current), pushed back, logged
        state = ORMap()
        state.merge(decoded(data))
        fetched = current.decode_document(codec.encode_document(subset(state, KEYS)))
        repaired = ORMap()
        repaired.merge(decoded(current.encode_document(fetched)))
        return codec.encode_document(repaired)

    def snapshot(data: bytes) -> bytes:  # stored, restarted, stored again
        state = ORMap()
        state.merge(decoded(data))
        return codec.encode_document(decoded(codec.encode_document(state)))

    return {"delta": delta, "catchup": catchup, "heal": heal, "snapshot": snapshot}


def oversized(fut: Any, version: int) -> str:
    """A future value above the bound of every known value type is refused by name, not
    kept: "" when it is."""
    from broker.crdt import MAX_VALUE_BYTES
    from broker.errors import MalformedMessageError

    d = fut.Document.new_message()
    d.replicas = ["w"]
    v = d.init("context").init("versions", 1)[0]
    v.replica, v.counter = 0, 1
    root = d.init("root")
    root.kind = 5
    e = root.init("entries", 1)[0]
    e.key, e.kind = "big", 1
    it = e.init("items", 1)[0]
    it.replica, it.counter = 0, 1
    p = it.init("payload").init("lww")
    p.hlc = HLC
    p.init("value").future = "x" * (MAX_VALUE_BYTES + 1000)
    try:
        WireCodec(version).decode_document(d.to_bytes_packed(), ORMap)
    except MalformedMessageError as exc:
        return "" if "'big'" in str(exc) and "newer type" in str(exc) else f"message: {exc}"
    return "accepted"


def rpc_relay(tmp: Path, version: int) -> str:
    """A future value in an RPC response's result, read by a ``version`` client and written
    back (a proxy): kept as an opaque value, returned unchanged; "" when it is."""
    from broker.crdt import OpaqueAtom
    from broker.rpc._protocol import decode_response, encode_response

    rpc = capnp.SchemaParser().load(str(tmp / "rpc.capnp"), imports=[str(tmp)])
    msg = rpc.RpcResponse.new_message()
    msg.version = 3
    args = msg.init("result", 2)
    args[0].name, args[1].name = "v", "n"
    args[0].init("value").future = "zzz"
    args[1].init("value").int = 4
    codec = WireCodec(version)
    response = decode_response(codec, msg.to_bytes_packed())
    if not isinstance(response.result.get("v"), OpaqueAtom) or response.result.get("n") != 4:
        return f"read as {response.result!r}"
    back = rpc.RpcResponse.from_bytes_packed(encode_response(codec, response))
    got = {a.name: a.value for a in back.result}
    if got["v"].which() != "future" or got["v"].future != "zzz" or got["n"].int != 4:
        return "written back differently"
    return ""


def main() -> int:
    global SIGNER, ROSTER
    from broker.codec import Signer, TrustRoster

    SIGNER = Signer("n", b"\x01" * 32)
    ROSTER = TrustRoster({"n": SIGNER.public_key})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fut = future_schema(Path(tmp))
        current = WireCodec()
        for delta in (False, True):
            data = future_document(fut, delta)
            want = entries(fut, data)
            for version in SUPPORTED_VERSIONS:
                codec = WireCodec(version)
                for name, relay in relays(codec, current).items():
                    path = f"{name}{' (delta)' if delta else ''}"
                    try:
                        got = entries(fut, relay(data))
                        problem = "" if got == want else (
                            f"differs: {sorted(k for k in want if got.get(k) != want[k])}"
                        )
                    except Exception as exc:  # the verdict, reported to the parent
                        problem = f"{type(exc).__name__}: {exc}"
                    results.append([version, path, problem])
        for version in SUPPORTED_VERSIONS:
            results.append([version, "oversized", oversized(fut, version)])
        for version in SUPPORTED_VERSIONS:
            try:
                problem = rpc_relay(Path(tmp), version)
            except Exception as exc:  # the verdict, reported to the parent
                problem = f"{type(exc).__name__}: {exc}"
            results.append([version, "rpc", problem])
    print(json.dumps({"results": results}))
    return 0


SIGNER: Any = None
ROSTER: Any = None

if __name__ == "__main__":
    sys.exit(main())
