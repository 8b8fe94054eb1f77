"""Capability tokens (Biscuit), pure: mint, attenuate, inspect, verify.

A token grants *rights*: ``right(namespace, subject, worknode, method)`` facts in its authority
block, signed by a cluster root key (Ed25519) named by a key id, with an expiry
(``check if time($t), $t <= <expiry>``). ``worknode`` grants that worknode's whole subtree
(``root``: the whole tree); ``method`` ``*`` grants every method.

Invariants:

- Verification is offline: only the keyring (key id -> root public key) is needed. A token
  whose key id is not in the keyring, or whose signatures do not verify, is
  ``UnauthenticatedError``; so are expired and revoked tokens.
- Attenuation needs no key: any holder appends a block of *checks* (fewer methods, a subtree,
  a subject, an earlier expiry). Facts added by later blocks are not trusted by the authorizer
  (Biscuit scoping), so no block can widen a token: a request outside its rights is
  ``PermissionDeniedError``.
- Revocation: a token is revoked when any of its revocation ids (one per block, so revoking a
  token revokes everything attenuated from it) is in the revoked set the caller passes in;
  the set is checked on every call, never cached.
- No clock reads: ``now`` (Unix seconds) is an argument. Verified tokens and allow decisions
  are cached (bounded LRU), an allow decision only while ``now`` is before every expiry the
  token states, and only for tokens whose every time check is such an expiry; so caching
  never extends a token's life and never hides a revocation.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import biscuit_auth as bi

from broker.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError

__all__ = [
    "ANY_METHOD",
    "MAX_TOKEN_BYTES",
    "TOKEN_CACHE_SIZE",
    "Grant",
    "RootKey",
    "TokenInfo",
    "TokenVerifier",
    "attenuate",
    "inspect",
    "mint",
]

ANY_METHOD: Final = "*"
MAX_TOKEN_BYTES: Final = 16 * 1024
"""Larger tokens are refused before parsing (a token grows by ~200 B per attenuation)."""
TOKEN_CACHE_SIZE: Final = 4096
"""Verified tokens (and, separately, allow decisions) kept per verifier."""
AUTHORIZER_MAX_TIME_MS: Final = 20
"""Datalog time budget of one authorization. biscuit's default (1 ms) refused valid tokens on
a loaded machine; a hostile token still stops within this bound."""
MAX_BLOCKS: Final = 32
"""Attenuation blocks a token may carry; more is refused as malformed."""

_EXPIRY: Final = re.compile(
    r"check if time\(\$(\w+)\), \$\1 <= (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ);"
)
_POLICY: Final = """
allow if namespace($ns), subject($s), method($m), right($ns, $s, $n, $m), ancestor($n);
allow if namespace($ns), subject($s), right($ns, $s, $n, "*"), ancestor($n);
"""


_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


def validate_token(value: object, what: str) -> str:
    """``value`` if it is a subject-layout token (1-64 of ``[A-Za-z0-9_-]``), else
    ``InvalidArgumentError`` (the same rule as ``broker.transport``, kept here so this pure
    module does not import the transport package)."""
    if isinstance(value, str) and _NAME.fullmatch(value) is not None:
        return value
    raise InvalidArgumentError(f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9_-]")


def _private(raw: bytes) -> bi.PrivateKey:
    # biscuit-python 0.4 takes the algorithm as a second argument (its stub lags behind).
    return bi.PrivateKey.from_bytes(raw, bi.Algorithm.Ed25519)  # type: ignore[call-arg,attr-defined,unused-ignore]


def _public(raw: bytes) -> bi.PublicKey:
    return bi.PublicKey.from_bytes(raw, bi.Algorithm.Ed25519)  # type: ignore[call-arg,attr-defined,unused-ignore]


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _b64(token: bytes) -> str:
    return base64.urlsafe_b64encode(token).decode()


@dataclass(frozen=True, slots=True)
class Grant:
    """One right: ``methods`` on ``worknode``'s subtree of ``namespace``/``subject``."""

    namespace: str
    subject: str
    worknode: str = "root"
    methods: tuple[str, ...] = (ANY_METHOD,)

    def __post_init__(self) -> None:
        validate_token(self.namespace, "namespace")
        validate_token(self.subject, "subject")
        validate_token(self.worknode, "worknode")
        if not self.methods:
            raise ValueError("a grant needs at least one method")
        for m in self.methods:
            if m != ANY_METHOD:
                validate_token(m, "method")


@dataclass(frozen=True, slots=True)
class RootKey:
    """A cluster root signing key and its key id (rotation: mint with a new id, add its public
    key to every keyring, retire the old id from keyrings when its tokens have expired)."""

    key_id: int
    private_key: bytes
    """The 32-byte Ed25519 private key (seed): make one with ``os.urandom(32)``."""

    @property
    def public_key(self) -> bytes:
        """The Ed25519 public key (32 bytes) keyrings hold for ``key_id``."""
        kp = bi.KeyPair.from_private_key(_private(self.private_key))
        return bytes(kp.public_key.to_bytes())


def mint(root: RootKey, grants: Sequence[Grant], *, expires_at: float) -> bytes:
    """A token granting ``grants`` until ``expires_at`` (Unix seconds), signed by ``root``."""
    if not grants:
        raise ValueError("a token needs at least one grant")
    builder = bi.BiscuitBuilder()
    for g in grants:
        for m in g.methods:
            builder.add_fact(
                bi.Fact(
                    "right({ns}, {s}, {n}, {m})",
                    {"ns": g.namespace, "s": g.subject, "n": g.worknode, "m": m},
                )
            )
    builder.add_code("check if time($t), $t <= {exp};", {"exp": _ts(expires_at)})
    builder.set_root_key_id(root.key_id)
    token = builder.build(_private(root.private_key))
    return bytes(token.to_bytes())


def attenuate(
    token: bytes,
    keyring: Mapping[int, bytes],
    *,
    methods: Iterable[str] | None = None,
    worknode: str | None = None,
    subject: str | None = None,
    expires_at: float | None = None,
) -> bytes:
    """``token`` narrowed by one appended block; no key needed, nothing can be widened.

    ``methods``: only these; ``worknode``: only that subtree; ``subject``: only that subject;
    ``expires_at``: no later than that (Unix seconds). ``keyring`` holds root *public* keys
    (biscuit-python appends only to a token whose signatures it checked). Raises
    ``UnauthenticatedError`` for bytes that are not a token signed by a key in ``keyring``.
    """
    checks: list[str] = []
    params: dict[str, object] = {}
    if methods is not None:
        ms = sorted(set(methods))
        for m in ms:
            validate_token(m, "method")
        checks.append("check if method($m), {methods}.contains($m);")
        params["methods"] = set(ms)
    if worknode is not None:
        checks.append("check if ancestor({node});")
        params["node"] = validate_token(worknode, "worknode")
    if subject is not None:
        checks.append("check if subject({subject});")
        params["subject"] = validate_token(subject, "subject")
    if expires_at is not None:
        checks.append("check if time($t), $t <= {exp};")
        params["exp"] = _ts(expires_at)
    if not checks:
        return token
    parsed = _verified(token, keyring)
    block = bi.BlockBuilder("\n".join(checks), params)
    return bytes(parsed.append(block).to_bytes())


def _verified(token: bytes, keyring: Mapping[int, bytes]) -> bi.Biscuit:
    _unverified(token)  # size and shape first
    keys = {int(k): _public(bytes(v)) for k, v in keyring.items()}

    def key(kid: int | None) -> bi.PublicKey:
        if kid is None or kid not in keys:
            raise KeyError(kid)
        return keys[kid]

    try:
        return bi.Biscuit.from_bytes(token, key)
    except Exception:
        raise UnauthenticatedError(
            "token signature does not verify, its root key id is unknown, or it is malformed"
        ) from None


def _unverified(token: bytes) -> bi.UnverifiedBiscuit:
    if not token:
        raise UnauthenticatedError("no capability token")
    if len(token) > MAX_TOKEN_BYTES:
        raise UnauthenticatedError(f"token of {len(token)} bytes, over {MAX_TOKEN_BYTES}")
    try:
        return bi.UnverifiedBiscuit.from_base64(_b64(token))
    except Exception as exc:  # biscuit_auth raises its own classes and ValueError
        raise UnauthenticatedError(f"malformed token: {exc}") from None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a token says (signatures not checked: use ``TokenVerifier`` for that)."""

    key_id: int | None
    blocks: tuple[str, ...]
    revocation_ids: tuple[str, ...]
    expires_at: float | None

    @property
    def token_id(self) -> str:
        """The id that revokes exactly this token (and what is attenuated from it): the
        revocation id of its last block."""
        return self.revocation_ids[-1]


def _expiry(blocks: Sequence[str]) -> tuple[float | None, bool]:
    """The earliest stated expiry, and whether every time check is such an expiry."""
    earliest: float | None = None
    only_expiries = True
    for src in blocks:
        found = _EXPIRY.findall(src)
        if src.count("time(") != len(found):
            only_expiries = False
        for _, stamp in found:
            t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
            earliest = t if earliest is None else min(earliest, t)
    return earliest, only_expiries


def inspect(token: bytes) -> TokenInfo:
    """Key id, blocks (as Datalog), revocation ids and earliest expiry of ``token``."""
    u = _unverified(token)
    blocks = tuple(u.block_source(i) for i in range(u.block_count()))
    expires, _ = _expiry(blocks)
    return TokenInfo(u.root_key_id(), blocks, tuple(u.revocation_ids), expires)


@dataclass(frozen=True, slots=True)
class _Verified:
    biscuit: bi.Biscuit
    revocation_ids: tuple[str, ...]
    expires_at: float | None
    cacheable: bool


_DecisionKey = tuple[bytes, str, str, tuple[str, ...], str]


class TokenVerifier:
    """Verifies tokens offline against a keyring ``{key_id: root public key}`` (see module
    doc). Not thread-safe; one per event loop."""

    def __init__(self, keyring: Mapping[int, bytes], *, cache_size: int = TOKEN_CACHE_SIZE) -> None:
        if not keyring:
            raise ValueError("the keyring holds no root public key")
        self._keys = {
            int(kid): _public(bytes(pk)) for kid, pk in keyring.items()
        }
        self._cache_size = cache_size
        limits = bi.AuthorizerBuilder().limits()  # type: ignore[attr-defined,unused-ignore]
        limits.max_time = timedelta(milliseconds=AUTHORIZER_MAX_TIME_MS)
        self._limits = limits
        self._tokens: OrderedDict[bytes, _Verified] = OrderedDict()
        self._allowed: OrderedDict[_DecisionKey, float] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def set_keyring(self, keyring: Mapping[int, bytes]) -> None:
        """Verify against ``keyring`` from now on (a reload: key rotation, a root key
        removed). Every cached verification and decision is dropped, so a token of a removed
        key is refused from the next call. ``ValueError`` (nothing changed) for an empty
        keyring; every key is converted before any is swapped in."""
        if not keyring:
            raise ValueError("the keyring holds no root public key")
        keys = {int(kid): _public(bytes(pk)) for kid, pk in keyring.items()}
        self._keys = keys
        self._tokens.clear()
        self._allowed.clear()

    def _key(self, kid: int | None) -> bi.PublicKey:
        if kid is None or kid not in self._keys:
            raise KeyError(kid)  # biscuit_auth turns this into a validation error
        return self._keys[kid]

    def _parse(self, token: bytes) -> _Verified:
        cached = self._tokens.get(token)
        if cached is not None:
            self._tokens.move_to_end(token)
            return cached
        if not token:
            raise UnauthenticatedError("no capability token")
        if len(token) > MAX_TOKEN_BYTES:
            raise UnauthenticatedError(f"token of {len(token)} bytes, over {MAX_TOKEN_BYTES}")
        try:
            b = bi.Biscuit.from_bytes(token, self._key)
        except Exception:
            raise UnauthenticatedError(
                "token signature does not verify, its root key id is unknown, or it is "
                "malformed"
            ) from None
        if b.block_count() > MAX_BLOCKS:
            raise UnauthenticatedError(f"token has {b.block_count()} blocks, over {MAX_BLOCKS}")
        blocks = [b.block_source(i) for i in range(b.block_count())]
        expires, only = _expiry(blocks)
        v = _Verified(b, tuple(b.revocation_ids), expires, only and expires is not None)
        self._tokens[token] = v
        if len(self._tokens) > self._cache_size:
            self._tokens.popitem(last=False)
        return v

    def verify(
        self,
        token: bytes,
        *,
        namespace: str,
        subject: str,
        path: Sequence[str],
        method: str,
        now: float,
        revoked: Collection[str] = (),
    ) -> tuple[str, ...]:
        """Check that ``token`` grants ``method`` on the worknode whose ancestry is ``path``
        (the worknode itself first, ``root`` last) at Unix time ``now``.

        Returns the token's revocation ids. Raises ``UnauthenticatedError`` (missing,
        malformed, forged, unknown key id, expired, revoked) or ``PermissionDeniedError``
        (valid, but it does not grant this call).
        """
        v = self._parse(token)
        for rid in v.revocation_ids:
            if rid in revoked:
                raise UnauthenticatedError("token revoked")
        key: _DecisionKey = (token, namespace, subject, tuple(path), method)
        until = self._allowed.get(key)
        if until is not None and now < until:
            self._allowed.move_to_end(key)
            self.hits += 1
            return v.revocation_ids
        self.misses += 1
        if v.expires_at is not None and int(now) > v.expires_at:
            raise UnauthenticatedError("token expired")
        try:
            ab = bi.AuthorizerBuilder(_POLICY)
            ab.set_limits(self._limits)  # type: ignore[attr-defined,unused-ignore]
            ab.add_fact(bi.Fact("namespace({v})", {"v": namespace}))
            ab.add_fact(bi.Fact("subject({v})", {"v": subject}))
            ab.add_fact(bi.Fact("method({v})", {"v": method}))
            ab.add_fact(bi.Fact("time({v})", {"v": _ts(now)}))
            for node in path:
                ab.add_fact(bi.Fact("ancestor({v})", {"v": node}))
            ab.build(v.biscuit).authorize()
        except bi.AuthorizationError as exc:
            raise PermissionDeniedError(
                f"token does not grant {method} on {namespace}/{subject}/{path[0] if path else '?'}"
                f" ({_first_line(exc)})"
            ) from None
        except Exception as exc:  # limits hit by a hostile token, datalog errors
            raise PermissionDeniedError(f"token could not be authorized: {exc}") from None
        if v.cacheable and v.expires_at is not None:
            self._allowed[key] = v.expires_at
            if len(self._allowed) > self._cache_size:
                self._allowed.popitem(last=False)
        return v.revocation_ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
