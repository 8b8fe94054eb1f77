"""The NATS subject layout: a public contract, and the validation that guards it.

Subject layout (prefix ``wn``, namespace first, ids last)::

    wn.<namespace>.delta.<subject>              delta batches of one replicated subject
    wn.<namespace>.sync.<subject>               catch-up requests (request/reply)
    wn.<namespace>.heal.<subject>               heal reports
    wn.<namespace>.rpc.<subject>.<method>       worknode RPC endpoints (one per method)
    wn.<namespace>.merkle.<subject>.<node>.<verb>   a replica's healing endpoints

Every ``<...>`` is exactly one token of 1-64 characters from ``[A-Za-z0-9_-]``. Because the
namespace comes first and ids come last, one wildcard covers a whole space:

    wn.<namespace>.>                    everything in a namespace
    wn.<namespace>.delta.>              the deltas of every subject in a namespace
    wn.<namespace>.sync.*               catch-up requests of every subject (``*``: one token)
    wn.*.heal.<subject>                 heal reports of one subject in every namespace

Invariants:

- No raw user input becomes a subject token without ``validate_token``: ``*``, ``>``, ``.``,
  whitespace, control characters, empty and over-long tokens are refused with
  ``broker.errors.InvalidSubjectError``. So a built subject is always literal (never a
  wildcard) and always has the token count its kind defines.
- A full subject given by a user passes ``validate_subject`` (literal, at most
  ``MAX_SUBJECT_BYTES`` UTF-8 bytes) before it reaches the network; a subscription pattern
  passes ``validate_pattern`` (``*`` as a whole token anywhere, ``>`` only as the last token).
- Everything here is pure: strings in, strings or errors out.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final, Literal

from broker.errors import InvalidSubjectError

__all__ = [
    "KINDS",
    "KIND_DELTA",
    "KIND_HEAL",
    "KIND_MERKLE",
    "KIND_RPC",
    "KIND_SYNC",
    "MAX_SUBJECT_BYTES",
    "MAX_TOKEN_LENGTH",
    "PREFIX",
    "SubjectParts",
    "delta_subject",
    "heal_subject",
    "merkle_subject",
    "namespace_wildcard",
    "parse_subject",
    "rpc_subject",
    "subject_matches",
    "sync_subject",
    "validate_pattern",
    "validate_subject",
    "validate_token",
    "wildcard",
]

PREFIX: Final = "wn"
MAX_TOKEN_LENGTH: Final = 64
MAX_SUBJECT_BYTES: Final = 256

KIND_DELTA: Final = "delta"
KIND_SYNC: Final = "sync"
KIND_HEAL: Final = "heal"
KIND_RPC: Final = "rpc"
KIND_MERKLE: Final = "merkle"
#: Each kind with the number of id tokens that follow it.
KINDS: Final[dict[str, int]] = {
    KIND_DELTA: 1,
    KIND_SYNC: 1,
    KIND_HEAL: 1,
    KIND_RPC: 2,
    KIND_MERKLE: 3,
}

_TOKEN: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TOKEN_LENGTH}}}", re.ASCII)


def validate_token(token: object, what: str = "token") -> str:
    """Return ``token`` if it is one literal token of 1-64 characters from ``[A-Za-z0-9_-]``.

    ``what`` names the token in the error (``"namespace"``, ``"subject"``, ...). Raises
    ``InvalidSubjectError`` saying what is wrong otherwise.
    """
    if isinstance(token, str) and _TOKEN.fullmatch(token) is not None:
        return token
    raise InvalidSubjectError(f"invalid {what} {token!r}: {_token_problem(token)}")


def _token_problem(token: object) -> str:
    if not isinstance(token, str):
        return f"must be a str, not {type(token).__name__}"
    if not token:
        return "empty"
    if len(token) > MAX_TOKEN_LENGTH:
        return f"{len(token)} characters, at most {MAX_TOKEN_LENGTH} allowed"
    bad = next(c for c in token if _TOKEN.fullmatch(c) is None)
    return f"{_describe(bad)} not allowed; use only [A-Za-z0-9_-]"


def _describe(char: str) -> str:
    if char in "*>":
        return f"wildcard {char!r}"
    if char == ".":
        return "'.' (token separator)"
    if char.isspace():
        return f"whitespace {char!r}"
    if unicodedata.category(char).startswith("C"):
        return f"control or unassigned character {char!r}"
    return f"character {char!r}"


def _literal_problem(token: str) -> str | None:
    """Why ``token`` is not a literal NATS subject token, or None if it is one."""
    if not token:
        return "empty token"
    for char in token:
        if char in "*>" or char.isspace() or unicodedata.category(char).startswith("C"):
            return f"{_describe(char)} in token {token!r}"
    return None


def _check_length(subject: str, what: str) -> None:
    try:
        size = len(subject.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidSubjectError(f"invalid {what} {subject!r}: not valid UTF-8") from None
    if size > MAX_SUBJECT_BYTES:
        raise InvalidSubjectError(
            f"invalid {what}: {size} bytes, at most {MAX_SUBJECT_BYTES} allowed"
        )


def validate_subject(subject: object, what: str = "subject") -> str:
    """Return ``subject`` if it is a literal NATS subject, else raise ``InvalidSubjectError``.

    Literal: non-empty tokens separated by ``.``, no ``*`` or ``>``, no whitespace or
    control characters, at most ``MAX_SUBJECT_BYTES`` UTF-8 bytes. Any other printable
    character is allowed (``$SRV.PING`` and ``_INBOX.x`` are valid), so this checks
    subjects that come from users or peers, not only the worknode layout.
    """
    if type(subject) is str and subject in _KNOWN_VALID:
        return subject
    if not isinstance(subject, str):
        raise InvalidSubjectError(f"invalid {what}: must be a str, not {type(subject).__name__}")
    if not subject:
        raise InvalidSubjectError(f"invalid {what}: empty")
    _check_length(subject, what)
    for token in subject.split("."):
        problem = _literal_problem(token)
        if problem is not None:
            raise InvalidSubjectError(f"invalid {what} {subject!r}: {problem}")
    if len(_KNOWN_VALID) < _KNOWN_VALID_MAX:
        _KNOWN_VALID.add(subject)
    return subject


#: Subjects already found valid (a bounded memo: RPC and replication reuse a few subjects on
#: every message, and checking one costs more than the rest of a publish).
_KNOWN_VALID: Final[set[str]] = set()
_KNOWN_VALID_MAX: Final = 4096


def validate_pattern(pattern: object, what: str = "subscription subject") -> str:
    """Return ``pattern`` if it is a valid subscription subject, else raise
    ``InvalidSubjectError``.

    As ``validate_subject``, except that a token may be exactly ``*`` (one token) and the
    last token may be exactly ``>`` (one or more tokens).
    """
    if not isinstance(pattern, str):
        raise InvalidSubjectError(f"invalid {what}: must be a str, not {type(pattern).__name__}")
    if not pattern:
        raise InvalidSubjectError(f"invalid {what}: empty")
    _check_length(pattern, what)
    tokens = pattern.split(".")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == last):
            continue
        if token == ">":
            raise InvalidSubjectError(f"invalid {what} {pattern!r}: '>' must be the last token")
        problem = _literal_problem(token)
        if problem is not None:
            raise InvalidSubjectError(f"invalid {what} {pattern!r}: {problem}")
    return pattern


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the literal ``subject`` matches the subscription ``pattern`` (NATS rules).

    ``*`` matches exactly one token; a final ``>`` matches one or more tokens. Both
    arguments are assumed valid (see ``validate_pattern`` / ``validate_subject``).
    """
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for index, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > index
        if index >= len(s_tokens):
            return False
        if p != "*" and p != s_tokens[index]:
            return False
    return len(s_tokens) == len(p_tokens)


def _build(namespace: str, kind: str, *ids: tuple[str, str]) -> str:
    parts = [PREFIX, validate_token(namespace, "namespace"), kind]
    parts.extend(validate_token(value, what) for value, what in ids)
    return ".".join(parts)


def delta_subject(namespace: str, subject: str) -> str:
    """``wn.<namespace>.delta.<subject>``: where a subject's delta batches are published."""
    return _build(namespace, KIND_DELTA, (subject, "subject"))


def sync_subject(namespace: str, subject: str) -> str:
    """``wn.<namespace>.sync.<subject>``: where replicas of a subject answer catch-up requests."""
    return _build(namespace, KIND_SYNC, (subject, "subject"))


def heal_subject(namespace: str, subject: str) -> str:
    """``wn.<namespace>.heal.<subject>``: where the healer publishes a subject's heal reports."""
    return _build(namespace, KIND_HEAL, (subject, "subject"))


def merkle_subject(namespace: str, subject: str, node: str, verb: str) -> str:
    """``wn.<namespace>.merkle.<subject>.<node>.<verb>``: one healing endpoint of one
    replica (verbs: root, nodes, leaves, fetch, apply)."""
    return _build(namespace, KIND_MERKLE, (subject, "subject"), (node, "node"), (verb, "verb"))


def rpc_subject(namespace: str, service: str, method: str) -> str:
    """``wn.<namespace>.rpc.<service>.<method>``: one RPC endpoint (worknode RPC uses the
    replicated subject as the service: ``wn.<ns>.rpc.<subject>.<method>``)."""
    return _build(namespace, KIND_RPC, (service, "service"), (method, "method"))


def wildcard(namespace: str, kind: str, *, tail: Literal[">", "*"] = ">") -> str:
    """``wn.<namespace>.<kind>.>`` (or ``.*`` with ``tail="*"``): every subject of one kind
    in a namespace. ``kind`` is one of ``KINDS``.
    """
    if kind not in KINDS:
        raise InvalidSubjectError(f"invalid kind {kind!r}: use one of {sorted(KINDS)}")
    if tail not in (">", "*"):
        raise InvalidSubjectError(f"invalid wildcard tail {tail!r}: use '>' or '*'")
    return f"{PREFIX}.{validate_token(namespace, 'namespace')}.{kind}.{tail}"


def namespace_wildcard(namespace: str) -> str:
    """``wn.<namespace>.>``: every worknode subject in a namespace."""
    return f"{PREFIX}.{validate_token(namespace, 'namespace')}.>"


@dataclass(frozen=True, slots=True)
class SubjectParts:
    """A worknode subject taken apart: ``wn.<namespace>.<kind>.<ids...>``."""

    namespace: str
    kind: str
    ids: tuple[str, ...]


def parse_subject(subject: str) -> SubjectParts:
    """Split a subject built by this module into its parts.

    The inverse of the builders: ``parse_subject(delta_subject(ns, s))`` is
    ``SubjectParts(ns, "delta", (s,))``. Raises ``InvalidSubjectError`` for anything that
    does not follow the layout (so a wildcard subscriber can route what it receives).
    """
    validate_subject(subject)
    tokens = subject.split(".")
    if len(tokens) < 4 or tokens[0] != PREFIX or tokens[2] not in KINDS:
        raise InvalidSubjectError(f"subject {subject!r} does not follow the wn.<ns>.<kind> layout")
    namespace, kind, ids = tokens[1], tokens[2], tuple(tokens[3:])
    if len(ids) != KINDS[kind]:
        raise InvalidSubjectError(
            f"subject {subject!r}: kind {kind!r} takes {KINDS[kind]} id token(s), got {len(ids)}"
        )
    validate_token(namespace, "namespace")
    for value in ids:
        validate_token(value, "id")
    return SubjectParts(namespace, kind, ids)
