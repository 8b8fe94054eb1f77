"""A microservice that reads a worknode subject's deltas with only nats-py, pycapnp and the
schema files — no worknode import. Copy it as a starting point.

    python examples/subscriber.py nats://127.0.0.1:4222 default demo [--count N]
        [--nkey SEED_FILE] [--tls-ca CA_FILE] [--tls-hostname NAME]

It subscribes to ``wn.<namespace>.delta.<subject>``, opens each ``SignedEnvelope``, decodes the
``Envelope`` body and its ``Document`` (inflating zlib-compressed batches), and prints one JSON
line per batch: writer, sequence, and every (path, kind, value) the batch carries. Signature
verification needs the writers' Ed25519 public keys and any Ed25519 library (pynacl,
cryptography); it is left out here to keep the dependency list to the two libraries above.

On a secured bus (README "Security") it connects as a reader: ``--nkey`` names its seed (a
32-byte file made by ``worknode keys add`` or an ``SU...`` nkey seed file; nats-py signs the
server's nonce with it, through its ``nkeys`` extra) and ``--tls-ca`` the CA that signed the
servers' certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import zlib
from pathlib import Path
from typing import Any

import capnp
import nats

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
KINDS = {1: "lww", 2: "mv", 3: "counter", 4: "set", 5: "map", 6: "flag"}

parser_ = capnp.SchemaParser()
crdt = parser_.load(str(SCHEMAS / "crdt.capnp"), imports=[str(SCHEMAS)])
envelope = parser_.load(str(SCHEMAS / "envelope.capnp"), imports=[str(SCHEMAS)])


def value(v: Any) -> Any:
    which = v.which()
    if which == "null":
        return None
    x = getattr(v, which)
    return bytes(x).hex() if which == "data" else x


def walk(entry: Any, path: list[str], replicas: list[str], out: list[dict[str, Any]]) -> None:
    kind = KINDS.get(entry.kind, f"kind-{entry.kind}")
    which = entry.which()
    if which == "entries":
        for child in entry.entries:
            walk(child, [*path, child.key], replicas, out)
        return
    row: dict[str, Any] = {"path": ".".join(path), "kind": kind, "whole": entry.whole}
    if which == "items":
        items = []
        for it in entry.items:
            p = it.payload
            w = p.which() if entry.kind in (1, 2, 3, 6) else "unknown"
            item: dict[str, Any] = {"writer": replicas[it.replica], "counter": it.counter}
            if w == "lww":
                item |= {"hlc": p.lww.hlc, "value": value(p.lww.value)}
            elif w == "mv":
                item["value"] = value(p.mv)
            elif w == "counter":
                item |= {"inc": p.counter.increments, "dec": p.counter.decrements}
            items.append(item)
        row["items"] = items
    elif which == "elements":
        row["elements"] = [value(e.value) for e in entry.elements if len(e.dots)]
        row["removed"] = [value(e.value) for e in entry.elements if not len(e.dots)]
    else:
        row["removed"] = True
    out.append(row)


def decode(data: bytes) -> dict[str, Any]:
    signed = envelope.SignedEnvelope.from_bytes_packed(data)
    env = envelope.Envelope.from_bytes_packed(bytes(signed.body))
    which = env.which()
    if which in ("deltaBatchZlib", "stateZlib"):
        doc = crdt.Document.from_bytes_packed(zlib.decompress(bytes(getattr(env, which))))
    else:
        doc = getattr(env, which)
    replicas = list(doc.replicas)
    rows: list[dict[str, Any]] = []
    walk(doc.root, [], replicas, rows)
    return {
        "writer": env.writer,
        "version": env.version,
        "sequence": env.sequence,
        "state": which.startswith("state"),
        "changes": rows,
    }


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("namespace")
    ap.add_argument("subject")
    ap.add_argument("--count", type=int, default=0, help="exit after N batches")
    ap.add_argument("--nkey", type=Path, help="this reader's seed file")
    ap.add_argument("--tls-ca", type=Path, help="CA of the servers' certificates")
    ap.add_argument("--tls-hostname", help="name in the server certificate, if not the URL's")
    args = ap.parse_args()
    options: dict[str, Any] = {}
    if args.nkey is not None:
        seed = args.nkey.read_bytes()
        if len(seed) == 32:  # a worknode key file: the raw Ed25519 seed
            import nkeys  # nats-py's dependency for nkey authentication

            seed = nkeys.encode_seed(seed, nkeys.PREFIX_BYTE_USER)
        options["nkeys_seed_str"] = seed.strip().decode()
    if args.tls_ca is not None:
        options["tls"] = ssl.create_default_context(cafile=str(args.tls_ca))
        options["tls_hostname"] = args.tls_hostname
    nc = await nats.connect(args.url, **options)
    done = asyncio.Event()
    seen = 0

    async def handler(msg: Any) -> None:
        nonlocal seen
        try:
            print(json.dumps(decode(msg.data), sort_keys=True), flush=True)
        except Exception as exc:  # a subscriber must survive bytes it cannot read
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    await nc.subscribe(f"wn.{args.namespace}.delta.{args.subject}", cb=handler)
    await nc.flush()
    print(json.dumps({"ready": True}), flush=True)
    await done.wait()
    await nc.drain()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
