"""The frozen releases stay frozen, and the shipped schemas load and cover what they must."""

from __future__ import annotations

import hashlib

from broker.codec import CURRENT_VERSION, SUPPORTED_VERSIONS, load_schema
from schemas import CURRENT_DIR, FILES, RELEASES_DIR, release_dir

FROZEN = {
    "v1/crdt.capnp": "0ee01a0a7e1f2ff910b9ef92218844d75b16c885d8d84db4688d7bad27a8478e",
    "v1/envelope.capnp": "d5608cf18322db84db949c33a6ec49055f599ca44f39359f20031464a2a22baf",
    "v1/healer.capnp": "4137c579828dcfbc8dcdb529594de9b1548c32228d9c2121f848f46aedc957f3",
    "v1/rpc.capnp": "e148423a8e8511b83af520e8870fc7d5c0b60464dcc4b72aa571267323839466",
    "v2/crdt.capnp": "faf1882a905b044a959c47fde5215b11a66259d469da0bd9501423a42709dd00",
    "v2/envelope.capnp": "d58b898e191f401f5e8d50e35a902790cff1e1a87cdcdcc2d5fc8f2db5959299",
    "v2/healer.capnp": "4137c579828dcfbc8dcdb529594de9b1548c32228d9c2121f848f46aedc957f3",
    "v2/rpc.capnp": "e148423a8e8511b83af520e8870fc7d5c0b60464dcc4b72aa571267323839466",
    "v3/crdt.capnp": "faf1882a905b044a959c47fde5215b11a66259d469da0bd9501423a42709dd00",
    "v3/envelope.capnp": "d58b898e191f401f5e8d50e35a902790cff1e1a87cdcdcc2d5fc8f2db5959299",
    "v3/healer.capnp": "ece1554fb073dcf6d3573bc32f806a216855c8a29ca2b28e03508907692ea1c6",
    "v3/rpc.capnp": "e148423a8e8511b83af520e8870fc7d5c0b60464dcc4b72aa571267323839466",
}


def test_frozen_release_files_are_unchanged() -> None:
    present = {
        f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in RELEASES_DIR.glob("v*/*.capnp")
    }
    assert present == FROZEN


def test_every_supported_version_has_a_release_and_loads() -> None:
    assert sorted({k.split("/")[0] for k in FROZEN}) == [f"v{v}" for v in SUPPORTED_VERSIONS]
    for v in SUPPORTED_VERSIONS:
        assert sorted(p.name for p in release_dir(v).glob("*.capnp")) == sorted(FILES)
        schema = load_schema(v)
        assert schema.version == v
        for struct in ("SignedEnvelope", "Envelope"):
            assert hasattr(schema.envelope, struct)
        for struct in ("RpcRequest", "RpcResponse", "StatusCode"):
            assert hasattr(schema.rpc, struct)
        for struct in ("RootReply", "NodeHashesReply", "LeafItemsReply", "HealReport"):
            assert hasattr(schema.healer, struct)


def test_current_schemas_are_the_newest_release() -> None:
    # Between releases, schemas/ may run ahead as CURRENT_VERSION = newest + 1 (no dir yet).
    if not release_dir(CURRENT_VERSION).exists():
        assert release_dir(CURRENT_VERSION - 1).exists()
        return
    for name in FILES:
        current = (CURRENT_DIR / name).read_bytes()
        assert current == (release_dir(CURRENT_VERSION) / name).read_bytes(), name
