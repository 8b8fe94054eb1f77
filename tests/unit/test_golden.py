"""Golden vectors: every release's committed bytes, read by every release's reader.

- Coverage, computed from the schemas: every message type of every release has a vector,
  and every field a release added is set in one of its vectors (a gap fails).
- Newer readers on older vectors: every field the writer set reads back; documents decode to
  the recorded digest and value.
- Older readers on newer vectors: every field the older reader knows reads back; a document
  read by the older reader and passed on decodes at the writer's version to the writer's
  digest. The one documented exception: a zlib body (v2) is only written when every reader
  runs v2 or later, and a v1 reader refuses it cleanly (``UnsupportedContentError``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.codec import SUPPORTED_VERSIONS, TrustRoster, WireCodec, load_schema
from broker.errors import UnsupportedContentError
from tests.golden.coverage import added_fields, fields_set, message_types
from tests.golden.generate import SIGNER_ID, _plain, signer

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ROSTER = TrustRoster({SIGNER_ID: signer().public_key})
RELEASES = sorted(int(p.name[1:]) for p in GOLDEN.glob("v*") if (p / "manifest.json").exists())
ZLIB = frozenset({"delta_batch_zlib.env", "state_zlib.env"})
OLDER_READER_REFUSES = {("flag.doc", 1)}
"""(vector, reader) an older reader refuses cleanly today (``UnsupportedContentError``): a
document whose *root* is a flag (kind 6, v2) has no v1 representation. Items of an unknown
kind inside a map stay opaque and pass on (``delta_batch.env``, ``map.doc``). Whether a v1
reader should carry an unknown root kind is the wire contract's decision (issue 14)."""


def _manifest(release: int) -> dict[str, dict[str, Any]]:
    """Every vector of a release, from its manifest and the ones ``--add`` wrote later."""
    vectors: dict[str, dict[str, Any]] = {}
    for path in sorted((GOLDEN / f"v{release}").glob("manifest*.json")):
        manifest = json.loads(path.read_text())
        assert manifest["version"] == release, path
        for name, entry in manifest["vectors"].items():
            assert name not in vectors, f"{path}: {name} listed twice"
            vectors[name] = entry
    return vectors


def _vectors() -> list[tuple[int, str, dict[str, Any]]]:
    return [(v, name, entry) for v in RELEASES for name, entry in sorted(_manifest(v).items())]


def _struct_of(entry: dict[str, Any]) -> str:
    if entry["kind"] == "struct":
        return str(entry["struct"])
    return "envelope.SignedEnvelope" if entry["kind"] == "envelope" else "crdt.Document"


def test_every_supported_release_has_vectors() -> None:
    assert list(SUPPORTED_VERSIONS) == RELEASES


@pytest.mark.parametrize("release", RELEASES)
def test_every_file_is_listed_once(release: int) -> None:
    files = {p.name for p in (GOLDEN / f"v{release}").iterdir()
             if not p.name.startswith("manifest")}
    assert files == set(_manifest(release))


@pytest.mark.parametrize("release", RELEASES)
def test_every_message_type_has_a_vector(release: int) -> None:
    types = message_types(release)
    covered = {_struct_of(e) for e in _manifest(release).values()}
    if any(e["kind"] == "envelope" for e in _manifest(release).values()):
        covered |= {"envelope.Envelope", "crdt.Document"}
    assert len(types) >= 15  # 1 document, 2 envelope, 2 RPC, 10 healer messages in v1
    assert sorted(types - covered) == []


@pytest.mark.parametrize("release", RELEASES)
def test_every_field_the_release_added_is_set_in_a_vector(release: int) -> None:
    schema = load_schema(release)
    found: set[str] = set()
    for name, entry in _manifest(release).items():
        raw = (GOLDEN / f"v{release}" / name).read_bytes()
        found |= fields_set(schema, raw, _struct_of(entry))
    added = added_fields(release)
    assert added  # every release adds something
    assert sorted(added - found) == []


def _read_envelope_document(reader: int, raw: bytes) -> Any:
    env = WireCodec(reader).open(raw, ROSTER)
    return env, env.document


def _restricted(read: Any, recorded: Any) -> bool:
    """Whether what an older reader read equals what was recorded, on the fields it knows."""
    if isinstance(read, dict):
        return isinstance(recorded, dict) and all(
            k in recorded and _restricted(v, recorded[k]) for k, v in read.items())
    if isinstance(read, list):
        return isinstance(recorded, list) and len(read) == len(recorded) and all(
            _restricted(x, y) for x, y in zip(read, recorded, strict=True))
    return bool(read == recorded)


def _pairs(newer_readers: bool) -> list[tuple[int, int, str, dict[str, Any]]]:
    return [
        (release, reader, name, entry)
        for release, name, entry in _vectors()
        for reader in SUPPORTED_VERSIONS
        if (reader >= release if newer_readers else reader < release)
    ]


@pytest.mark.parametrize(("release", "reader", "name", "entry"), _pairs(newer_readers=True))
def test_newer_reader_reads_older_vector(release: int, reader: int, name: str,
                                         entry: dict[str, Any]) -> None:
    raw = (GOLDEN / f"v{release}" / name).read_bytes()
    codec = WireCodec(reader)
    if entry["kind"] == "struct":
        module, _, struct = entry["struct"].partition(".")
        fields = _plain(getattr(getattr(codec.schema, module), struct)
                        .from_bytes_packed(raw).to_dict())
        # A newer reader sees every field the writer set, plus defaults for newer fields.
        for key, value in entry["fields"].items():
            assert fields[key] == value, key
        return
    if entry["kind"] == "envelope":
        env, document = _read_envelope_document(reader, raw)
        assert env.version == release
        assert env.sequence == entry["sequence"]
        assert env.trace_id.hex() == entry["trace_id"]
    else:
        document = codec.decode_document(raw)
    assert type(document).__name__ == entry["class"]
    assert document.is_delta == entry["delta"]
    assert document.digest().hex() == entry["digest"]
    assert _plain(document.value()) == entry["value"]


@pytest.mark.parametrize(("release", "reader", "name", "entry"), _pairs(newer_readers=False))
def test_older_reader_reads_newer_vector_and_passes_it_on(
        release: int, reader: int, name: str, entry: dict[str, Any]) -> None:
    raw = (GOLDEN / f"v{release}" / name).read_bytes()
    old, writer = WireCodec(reader), WireCodec(release)
    if entry["kind"] == "struct":
        module, _, struct = entry["struct"].partition(".")
        read = _plain(getattr(getattr(old.schema, module), struct).from_bytes_packed(raw)
                      .to_dict())
        assert read  # the older reader knows some of the fields
        assert _restricted(read, entry["fields"]), (read, entry["fields"])
        return
    if entry["kind"] == "envelope":
        if name in ZLIB and reader < 2:
            with pytest.raises(UnsupportedContentError):
                old.open(raw, ROSTER)
            return
        env, document = _read_envelope_document(reader, raw)
        assert env.version == release
        assert env.sequence == entry["sequence"]
    elif (name, reader) in OLDER_READER_REFUSES:
        with pytest.raises(UnsupportedContentError):
            old.decode_document(raw)
        return
    else:
        document = old.decode_document(raw)
    passed_on = writer.decode_document(old.encode_document(document))
    assert passed_on.digest().hex() == entry["digest"]
