"""Heal reports: sealed by the healer, verified by anyone holding the roster.

A heal report (``schemas/healer.capnp`` ``HealReport``) travels on ``wn.<ns>.heal.<subject>``
in a ``SignedEnvelope`` whose ``signature`` is the signer's Ed25519 signature over the packed
report under ``REPORT_DOMAIN`` (so no delta, request or reply signature can pass for one).
A report is *verified* when:

- it is signed (``UnsignedMessageError`` otherwise), by a key the roster knows
  (``UnknownSignerError``), and the signature holds over these very bytes
  (``BadSignatureError``: an altered report fails here);
- its signer is a healer identity (``healers``): a node's roster key signs deltas, not
  heal reports (``BadSignatureError``);
- it speaks of the subject it was read from, when that is known (``BadSignatureError``: a
  report for one subject replayed on another's).

Pure: bytes in, a ``VerifiedReport`` or a ``CodecError`` subclass out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from broker.codec import REPORT_DOMAIN, KeyLookup, Signer, TrustRoster, WireCodec, decoding
from broker.errors import BadSignatureError, UnsignedMessageError

__all__ = [
    "LEGACY_HEALER_ID",
    "VerifiedReport",
    "healer_identities",
    "seal_heal_report",
    "verify_heal_report",
]

LEGACY_HEALER_ID = "healer"
"""The healer's default id: the healer identity of a roster written before roles."""


def healer_identities(roster: TrustRoster, explicit: Collection[str] = ()) -> frozenset[str]:
    """Who may call healing endpoints and sign heal reports: ``explicit`` ids when given
    (an operator's choice), else the roster's entries of role ``healer``; a roster that names
    none (written before roles existed) falls back to the id ``healer`` if it trusts one."""
    if explicit:
        return frozenset(explicit)
    found = roster.with_role("healer")
    if found:
        return found
    return frozenset({LEGACY_HEALER_ID}) if LEGACY_HEALER_ID in roster else frozenset()


@dataclass(frozen=True)
class VerifiedReport:
    """A heal report whose signature, signer and subject were checked."""

    signer: str
    subject: str
    replicas: tuple[str, ...]
    converged: bool
    keys_repaired: int
    round_trips: int
    duration_ms: int


def seal_heal_report(codec: WireCodec, signer: Signer, report: bytes) -> bytes:
    """The packed ``SignedEnvelope`` carrying ``report`` (a packed ``HealReport``), signed."""
    signed = codec.schema.envelope.SignedEnvelope.new_message()
    signed.signer = signer.node_id
    signed.signature = signer.sign(report, REPORT_DOMAIN)
    signed.body = report
    return signed.to_bytes_packed()  # type: ignore[no-any-return]


def verify_heal_report(
    codec: WireCodec,
    data: bytes,
    keys: KeyLookup,
    healers: Collection[str] | None,
    *,
    subject: str | None = None,
) -> VerifiedReport:
    """The verified report in ``data`` (see the module doc); ``healers`` None accepts any
    signer the keys know (only for a roster holding nothing but healers)."""
    env = codec.read(codec.schema.envelope.SignedEnvelope, data, "heal report envelope")
    with decoding("heal report envelope"):
        signer, signature, body = str(env.signer), bytes(env.signature), bytes(env.body)
    if not signer or not signature:
        raise UnsignedMessageError("heal report carries no signer or signature")
    keys.verify(signer, body, signature, REPORT_DOMAIN)
    if healers is not None and signer not in healers:
        raise BadSignatureError(f"heal report signed by {signer!r}, not a healer identity")
    report = codec.read(codec.schema.healer.HealReport, body, "heal report")
    with decoding("heal report"):
        out = VerifiedReport(
            signer=signer,
            subject=str(report.subject),
            replicas=tuple(str(r) for r in report.replicas),
            converged=bool(report.converged),
            keys_repaired=int(report.keysRepaired),
            round_trips=int(report.roundTrips),
            duration_ms=int(report.durationMs),
        )
    if subject is not None and out.subject != subject:
        raise BadSignatureError(
            f"heal report for {out.subject!r} read from subject {subject!r} (replayed?)"
        )
    return out
