"""``worknode heal verify``: is a heal report genuine, and who signed it.

A report is read from a file (the packed ``SignedEnvelope`` as published) or, with
``--subject``, the next one published on ``wn.<ns>.heal.<subject>``; it is verified against a
roster (``broker.healing.verify_heal_report``): signed by a key the roster knows, over these
very bytes, by a healer identity (``--healer``, default ``healer``; a node's key does not make
a heal report), for the subject it was read from. One line says so (exit 0), or one error
line on stderr says why not (exit 1). ``worknode tail --heal`` marks each report it prints
with the same check (``report_line``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import click

from broker.codec import TrustRoster, WireCodec
from broker.errors import CodecError, TransportError
from broker.healing import VerifiedReport, healer_identities, verify_heal_report
from broker.transport import Msg, heal_subject, validate_token
from services._cli_errors import run_until_signal
from services._connection import client_options, pop_connection, with_connection
from services.worknode._service import read_roster_entries

__all__ = ["DEFAULT_HEALERS", "register_heal", "report_line"]

DEFAULT_HEALERS: tuple[str, ...] = ()
"""No ``--healer``: the roster's healer identities (``broker.healing.healer_identities``)."""
"""The healer identities trusted unless ``--healer`` names others (``HealerSettings.node_id``
defaults to ``healer``)."""


def _claimed_signer(codec: WireCodec, data: bytes) -> str:
    """Whom a report claims to be signed by (unverified), for an error line; '?' if none."""
    with contextlib.suppress(CodecError):
        env = codec.read(codec.schema.envelope.SignedEnvelope, data, "heal report envelope")
        with contextlib.suppress(Exception):
            return str(env.signer) or "?"
    return "?"


def _summary(report: VerifiedReport) -> str:
    state = "converged" if report.converged else "NOT converged"
    return (f"{report.subject}: {state}, {len(report.replicas)} replicas, "
            f"{report.keys_repaired} keys repaired, {report.round_trips} round trips")


def report_line(
    codec: WireCodec, data: bytes, trust: TrustRoster | None, healers: Collection[str],
    subject: str,
) -> tuple[bool, str]:
    """``(verified, one line)`` describing a heal report read from ``subject``'s heal
    subject: ``verified by healer <id>`` or ``UNVERIFIED (<why>)``."""
    try:
        keys = trust or TrustRoster()
        report = verify_heal_report(codec, data, keys, healer_identities(keys, healers),
                                    subject=subject)
    except CodecError as exc:
        why = "no roster given" if trust is None else f"{type(exc).__name__}: {exc}"
        return False, (f"heal report signed as {_claimed_signer(codec, data)!r}: "
                       f"UNVERIFIED ({why})")
    return True, f"{_summary(report)} -- verified by healer {report.signer}"


def register_heal(main: click.Group) -> None:
    """Add ``worknode heal verify`` to the ``worknode`` group."""

    @main.group()
    def heal() -> None:
        """Heal reports: check who signed them."""

    @heal.command("verify")
    @click.argument("report_file", required=False,
                    type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--roster", required=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="JSON roster to verify against.")
    @click.option("--healer", "healers", multiple=True, default=DEFAULT_HEALERS,
                  show_default=True,
                  help="A healer identity (roster id) whose reports are trusted; repeat.")
    @click.option("--subject", default=None,
                  help="Verify the next report published for this subject instead of a file "
                       "(also checks the report speaks of it).")
    @click.option("--nats-url", "nats_urls", multiple=True,
                  help="NATS server URL (with --subject; repeat for a cluster).")
    @click.option("--namespace", default="default", show_default=True)
    @click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
                  help="With --subject: how long to wait for a report.")
    @with_connection
    def verify(report_file: Path | None, roster: Path, healers: tuple[str, ...],
               subject: str | None, nats_urls: tuple[str, ...], namespace: str,
               timeout: float, **conn: Any) -> None:
        """Verify a heal report (REPORT_FILE, or the next one on --subject) and say who
        signed it; exit 1 if it is forged, altered, or not signed by a healer identity."""
        if (report_file is None) == (subject is None):
            raise click.UsageError("give a REPORT_FILE or --subject, not both")
        # With its roles (who is a healer) and previous keys inside their overlap window.
        trust = TrustRoster.from_entries(read_roster_entries(roster), now=time.time)
        codec = WireCodec()
        if report_file is not None:
            data = report_file.read_bytes()
        else:
            assert subject is not None
            if not nats_urls:
                raise click.UsageError("--subject needs --nats-url")
            data = run_until_signal(lambda: _next_report(
                list(nats_urls), validate_token(namespace, "namespace"),
                validate_token(subject, "subject"), timeout, pop_connection(conn),
            ))
        try:
            report = verify_heal_report(codec, data, trust, healer_identities(trust, healers),
                                        subject=subject)
        except CodecError as exc:
            raise type(exc)(
                f"INVALID heal report (signed as {_claimed_signer(codec, data)!r}): {exc}"
            ) from exc
        click.echo(f"valid: heal report signed by healer {report.signer}: {_summary(report)}")


async def _next_report(
    nats_urls: list[str], namespace: str, subject: str, wait_s: float, given: dict[str, Any]
) -> bytes:
    """The next heal report published for ``subject`` (``TransportError`` after
    ``wait_s`` seconds)."""
    options = client_options("worknode-heal-verify", nats_urls, given)
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    async with options.transport(name="worknode-heal-verify") as transport:
        await transport.subscribe(heal_subject(namespace, subject), handle)
        try:
            return await asyncio.wait_for(got, wait_s or None)
        except TimeoutError:
            raise TransportError(
                f"no heal report for {subject!r} within {wait_s} s"
            ) from None
