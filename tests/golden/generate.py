"""Write the golden vectors of one wire release: ``python -m tests.golden.generate v2``.

Run once, when a release is frozen; never regenerate an existing release (the point of the
vectors is that old bytes stay readable). Refuses to overwrite unless ``--force``.
``--add`` writes only the vectors a release directory lacks (a message type or field the
generator learned to cover later), with their own ``manifest-N.json``; no existing file is
touched.

Each vector is a message as that release's writer produced it; the manifests record what a
reader must find in it: the document's digest and value for envelopes and documents, the
field dict for RPC and healer structs. Every message type of the release is covered, and
every field it added is set in some vector (``tests/golden/coverage.py`` says which).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.codec import Signer, WireCodec
from broker.crdt import EWFlag, LWWRegister, MVRegister, ORMap, ORSet, PNCounter
from broker.crdt._causal import Causal

HERE = Path(__file__).resolve().parent
T0 = 1_767_225_600_000 << 16  # 2026-01-01T00:00:00Z
SIGNER_ID = "golden-writer"
SIGNER_SEED = b"g" * 32
TRACE_ID = bytes(range(16))


def signer() -> Signer:
    return Signer(SIGNER_ID, SIGNER_SEED)


def _map_history(version: int) -> tuple[ORMap, ORMap]:
    """A state and the batch of every delta that built it, using each kind the release has."""
    state, batch = ORMap(), ORMap(is_delta=True)
    ops = [
        lambda: state.assign("n1", ("profile", "name"), "Ada Lovelace", T0 + 1),
        lambda: state.assign("n2", ("profile", "name"), "Ada", T0 + 2),
        lambda: state.assign("n1", ("profile", "born"), 1815, T0 + 3),
        lambda: state.assign("n1", ("profile", "score"), 0.5, T0 + 4),
        lambda: state.assign("n1", ("profile", "photo"), b"\x89PNG", T0 + 5),
        lambda: state.assign("n1", ("profile", "nick"), None, T0 + 6),
        lambda: state.assign("n1", ("profile", "active"), True, T0 + 7),
        lambda: state.assign_multi("n2", ("status",), "draft"),
        lambda: state.assign_multi("n3", ("status",), "review"),
        lambda: state.increment("n1", ("stats", "views"), 40),
        lambda: state.increment("n2", ("stats", "views"), -3),
        lambda: state.add("n1", ("tags",), "math"),
        lambda: state.add("n2", ("tags",), 42),
        lambda: state.add("n3", ("tags",), b"\x00raw"),
        lambda: state.discard("n1", ("tags",), "math"),
        lambda: state.assign("n3", ("a", "b", "c", "d", "e", "f", "g", "leaf"), "deep", T0 + 8),
        lambda: state.assign("n1", ("gone",), "soon", T0 + 9),
        lambda: state.remove(("gone",)),
        lambda: state.increment("n3", ("both",), 1),
    ]
    if version >= 2:
        ops += [
            lambda: state.enable("n1", ("flags", "beta")),
            lambda: state.enable("n2", ("flags", "dark")),
            lambda: state.disable(("flags", "dark")),
        ]
    for op in ops:
        d = op()
        state.merge(d)
        batch.merge(d)
    # A kind conflict: the same key created concurrently as a register and a counter.
    other = ORMap()
    d = other.assign("n2", ("both",), "text", T0 + 10)
    state.merge(d)
    batch.merge(d)
    return state, batch


def _documents(version: int) -> dict[str, Causal]:
    lww = LWWRegister()
    lww.merge(lww.assign("n1", "v", T0))
    mv = MVRegister()
    mv.merge(mv.assign("n1", 1))
    mv.merge(MVRegister().assign("n2", 2))
    counter = PNCounter()
    counter.merge(counter.increment("n1", 5))
    counter.merge(counter.decrement("n2", 2))
    oset = ORSet()
    oset.merge(oset.add("n1", "x"))
    oset.merge(oset.add("n2", 7))
    docs: dict[str, Causal] = {"lww": lww, "mv": mv, "counter": counter, "set": oset}
    if version >= 2:
        flag = EWFlag()
        flag.merge(flag.enable("n1"))
        docs["flag"] = flag
    return docs


def _plain(obj: Any) -> Any:
    """JSON-friendly form of a value or a struct dict (bytes as hex, sets sorted)."""
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=repr)
    return obj


def _rpc_and_healer(codec: WireCodec, state: ORMap) -> dict[str, tuple[str, bytes]]:
    rpc, healer = codec.schema.rpc, codec.schema.healer
    req = rpc.RpcRequest.new_message()
    req.version = codec.version
    req.worknode = "orders-42"
    req.method = "state.read"
    args = req.init("arguments", 2)
    args[0].name = "path"
    args[0].value.text = "profile.name"
    args[1].name = "limit"
    args[1].value.int = 10
    req.token = b"\x01biscuit-token-bytes"
    req.deadlineMs = 2500
    req.callDepth = 1
    req.traceId = TRACE_ID
    resp = rpc.RpcResponse.new_message()
    resp.version = codec.version
    resp.status = "permissionDenied"
    resp.message = "token does not grant state.read on orders-42"
    resp.traceId = TRACE_ID
    root = healer.RootReply.new_message()
    root.subject = "wn.prod.orders"
    root.root = bytes(32)
    root.itemCount = 3
    vv = root.init("versions")
    vv.init("replicas", 2)[0] = "n1"
    vv.replicas[1] = "n2"
    vv.init("counters", 2)[0] = 7
    vv.counters[1] = 9
    if codec.version >= 3:
        root.scheme = 2
        root.fanout = 16
        root.depth = 4
        root.levelCount = 1
        root.levels = bytes(range(16)) * 8  # 16 level-1 values of 8 bytes
    report = healer.HealReport.new_message()
    report.subject = "wn.prod.orders"
    report.init("replicas", 2)[0] = "n1"
    report.replicas[1] = "n2"
    report.init("rootsBefore", 2)[0] = b"\x01" * 32
    report.rootsBefore[1] = b"\x02" * 32
    report.init("rootsAfter", 2)[0] = b"\x03" * 32
    report.rootsAfter[1] = b"\x03" * 32
    report.keysRepaired = 2
    report.bytesSent = 512
    report.roundTrips = 4
    report.durationMs = 35
    report.converged = True
    del state
    return {
        "rpc_request": ("rpc.RpcRequest", req.to_bytes_packed()),
        "rpc_response": ("rpc.RpcResponse", resp.to_bytes_packed()),
        "root_reply": ("healer.RootReply", root.to_bytes_packed()),
        "heal_report": ("healer.HealReport", report.to_bytes_packed()),
        **_more_messages(codec),
    }


def _small_state() -> ORMap:
    """A two-key OR-map state, the content of healer and RPC messages that carry one."""
    state = ORMap()
    state.merge(state.assign("n1", ("order-1", "total"), 120, T0 + 1))
    state.merge(state.assign("n2", ("order-2", "total"), 80, T0 + 2))
    return state


def _more_messages(codec: WireCodec) -> dict[str, tuple[str, bytes]]:
    """Every other healer and RPC message, each with every field its release has set
    (added for issue 14: before, 7 message types per release had vectors)."""
    rpc, healer, v = codec.schema.rpc, codec.schema.healer, codec.version
    state = _small_state()
    subject = "wn.prod.orders"

    def with_state(message: Any) -> Any:
        message.state = codec.schema.crdt.Document.from_bytes_packed(
            codec.encode_document(state))
        return message

    rr = healer.RootRequest.new_message(subject=subject)
    if v >= 3:
        rr.levels = 2
        rr.hashBytes = 6
        rr.levelsUnless = b"\x5a" * 32
    nr = healer.NodeHashesRequest.new_message(subject=subject)
    nr.init("prefixes", 2)[0] = b""
    nr.prefixes[1] = b"\x03\x0a"
    if v >= 3:
        nr.hashBytes = 6
        nr.digestsOnly = True
        nr.prefixLevel = 2
        nr.packedPrefixes = bytes([0, 3, 0, 10])
    nh = healer.NodeHashesReply.new_message(subject=subject)
    nodes = nh.init("nodes", 2)
    for i, node in enumerate(nodes):
        node.prefix = bytes([i])
        node.hash = bytes([0x10 + i]) * 32
        node.count = 100 + i
    if v >= 3:
        nh.hashes = bytes(range(6)) * 16
    lr = healer.LeafItemsReply.new_message(subject=subject)
    items = lr.init("items", 2)
    for i, item in enumerate(items):
        item.key = f"order-{i + 1}"
        item.digest = bytes([0x20 + i]) * 32
    if v >= 3:
        lr.packedItems = (2).to_bytes(4, "big") + b"".join(
            len(k).to_bytes(2, "big") + k + bytes([0x20 + i]) * 6
            for i, k in enumerate((b"order-1", b"order-2")))
    fr = healer.FetchStatesRequest.new_message(subject=subject)
    fr.init("keys", 2)[0] = "order-1"
    fr.keys[1] = "order-2"
    if v >= 3:
        fr.items = (7).to_bytes(4, "big") + b"\x21" * 4
        fr.hashBytes = 4
    sr = with_state(healer.StatesReply.new_message(subject=subject))
    ar = with_state(healer.ApplyStatesRequest.new_message(subject=subject))
    ap = healer.ApplyStatesReply.new_message(subject=subject, root=b"\x77" * 32, applied=2)
    req = rpc.RpcRequest.new_message(version=v, worknode="orders-42", method="state.write",
                                     token=b"\x01biscuit", deadlineMs=900, callDepth=2,
                                     traceId=TRACE_ID)
    arg = req.init("arguments", 1)[0]
    arg.name = "note"
    arg.value.data = b"\x00\x01"
    req.delta = codec.schema.crdt.Document.from_bytes_packed(codec.encode_document(
        ORMap(is_delta=True).assign("n1", ("order-3", "total"), 5, T0 + 3)))
    resp = with_state(rpc.RpcResponse.new_message(version=v, status="ok", traceId=TRACE_ID))
    result = resp.init("result", 2)
    result[0].name = "count"
    result[0].value.int = 2
    result[1].name = "missing"
    result[1].value.null = None
    return {
        "root_request": ("healer.RootRequest", rr.to_bytes_packed()),
        "node_hashes_request": ("healer.NodeHashesRequest", nr.to_bytes_packed()),
        "node_hashes_reply": ("healer.NodeHashesReply", nh.to_bytes_packed()),
        "leaf_items_reply": ("healer.LeafItemsReply", lr.to_bytes_packed()),
        "fetch_states_request": ("healer.FetchStatesRequest", fr.to_bytes_packed()),
        "states_reply": ("healer.StatesReply", sr.to_bytes_packed()),
        "apply_states_request": ("healer.ApplyStatesRequest", ar.to_bytes_packed()),
        "apply_states_reply": ("healer.ApplyStatesReply", ap.to_bytes_packed()),
        "rpc_request_delta": ("rpc.RpcRequest", req.to_bytes_packed()),
        "rpc_response_result": ("rpc.RpcResponse", resp.to_bytes_packed()),
    }


def build(version: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every vector of release ``version`` (file name -> bytes) and the manifest of all."""
    codec = WireCodec(version)
    compressing = WireCodec(version, peer_version=version)
    s = signer()
    state, batch = _map_history(version)
    manifest: dict[str, Any] = {"version": version, "signer": SIGNER_ID, "vectors": {}}
    files: dict[str, bytes] = {}

    def doc_entry(kind: str, document: Causal) -> dict[str, Any]:
        return {
            "kind": kind,
            "class": type(document).__name__,
            "delta": document.is_delta,
            "digest": document.digest().hex(),
            "value": _plain(document.value()),
        }

    trace = TRACE_ID if version >= 2 else b""
    files["delta_batch.env"] = codec.seal(
        s, subject="wn.prod.orders", hlc=T0 + 100, sequence=1, document=batch, trace_id=trace
    )
    manifest["vectors"]["delta_batch.env"] = doc_entry("envelope", batch) | {
        "sequence": 1,
        "trace_id": trace.hex(),
    }
    files["state.env"] = codec.seal(
        s, subject="wn.prod.orders", hlc=T0 + 101, sequence=2, document=state, is_state=True
    )
    manifest["vectors"]["state.env"] = doc_entry("envelope", state) | {
        "sequence": 2,
        "trace_id": "",
    }
    if version >= 2:
        big = ORMap(is_delta=True)
        for i in range(200):
            big.merge(big.assign("n1", (f"order-{i:04d}", "total"), i * 100, T0 + i))
        files["delta_batch_zlib.env"] = compressing.seal(
            s, subject="wn.prod.orders", hlc=T0 + 102, sequence=3, document=big
        )
        manifest["vectors"]["delta_batch_zlib.env"] = doc_entry("envelope", big) | {
            "sequence": 3,
            "trace_id": "",
        }
        big_state = ORMap()
        for i in range(200):
            big_state.merge(big_state.assign("n2", (f"item-{i:04d}",), f"v{i}", T0 + i))
        files["state_zlib.env"] = compressing.seal(
            s, subject="wn.prod.orders", hlc=T0 + 103, sequence=4, document=big_state,
            is_state=True,
        )
        manifest["vectors"]["state_zlib.env"] = doc_entry("envelope", big_state) | {
            "sequence": 4,
            "trace_id": "",
        }
    for name, document in _documents(version).items():
        files[f"{name}.doc"] = codec.encode_document(document)
        manifest["vectors"][f"{name}.doc"] = doc_entry("document", document)
    files["map.doc"] = codec.encode_document(state)
    manifest["vectors"]["map.doc"] = doc_entry("document", state)
    for name, (struct, raw) in _rpc_and_healer(codec, state).items():
        files[f"{name}.bin"] = raw
        module, _, struct_name = struct.partition(".")
        reader = getattr(getattr(codec.schema, module), struct_name).from_bytes_packed(raw)
        manifest["vectors"][f"{name}.bin"] = {
            "kind": "struct",
            "struct": struct,
            "fields": _plain(reader.to_dict()),
        }
    return files, manifest


def generate(version: int, out: Path) -> dict[str, Any]:
    """Write release ``version``'s vectors into ``out``; return the manifest."""
    files, manifest = build(version)
    out.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (out / name).write_bytes(raw)
    _write_manifest(out / "manifest.json", manifest)
    return manifest


def add_missing(version: int, out: Path) -> tuple[Path, dict[str, Any]] | None:
    """Write only the vectors ``out`` lacks, with a new ``manifest-N.json`` listing them;
    never touch an existing file. None when nothing is missing."""
    files, manifest = build(version)
    listed = set()
    for existing in out.glob("manifest*.json"):
        listed |= set(json.loads(existing.read_text())["vectors"])
    missing = sorted(n for n in files if n not in listed and not (out / n).exists())
    if not missing:
        return None
    n = 2
    while (out / f"manifest-{n}.json").exists():
        n += 1
    path = out / f"manifest-{n}.json"
    added = manifest | {"vectors": {k: manifest["vectors"][k] for k in missing}}
    for name in missing:
        (out / name).write_bytes(files[name])
    _write_manifest(path, added)
    return path, added


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("release", help="release to write, e.g. v2")
    parser.add_argument("--force", action="store_true", help="overwrite an existing release")
    parser.add_argument("--add", action="store_true",
                        help="write only the vectors the release lacks (never overwrites)")
    args = parser.parse_args(argv)
    version = int(args.release.lstrip("v"))
    out = HERE / f"v{version}"
    if args.add:
        result = add_missing(version, out)
        if result is None:
            print(f"{out}: nothing missing")
        else:
            print(f"wrote {len(result[1]['vectors'])} vectors to {out} ({result[0].name})")
        return 0
    if (out / "manifest.json").exists() and not args.force:
        print(f"{out} exists: golden vectors of a release are never regenerated", file=sys.stderr)
        return 1
    manifest = generate(version, out)
    print(f"wrote {len(manifest['vectors'])} vectors to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
