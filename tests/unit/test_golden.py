"""Golden vectors: every release's committed bytes decode with today's code, same digests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.codec import CURRENT_VERSION, SUPPORTED_VERSIONS, TrustRoster, WireCodec
from tests.golden.generate import SIGNER_ID, _plain, signer

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ROSTER = TrustRoster({SIGNER_ID: signer().public_key})
RELEASES = sorted(int(p.name[1:]) for p in GOLDEN.glob("v*") if (p / "manifest.json").exists())


def _vectors() -> list[tuple[int, str, dict[str, Any]]]:
    out = []
    for v in RELEASES:
        manifest = json.loads((GOLDEN / f"v{v}" / "manifest.json").read_text())
        out += [(v, name, entry) for name, entry in sorted(manifest["vectors"].items())]
    return out


def test_every_supported_release_has_vectors() -> None:
    assert list(SUPPORTED_VERSIONS) == RELEASES


@pytest.mark.parametrize(("release", "name", "entry"), _vectors())
def test_vector_decodes_with_current_code(release: int, name: str, entry: dict[str, Any]) -> None:
    raw = (GOLDEN / f"v{release}" / name).read_bytes()
    codec = WireCodec(CURRENT_VERSION)
    if entry["kind"] == "struct":
        module, _, struct = entry["struct"].partition(".")
        reader = getattr(getattr(codec.schema, module), struct).from_bytes_packed(raw)
        fields = _plain(reader.to_dict())
        # A newer reader sees every field the writer set, plus defaults for newer fields.
        for key, value in entry["fields"].items():
            assert fields[key] == value, key
        return
    if entry["kind"] == "envelope":
        env = codec.open(raw, ROSTER)
        assert env.version == release
        assert env.sequence == entry["sequence"]
        assert env.trace_id.hex() == entry["trace_id"]
        document = env.document
    else:
        document = codec.decode_document(raw)
    assert type(document).__name__ == entry["class"]
    assert document.is_delta == entry["delta"]
    assert document.digest().hex() == entry["digest"]
    assert _plain(document.value()) == entry["value"]


@pytest.mark.parametrize("name", ["delta_batch.env", "state.env", "map.doc"])
def test_v1_reader_reads_v2_vectors_and_passes_them_on(name: str) -> None:
    """The old direction: a v1 node reads v2 bytes (the flag kind stays opaque), and what it
    passes on decodes at v2 to the digest the v2 writer recorded."""
    v2 = GOLDEN / "v2"
    entry = json.loads((v2 / "manifest.json").read_text())["vectors"][name]
    raw = (v2 / name).read_bytes()
    old, new = WireCodec(1), WireCodec(2)
    document = (
        old.open(raw, ROSTER).document if name.endswith(".env") else (old.decode_document(raw))
    )
    passed_on = new.decode_document(old.encode_document(document))
    assert passed_on.digest().hex() == entry["digest"]
