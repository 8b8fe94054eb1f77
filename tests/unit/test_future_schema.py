"""Extensible means relayed intact: data of a future release (a new ``Value`` member, a new
``Payload`` member) passes through a node of every release this code reads, along every
relay path (delta re-signed, catch-up state, heal fetch and repair, snapshot and restore),
and the future release reads it back identical; so does a future value in an RPC result
passed on by an older client. The unknown value costs nothing else in the batch: the
ordinary register beside it is read as usual.

The future schema is generated and loaded in a child process (``_future_relay``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker.codec import SUPPORTED_VERSIONS

ROOT = Path(__file__).resolve().parents[2]


def test_future_values_and_kinds_survive_every_release_and_relay_path() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit._future_relay"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    paths = {"delta", "catchup", "heal", "snapshot", "rpc", "oversized"}
    assert {(v, p.split()[0]) for v, p, _ in results} == {
        (v, p) for v in SUPPORTED_VERSIONS for p in paths
    }
    failed = [r for r in results if r[2]]
    assert not failed, failed


def test_an_opaque_value_is_never_built_by_a_local_write() -> None:
    """Only the codec makes one (from bytes it copied); it is a value like any other for
    joins and digests, tagged apart from every known type."""
    import pytest

    from broker.crdt import LWWRegister, OpaqueAtom
    from broker.crdt._atoms import encode_atom
    from broker.errors import InvalidValueError

    a, b = OpaqueAtom(b"\x01\x02"), OpaqueAtom(b"\x01\x02")
    assert a == b
    assert hash(a) == hash(b)
    assert a != OpaqueAtom(b"\x01")
    assert a != b"\x01\x02"
    assert encode_atom(a) != encode_atom(b"\x01\x02")
    with pytest.raises(InvalidValueError, match="unsupported value type OpaqueAtom"):
        LWWRegister().assign("r", a, 1)  # type: ignore[arg-type]


def test_a_set_element_written_twice_has_the_union_of_its_dots() -> None:
    """Not a refusal of the whole state: an older reader keeps two opaque encodings of one
    newer value apart, and a newer reader must still read what that reader relays."""
    from broker.codec import WireCodec
    from broker.crdt import ORMap

    codec = WireCodec()
    d = codec.schema.crdt.Document.new_message()
    d.replicas = ["w"]
    v = d.init("context").init("versions", 1)[0]
    v.replica, v.counter = 0, 3
    root = d.init("root")
    root.kind = 5
    e = root.init("entries", 1)[0]
    e.key, e.kind = "s", 4
    els = e.init("elements", 2)
    for i, dots in enumerate(((1, 3), (2, 3))):
        els[i].init("value").int = 7
        ds = els[i].init("dots", len(dots))
        for j, n in enumerate(dots):
            ds[j].replica, ds[j].counter = 0, n
    doc = codec.decode_document(d.to_bytes_packed(), ORMap)
    assert doc.value() == {"s": frozenset({7})}
    assert doc.store["s"][7] == ("w", 1, "w", 2, "w", 3)


def test_worknode_call_prints_values_of_a_newer_type() -> None:
    import json

    from broker.crdt import OpaqueAtom
    from services.worknode._rpc_cli import _jsonable

    assert json.loads(json.dumps(_jsonable({"v": OpaqueAtom(b"\x01")}))) == {
        "v": {"opaque_value": "01"}}
