"""Biscuit capability tokens, pure: what a token grants, attenuation only narrows, forged and
unknown-key tokens fail, expiry and revocation are never hidden by the caches. Time is an
argument (no clock reads)."""

from __future__ import annotations

import biscuit_auth as bi
import pytest

from broker.rpc import (
    Grant,
    PermissionDeniedError,
    RootKey,
    TokenLimitError,
    TokenLimits,
    TokenVerifier,
    UnauthenticatedError,
    attenuate,
    inspect,
    mint,
)
from broker.rpc._capability import token_limits_of

NOW = 1_800_000_000.0
ROOT = RootKey(1, b"\x01" * 32)
RING = {1: ROOT.public_key}
HOLDER = bytes(range(32, 64))  # the holder's public key (any 32 bytes will do here)


def _verify(v: TokenVerifier, token: bytes, **kw) -> tuple[str, ...]:
    args = {"namespace": "shop", "subject": "orders", "path": ["o1", "root"], "method": "get",
            "now": NOW}
    args.update(kw)
    return v.verify(token, **args)


def test_a_token_grants_exactly_its_rights() -> None:
    tok = mint(ROOT, [Grant("shop", "orders", "o1", ("get", "set"))], expires_at=NOW + 60,
        holder=HOLDER)
    v = TokenVerifier(RING)
    _verify(v, tok)
    _verify(v, tok, method="set")
    _verify(v, tok, path=["o1a", "o1", "root"])  # the subtree
    for bad in ({"method": "delete"}, {"subject": "users"}, {"namespace": "other"},
                {"path": ["o2", "root"]}, {"path": ["root"]}):
        with pytest.raises(PermissionDeniedError):
            _verify(v, tok, **bad)


def test_attenuation_narrows_and_nothing_widens() -> None:
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 3600, holder=HOLDER)
    narrow = attenuate(tok, RING, methods=["get"], worknode="o1", expires_at=NOW + 10)
    v = TokenVerifier(RING)
    _verify(v, narrow)
    with pytest.raises(PermissionDeniedError):
        _verify(v, narrow, method="set")
    with pytest.raises(PermissionDeniedError):
        _verify(v, narrow, path=["o2", "root"])
    with pytest.raises(UnauthenticatedError, match="expired"):
        _verify(v, narrow, now=NOW + 11)
    # Attenuating again cannot undo a narrowing.
    again = attenuate(narrow, RING, methods=["get", "set"], expires_at=NOW + 3600)
    with pytest.raises(PermissionDeniedError):
        _verify(v, again, method="set")
    # A block that asserts rights is ignored by the authorizer.
    reader = mint(ROOT, [Grant("shop", "orders", "root", ("get",))], expires_at=NOW + 60,
        holder=HOLDER)
    parsed = bi.Biscuit.from_bytes(reader, lambda kid: bi.PublicKey.from_bytes(
        ROOT.public_key, bi.Algorithm.Ed25519))
    widened = bytes(parsed.append(bi.BlockBuilder(
        'right("shop", "orders", "root", "*"); right("shop", "users", "root", "*");'
    )).to_bytes())
    with pytest.raises(PermissionDeniedError):
        _verify(v, widened, method="set")
    with pytest.raises(PermissionDeniedError):
        _verify(v, widened, subject="users")


def test_forged_truncated_and_unknown_key_tokens_are_unauthenticated() -> None:
    v = TokenVerifier(RING)
    good = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    for bad in (
        b"",
        b"not a token",
        good[:-5],
        good[:-1] + bytes([good[-1] ^ 1]),
        mint(RootKey(1, b"\x02" * 32), [Grant("shop", "orders")], expires_at=NOW + 60,
            holder=HOLDER),
        mint(RootKey(7, b"\x01" * 32), [Grant("shop", "orders")], expires_at=NOW + 60,
            holder=HOLDER),
    ):
        with pytest.raises(UnauthenticatedError):
            _verify(v, bad)


def test_key_rotation_by_key_id() -> None:
    new = RootKey(2, b"\x03" * 32)
    tok = mint(new, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    with pytest.raises(UnauthenticatedError):
        _verify(TokenVerifier(RING), tok)
    _verify(TokenVerifier({**RING, 2: new.public_key}), tok)
    assert inspect(tok).key_id == 2


def test_caches_never_extend_expiry_or_hide_revocation() -> None:
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    v = TokenVerifier(RING)
    for i in range(5):
        _verify(v, tok, now=NOW + i)
    assert v.hits >= 4  # verified once, then answered from the cache
    with pytest.raises(UnauthenticatedError, match="expired"):
        _verify(v, tok, now=NOW + 61)
    ids = _verify(v, tok, now=NOW + 1)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        _verify(v, tok, now=NOW + 1, revoked={ids[0]})
    # Revoking a token revokes what was attenuated from it.
    child = attenuate(tok, RING, methods=["get"])
    with pytest.raises(UnauthenticatedError, match="revoked"):
        _verify(v, child, revoked={inspect(tok).token_id})
    # ...but revoking the child leaves the parent alone.
    _verify(v, tok, revoked={inspect(child).token_id})


def test_the_servers_cache_question_is_the_jobs() -> None:
    # The server asks ``allowed_call`` on every call and builds the job only on a miss: it
    # must answer exactly what ``allowed(job)`` answers, and only for that very call.
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    v = TokenVerifier(RING)
    call = ("shop", "orders", ("o1", "root"), "get")
    assert not v.allowed_call(tok, *call, NOW)
    _verify(v, tok)  # authorized and remembered
    job = v.job(tok, namespace="shop", subject="orders", path=["o1", "root"], method="get",
                now=NOW + 1)
    assert v.allowed(job)
    assert v.allowed_call(tok, *call, NOW + 1)
    assert not v.allowed_call(tok, "shop", "orders", ("o2", "root"), "get", NOW + 1)
    assert not v.allowed_call(tok, "shop", "orders", ("o1", "root"), "set", NOW + 1)
    assert not v.allowed_call(tok, *call, NOW + 60)  # never past the token's expiry


def test_tokens_with_other_time_checks_are_never_cached() -> None:
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 600, holder=HOLDER)
    parsed = bi.Biscuit.from_bytes(tok, lambda kid: bi.PublicKey.from_bytes(
        ROOT.public_key, bi.Algorithm.Ed25519))
    from datetime import UTC, datetime

    weird = bytes(parsed.append(bi.BlockBuilder(
        "check if time($t), $t >= {nb};", {"nb": datetime.fromtimestamp(NOW + 5, tz=UTC)}
    )).to_bytes())
    v = TokenVerifier(RING)
    with pytest.raises(PermissionDeniedError):
        _verify(v, weird, now=NOW)
    _verify(v, weird, now=NOW + 10)
    _verify(v, weird, now=NOW + 11)
    assert v.hits == 0


def test_inspect_shows_blocks_ids_and_expiry() -> None:
    tok = mint(ROOT, [Grant("shop", "orders", "o1", ("get",))], expires_at=NOW + 60, holder=HOLDER)
    child = attenuate(tok, RING, expires_at=NOW + 30)
    info = inspect(child)
    assert info.key_id == 1
    assert len(info.blocks) == 2
    assert 'right("shop", "orders", "o1", "get")' in info.blocks[0]
    assert info.expires_at == NOW + 30
    assert info.revocation_ids[0] == inspect(tok).token_id
    with pytest.raises(UnauthenticatedError):
        inspect(b"\x00garbage")


def test_grants_validate_their_tokens() -> None:
    with pytest.raises(ValueError, match="namespace"):
        Grant("bad ns", "orders")
    with pytest.raises(ValueError, match="method"):
        Grant("shop", "orders", "root", ("a.b",))


def _append(token: bytes, code: str) -> bytes:
    parsed = bi.Biscuit.from_bytes(token, lambda kid: bi.PublicKey.from_bytes(
        ROOT.public_key, bi.Algorithm.Ed25519))
    return bytes(parsed.append(bi.BlockBuilder(code)).to_bytes())


def test_a_token_names_its_holder_and_attenuation_cannot_change_it() -> None:
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    v = TokenVerifier(RING)
    assert v.admit(tok, now=NOW).holder == HOLDER
    assert inspect(tok).holder == HOLDER
    other = bytes(32)
    # A later block claiming another holder (a fact, or a string that prints like one) is
    # ignored: only the authority block names the holder.
    forged = _append(
        tok, f'holder("{other.hex()}");\ncheck if n("x\nholder(\\"{other.hex()}\\");");'
    )
    assert v.admit(forged, now=NOW).holder == HOLDER
    narrowed = attenuate(tok, RING, methods=["get"])
    assert v.admit(narrowed, now=NOW).holder == HOLDER
    # A token minted without a holder (before issue 16) names none: servers refuse it.
    b = bi.BiscuitBuilder('right("shop", "orders", "root", "*");')
    b.set_root_key_id(1)
    legacy = bytes(b.build(bi.PrivateKey.from_bytes(  # type: ignore[call-arg]
        ROOT.private_key, bi.Algorithm.Ed25519)).to_bytes())
    assert v.admit(legacy, now=NOW).holder is None
    with pytest.raises(ValueError, match="holder"):
        mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=b"short")


def test_datalog_heavy_tokens_are_refused_before_any_datalog_runs() -> None:
    tok = mint(ROOT, [Grant("shop", "orders")], expires_at=NOW + 60, holder=HOLDER)
    facts = "\n".join(f"n({i});" for i in range(300))
    heavy = _append(tok, facts + "\ncheck if n($a), n($b), n($c), $a + $b + $c == -1;")
    v = TokenVerifier(RING)
    with pytest.raises(TokenLimitError, match="facts"):
        _verify(v, heavy)
    # The join alone (few facts) is refused too: its width is over the limit.
    join = _append(tok, "n(1); n(2);\ncheck if n($a), n($b), n($c), $a + $b + $c == -1;")
    with pytest.raises(TokenLimitError, match="predicates"):
        _verify(v, join)
    # String contents never count as syntax (a ';' or '(' inside a literal).
    quoted = _append(tok, 'check if method($m), $m != "a(b(c(;d;e;f";')
    _verify(v, quoted)
    assert token_limits_of(inspect(quoted).blocks) == (2, 0, 2, 1)
    # Rules and checks are counted; small custom limits refuse what the defaults admit.
    strict = TokenVerifier(RING, limits=TokenLimits(max_checks=1))
    with pytest.raises(TokenLimitError, match="checks"):
        _verify(strict, quoted)
    ruled = _append(tok, "r($x) <- method($x);\ncheck if r($m);")
    assert token_limits_of(inspect(ruled).blocks)[1] == 1
    with pytest.raises(TokenLimitError, match="rules"):
        _verify(TokenVerifier(RING, limits=TokenLimits(max_rules=0)), ruled)
