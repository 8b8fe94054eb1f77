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
- Bound to a holder: the authority block names the holder's Ed25519 public key
  (``holder("<hex>")``); ``TokenVerifier.admit`` reports it, and the server honours the token
  only on a request signed by that key (a sniffed token is useless to anyone else). Only the
  authority block is read for it, so attenuation (offline, by anyone) cannot change it.
- Bounded work: before any Datalog runs, a token over ``TokenLimits`` (bytes, blocks, facts,
  rules, checks, predicates in one rule or check body: counted on the library's own printout
  of each block) is ``TokenLimitError``. biscuit-python 0.4 holds the GIL and checks its time
  limit only between iterations, so ``authorize`` (a module function on plain values) is what
  a server runs in a worker process under a hard budget.
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

from broker.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    TokenLimitError,
    UnauthenticatedError,
)

__all__ = [
    "ANY_METHOD",
    "HOLDER_KEY_BYTES",
    "MAX_TOKEN_BYTES",
    "NO_HOLDER",
    "TOKEN_CACHE_SIZE",
    "Admitted",
    "AuthorizeJob",
    "Grant",
    "RootKey",
    "TokenInfo",
    "TokenLimits",
    "TokenVerifier",
    "attenuate",
    "authorize",
    "inspect",
    "mint",
    "token_limits_of",
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
HOLDER_KEY_BYTES: Final = 32
NO_HOLDER: Final = "token names no holder; mint with --holder"
"""The refusal of a token minted without a holder key (tokens before issue 16)."""
_HOLDER: Final = re.compile(r'^holder\("([0-9a-f]{64})"\);$', re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """Work a token may ask for, checked on its text before any Datalog runs (a token
    attenuated offline is written by its holder, who may be hostile). The defaults admit
    every token ``mint``/``attenuate`` make (one predicate per check, no rules) with room to
    spare; a few hundred facts or a 3-way join are refused."""

    max_bytes: int = MAX_TOKEN_BYTES
    max_blocks: int = MAX_BLOCKS
    max_facts: int = 128
    """Facts in all blocks (a grant is one fact per method)."""
    max_rules: int = 8
    max_checks: int = 128
    """Checks in all blocks (an attenuation adds at most four)."""
    max_predicates: int = 2
    """Predicates in one rule or check body (its join width; ``or`` branches count too)."""


def _statements(src: str) -> list[str]:
    """The statements of a block's printout (split at ``;`` outside string literals, which
    the printout leaves unescaped except for quotes)."""
    out: list[str] = []
    cur: list[str] = []
    in_str = escaped = False
    for c in src:
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
            cur.append("_")  # string contents never count as syntax
            continue
        if c == '"':
            in_str = True
            cur.append("_")
        elif c == ";":
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    tail = "".join(cur).strip()
    if tail:
        out.append(tail)
    return out


_PREDICATE: Final = re.compile(r"(?<![.\w$])[A-Za-z_][\w:]*\s*\(")


def token_limits_of(blocks: Sequence[str]) -> tuple[int, int, int, int]:
    """``(facts, rules, checks, widest body)`` of a token's blocks (their printouts)."""
    facts = rules = checks = widest = 0
    for src in blocks:
        for st in _statements(src):
            if st.startswith(("check if", "check all", "reject if")):
                checks += 1
                body = st
            elif "<-" in st:
                rules += 1
                body = st.split("<-", 1)[1]
            else:
                facts += 1
                continue
            widest = max(widest, len(_PREDICATE.findall(body)))
    return facts, rules, checks, widest


def _check_limits(blocks: Sequence[str], limits: TokenLimits) -> None:
    facts, rules, checks, widest = token_limits_of(blocks)
    for what, n, most in (
        ("facts", facts, limits.max_facts),
        ("rules", rules, limits.max_rules),
        ("checks", checks, limits.max_checks),
        ("predicates in one rule or check", widest, limits.max_predicates),
    ):
        if n > most:
            raise TokenLimitError(f"token has {n} {what}, over the limit of {most}")

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


def mint(
    root: RootKey, grants: Sequence[Grant], *, expires_at: float, holder: bytes
) -> bytes:
    """A token granting ``grants`` until ``expires_at`` (Unix seconds), signed by ``root``,
    honoured only on requests signed by ``holder`` (its 32-byte Ed25519 public key)."""
    if not grants:
        raise ValueError("a token needs at least one grant")
    if len(holder) != HOLDER_KEY_BYTES:
        raise ValueError(f"a holder is a {HOLDER_KEY_BYTES}-byte Ed25519 public key")
    builder = bi.BiscuitBuilder()
    builder.add_fact(bi.Fact("holder({k})", {"k": bytes(holder).hex()}))
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
        raise TokenLimitError(f"token of {len(token)} bytes, over {MAX_TOKEN_BYTES}")
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
    holder: bytes | None = None
    """The holder's public key named by the authority block (None: a token without one)."""

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
    holder = _holder(blocks[0]) if blocks else None
    return TokenInfo(u.root_key_id(), blocks, tuple(u.revocation_ids), expires, holder)


def _holder(authority: str) -> bytes | None:
    """The holder key the authority block names (None if none, or more than one)."""
    found = _HOLDER.findall(authority)
    return bytes.fromhex(found[0]) if len(found) == 1 else None


@dataclass(frozen=True, slots=True)
class _Verified:
    biscuit: bi.Biscuit
    revocation_ids: tuple[str, ...]
    expires_at: float | None
    cacheable: bool
    holder: bytes | None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A token whose signatures verified, within the limits, neither revoked nor expired:
    what ``TokenVerifier.admit`` learnt of it."""

    token: bytes
    holder: bytes | None
    """The holder's public key (None: the token names none and must be refused)."""
    revocation_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthorizeJob:
    """One authorization on plain values (picklable): run ``authorize(job)`` anywhere, in a
    worker process under a budget say."""

    token: bytes
    keyring: tuple[tuple[int, bytes], ...]
    namespace: str
    subject: str
    path: tuple[str, ...]
    method: str
    now: float


def _authorizer_limits(max_time_ms: int = AUTHORIZER_MAX_TIME_MS) -> object:
    limits = bi.AuthorizerBuilder().limits()  # type: ignore[attr-defined,unused-ignore]
    limits.max_time = timedelta(milliseconds=max_time_ms)
    return limits


def _authorize(
    b: bi.Biscuit, limits: object, namespace: str, subject: str, path: Sequence[str],
    method: str, now: float,
) -> None:
    try:
        ab = bi.AuthorizerBuilder(_POLICY)
        ab.set_limits(limits)  # type: ignore[attr-defined,unused-ignore]
        ab.add_fact(bi.Fact("namespace({v})", {"v": namespace}))
        ab.add_fact(bi.Fact("subject({v})", {"v": subject}))
        ab.add_fact(bi.Fact("method({v})", {"v": method}))
        ab.add_fact(bi.Fact("time({v})", {"v": _ts(now)}))
        for node in path:
            ab.add_fact(bi.Fact("ancestor({v})", {"v": node}))
        ab.build(b).authorize()
    except bi.AuthorizationError as exc:
        # biscuit's own limits (time, facts, iterations) end here too: it says which only in
        # its text, so they are a denial like any other (the hard bound is the caller's).
        raise PermissionDeniedError(
            f"token does not grant {method} on {namespace}/{subject}/{path[0] if path else '?'}"
            f" ({_first_line(exc)})"
        ) from None
    except Exception as exc:  # datalog errors of a hostile token
        raise PermissionDeniedError(f"token could not be authorized: {_first_line(exc)}") from None


def authorize(job: AuthorizeJob) -> None:
    """Run one authorization (the token is parsed again: nothing but bytes crosses a process
    boundary). Raises ``PermissionDeniedError`` (biscuit's own limits hit included) or
    ``UnauthenticatedError`` (the token does not verify)."""
    b = _verified(job.token, dict(job.keyring))
    _authorize(b, _authorizer_limits(), job.namespace, job.subject, job.path, job.method,
               job.now)


_DecisionKey = tuple[bytes, str, str, tuple[str, ...], str]


class TokenVerifier:
    """Verifies tokens offline against a keyring ``{key_id: root public key}`` (see module
    doc). Not thread-safe; one per event loop.

    ``verify`` does everything inline. A server splits it: ``admit`` (signatures, limits,
    holder, revocation, expiry: bounded work), then ``job``, and ``allowed(job)`` (the
    decision cache) or ``authorize(job)`` elsewhere and ``remember(job)``.
    """

    def __init__(
        self,
        keyring: Mapping[int, bytes],
        *,
        cache_size: int = TOKEN_CACHE_SIZE,
        limits: TokenLimits | None = None,
    ) -> None:
        if not keyring:
            raise ValueError("the keyring holds no root public key")
        self.keyring = tuple(sorted((int(k), bytes(v)) for k, v in keyring.items()))
        self._keys = {kid: _public(pk) for kid, pk in self.keyring}
        self._cache_size = cache_size
        self.limits = limits if limits is not None else TokenLimits()
        self._limits = _authorizer_limits()
        self._tokens: OrderedDict[bytes, _Verified] = OrderedDict()
        self._allowed: OrderedDict[_DecisionKey, float] = OrderedDict()
        self._costly: OrderedDict[bytes, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def set_keyring(self, keyring: Mapping[int, bytes]) -> None:
        """Verify against ``keyring`` from now on (a reload: key rotation, a root key
        removed). Every cached verification and decision is dropped, so a token of a removed
        key is refused from the next call. ``ValueError`` (nothing changed) for an empty
        keyring; every key is converted before any is swapped in."""
        if not keyring:
            raise ValueError("the keyring holds no root public key")
        ring = tuple(sorted((int(k), bytes(v)) for k, v in keyring.items()))
        keys = {kid: _public(pk) for kid, pk in ring}
        self._keys = keys
        # Jobs for the authorizer pool carry the keyring: the new one, or the worker would
        # refuse every token of a key added by this reload.
        self.keyring = ring
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
        limits = self.limits
        if len(token) > limits.max_bytes:
            raise TokenLimitError(f"token of {len(token)} bytes, over {limits.max_bytes}")
        try:
            b = bi.Biscuit.from_bytes(token, self._key)
        except Exception:
            raise UnauthenticatedError(
                "token signature does not verify, its root key id is unknown, or it is "
                "malformed"
            ) from None
        if b.block_count() > limits.max_blocks:
            raise TokenLimitError(
                f"token has {b.block_count()} blocks, over the limit of {limits.max_blocks}"
            )
        blocks = [b.block_source(i) for i in range(b.block_count())]
        _check_limits(blocks, limits)  # before any Datalog runs
        expires, only = _expiry(blocks)
        v = _Verified(
            b, tuple(b.revocation_ids), expires, only and expires is not None,
            _holder(blocks[0]) if blocks else None,
        )
        self._tokens[token] = v
        if len(self._tokens) > self._cache_size:
            self._tokens.popitem(last=False)
        return v

    def admit(
        self, token: bytes, *, now: float, revoked: Collection[str] = ()
    ) -> Admitted:
        """Bounded checks of ``token``: signatures, ``TokenLimits`` (``TokenLimitError``),
        revocation and stated expiry (``UnauthenticatedError``). Reports its holder."""
        if token in self._costly:
            raise TokenLimitError("token ran over its authorization budget before")
        v = self._parse(token)
        for rid in v.revocation_ids:
            if rid in revoked:
                raise UnauthenticatedError("token revoked")
        if v.expires_at is not None and int(now) > v.expires_at:
            raise UnauthenticatedError("token expired")
        return Admitted(token, v.holder, v.revocation_ids)

    def too_costly(self, token: bytes) -> None:
        """Remember that ``token``'s authorization ran over its budget: ``admit`` refuses it
        from now on without running it again (bounded LRU)."""
        self._costly[token] = None
        self._costly.move_to_end(token)
        if len(self._costly) > self._cache_size:
            self._costly.popitem(last=False)

    def allowed(self, job: AuthorizeJob) -> bool:
        """Whether this very call was authorized before and the decision still holds."""
        return self.allowed_call(
            job.token, job.namespace, job.subject, job.path, job.method, job.now)

    def allowed_call(
        self, token: bytes, namespace: str, subject: str, path: tuple[str, ...], method: str,
        now: float,
    ) -> bool:
        """``allowed`` of the job ``job(token, ...)`` would make, without making it (the
        server asks this on every call; it builds the job only when the answer is no)."""
        key = (token, namespace, subject, path, method)
        until = self._allowed.get(key)
        if until is not None and now < until:
            self._allowed.move_to_end(key)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def job(
        self, token: bytes, *, namespace: str, subject: str, path: Sequence[str], method: str,
        now: float,
    ) -> AuthorizeJob:
        """The authorization of one call, to run with ``authorize``."""
        return AuthorizeJob(token, self.keyring, namespace, subject, tuple(path), method, now)

    def remember(self, job: AuthorizeJob) -> None:
        """Cache the allow decision of ``job`` (after ``authorize`` passed), while it holds."""
        v = self._tokens.get(job.token)
        if v is None or not v.cacheable or v.expires_at is None:
            return
        self._allowed[job.token, job.namespace, job.subject, job.path, job.method] = (
            v.expires_at
        )
        if len(self._allowed) > self._cache_size:
            self._allowed.popitem(last=False)

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
        """Check, inline, that ``token`` grants ``method`` on the worknode whose ancestry is
        ``path`` (the worknode itself first, ``root`` last) at Unix time ``now``. The holder
        is not checked here (that needs the request's signature: see ``admit``).

        Returns the token's revocation ids. Raises ``UnauthenticatedError`` (missing,
        malformed, forged, unknown key id, expired, revoked), ``TokenLimitError`` (over the
        limits) or ``PermissionDeniedError`` (valid, but it does not grant this call).
        """
        admitted = self.admit(token, now=now, revoked=revoked)
        job = self.job(
            token, namespace=namespace, subject=subject, path=path, method=method, now=now
        )
        if self.allowed(job):
            return admitted.revocation_ids
        _authorize(self._parse(token).biscuit, self._limits, namespace, subject, job.path,
                   method, now)
        self.remember(job)
        return admitted.revocation_ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
