"""The trust roster's roles, file form, rotation overlap window and revoked keys
(``broker.codec``)."""

from __future__ import annotations

import pytest

from broker.codec import (
    REVOKED_FIELD,
    ROSTER_ROLES,
    Revocation,
    RosterEntry,
    Signer,
    TrustRoster,
    dump_roster,
    parse_revocations,
    parse_roster,
)
from broker.errors import BadSignatureError, InvalidArgumentError, UnknownSignerError
from broker.transport import SIGNING_ROLES


def test_roles_are_the_signing_nats_roles() -> None:
    assert set(ROSTER_ROLES) == {str(r) for r in SIGNING_ROLES}


def test_a_mapping_of_keys_is_a_roster_of_nodes_and_roles_are_kept() -> None:
    a, h, w = Signer.generate("a"), Signer.generate("h"), Signer.generate("w")
    roster = TrustRoster({"a": a.public_key})
    roster.add("h", h.public_key, "healer")
    roster.add("w", w.public_key, role="writer")
    assert roster.role_of("a") == "node"
    assert roster.role_of("h") == "healer"
    assert roster.role_of("nobody") is None
    assert roster.with_role("node") == frozenset({"a"})
    assert roster.with_role("healer") == frozenset({"h"})
    assert roster.with_role("writer") == frozenset({"w"})
    roster.remove("h")
    assert roster.with_role("healer") == frozenset()
    with pytest.raises(InvalidArgumentError):
        roster.add("x", a.public_key, "admin")
    assert "x" not in roster


def test_file_form_legacy_hex_and_objects_round_trip() -> None:
    a, h = Signer.generate("a"), Signer.generate("h")
    old = Signer.generate("h")
    raw = {
        "a": a.public_key.hex(),
        "h": {"key": h.public_key.hex(), "role": "healer", "previous": old.public_key.hex(),
              "previous_until": "2026-12-05T00:00:00Z"},
    }
    entries = parse_roster(raw)
    assert entries["a"] == RosterEntry(a.public_key)
    assert entries["h"].role == "healer"
    assert entries["h"].previous == old.public_key
    assert entries["h"].previous_until == 1796428800.0
    assert dump_roster(entries) == raw


@pytest.mark.parametrize("raw", [
    [],
    {"a": "zz"},
    {"a": "00" * 31},
    {"a": {"key": "00" * 32, "role": "boss"}},
    {"a": {"key": "00" * 32, "previous": "00" * 32}},
    {"a": {"key": "00" * 32, "previous": "00" * 32, "previous_until": "tomorrow"}},
    {"a": {"key": "00" * 32, "previous": "00" * 32, "previous_until": "2026-12-05T00:00:00"}},
    {"a": {"key": "00" * 32, "colour": "red"}},
    {"a b": "00" * 32},
    {"a": 5},
])
def test_bad_roster_files_are_refused(raw: object) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_roster(raw)


def test_previous_key_verifies_only_inside_the_window() -> None:
    old, new = Signer.generate("b"), Signer.generate("b")
    clock = [100.0]
    roster = TrustRoster(now=lambda: clock[0])
    roster.add("b", new.public_key, previous=old.public_key, previous_until=200.0)
    roster.verify("b", b"x", new.sign(b"x"))
    roster.verify("b", b"x", old.sign(b"x"))  # inside the window
    assert roster.in_overlap() == 1
    clock[0] = 200.0
    with pytest.raises(BadSignatureError):
        roster.verify("b", b"x", old.sign(b"x"))
    assert roster.in_overlap() == 0
    roster.verify("b", b"x", new.sign(b"x"))
    # no clock: a previous key is never accepted
    unclocked = TrustRoster()
    unclocked.add("b", new.public_key, previous=old.public_key, previous_until=1e18)
    with pytest.raises(BadSignatureError):
        unclocked.verify("b", b"x", old.sign(b"x"))


def test_replace_swaps_everything_in_place_and_a_bad_set_changes_nothing() -> None:
    a, b = Signer.generate("a"), Signer.generate("b")
    roster = TrustRoster({"a": a.public_key})
    roster.replace({"b": RosterEntry(b.public_key, "writer")})
    with pytest.raises(UnknownSignerError):
        roster.verify("a", b"x", a.sign(b"x"))
    roster.verify("b", b"x", b.sign(b"x"))
    assert roster.with_role("writer") == frozenset({"b"})
    with pytest.raises(InvalidArgumentError):
        roster.replace({"bad id!": RosterEntry(a.public_key)})
    with pytest.raises(InvalidArgumentError):
        roster.replace({"a": RosterEntry(b"\x00" * 31)})
    assert roster.entries() == {"b": RosterEntry(b.public_key, "writer")}


def test_healer_identities_come_from_roles_with_a_legacy_fallback() -> None:
    from broker.healing import healer_identities

    key = bytes(range(32))
    other = bytes(range(1, 33))
    with_roles = TrustRoster()
    with_roles.add("h1", key, role="healer")
    with_roles.add("healer", other)  # named like the healer, but a node: not one
    assert healer_identities(with_roles) == frozenset({"h1"})
    legacy = TrustRoster({"healer": key, "a": other})  # written before roles
    assert healer_identities(legacy) == frozenset({"healer"})
    assert healer_identities(TrustRoster({"a": other})) == frozenset()
    assert healer_identities(with_roles, ["a"]) == frozenset({"a"})  # an operator's choice


def test_revoked_keys_round_trip_and_a_roster_without_them_has_none() -> None:
    a, b, old = Signer.generate("a"), Signer.generate("b"), Signer.generate("b")
    raw = {
        "$revoked": [{"at": "2026-12-05T00:00:00Z", "id": "b", "key": b.public_key.hex()},
                     {"id": "b", "key": old.public_key.hex()}],
        "a": a.public_key.hex(),
    }
    revoked = parse_revocations(raw)
    assert revoked == [Revocation("b", b.public_key, 1796428800.0),
                       Revocation("b", old.public_key, None)]
    assert parse_roster(raw) == {"a": RosterEntry(a.public_key)}
    assert dump_roster(parse_roster(raw), revoked) == {
        "$revoked": sorted(raw["$revoked"], key=lambda r: bytes.fromhex(r["key"])),  # type: ignore[index]
        "a": a.public_key.hex(),
    }
    # Every roster written before revocations existed: nothing revoked, the same file back.
    assert parse_revocations({"a": a.public_key.hex()}) == []
    assert dump_roster(parse_roster({"a": a.public_key.hex()}), []) == {"a": a.public_key.hex()}
    assert REVOKED_FIELD == "$revoked"


@pytest.mark.parametrize("field", ["key", "previous"])
def test_a_roster_trusting_a_revoked_key_under_any_id_is_refused(field: str) -> None:
    a, b, c = Signer.generate("a"), Signer.generate("b"), Signer.generate("c")
    entry: dict[str, str] = {"key": c.public_key.hex(), "role": "writer"}
    if field == "previous":
        entry |= {"previous": b.public_key.hex(), "previous_until": "2026-12-05T00:00:00Z"}
    else:
        entry["key"] = b.public_key.hex()
    raw = {"$revoked": [{"id": "b", "key": b.public_key.hex()}],
           "a": a.public_key.hex(), "renamed-b": entry}
    with pytest.raises(InvalidArgumentError):
        parse_roster(raw)
    del raw["renamed-b"]
    assert set(parse_roster(raw)) == {"a"}


@pytest.mark.parametrize("revoked", [
    "ab" * 32,
    {"id": "b", "key": "ab" * 32},
    [{"id": "b"}],
    [{"key": "ab" * 32}],
    [{"id": "b", "key": "zz"}],
    [{"id": "bad id", "key": "ab" * 32}],
    [{"id": "b", "key": "ab" * 32, "why": "stolen"}],
    [{"id": "b", "key": "ab" * 32, "at": "yesterday"}],
    ["ab" * 32],
])
def test_bad_revoked_lists_are_refused(revoked: object) -> None:
    raw = {"$revoked": revoked, "a": "cd" * 32}
    with pytest.raises(InvalidArgumentError):
        parse_revocations(raw)
    with pytest.raises(InvalidArgumentError):
        parse_roster(raw)
