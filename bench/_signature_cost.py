"""What the signatures cost: per signed request/reply exchange and per delta batch, in-process.

Used by ``bench.rpc_bench`` (per call) and ``bench.replication_bench`` (per batch, and per
catch-up exchange) to report the cost of issue 16's request/reply binding beside the
end-to-end figures. Each step is timed in interleaved rounds (the CPUs change speed every few
seconds); the table gives the median microseconds per step and the spread over rounds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from broker.codec import (
    RequestAuth,
    Signer,
    TrustRoster,
    WireCodec,
    sign_reply,
    sign_request,
    verify_reply,
    verify_request,
)
from broker.crdt import HybridClock, ORMap

_SUBJECT = "wn.bench.sync.s"
_ROOT = "_INBOX.UBENCH"
_HEADERS = {"Worknode-Sync": "request"}


def _rounds(steps: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():  # interleaved: every step once per round
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            out[name].append((time.perf_counter() - t0) / n * 1e6)
    return out


def exchange_cost(body_size: int, n: int = 200, rounds: int = 5) -> dict[str, list[float]]:
    """Microseconds per step of one signed exchange (request and reply of ``body_size``
    bytes each): the requester signs, the responder verifies, signs its reply, the requester
    verifies it."""
    a, b = Signer("caller", os.urandom(32)), Signer("server", os.urandom(32))
    roster = TrustRoster({"caller": a.public_key, "server": b.public_key})
    body = os.urandom(body_size)
    auth: RequestAuth = sign_request(a, subject=_SUBJECT, reply_root=_ROOT, body=body,
                                     headers=_HEADERS, now_ms=1, nonce=os.urandom(16))
    header = auth.header()
    reply = sign_reply(b, auth.digest, body=body, headers=None, now_ms=1)
    steps: dict[str, Callable[[], Any]] = {
        "requester: sign request": lambda: sign_request(
            a, subject=_SUBJECT, reply_root=_ROOT, body=body, headers=_HEADERS, now_ms=1,
            nonce=os.urandom(16)),
        "responder: verify request": lambda: verify_request(
            roster, header, subject=_SUBJECT, reply=_ROOT + ".x", body=body, headers=_HEADERS,
            now_ms=2),
        "responder: sign reply": lambda: sign_reply(
            b, auth.digest, body=body, headers=None, now_ms=1),
        "requester: verify reply": lambda: verify_reply(
            roster, reply, request=auth, body=body, headers={}),
    }
    return _rounds(steps, n, rounds)


def batch_cost(ops: int, n: int = 50, rounds: int = 5) -> dict[str, list[float]]:
    """Microseconds per delta batch of ``ops`` distinct fields: the envelope's signature
    alone (sign, verify) and the whole seal/open it sits in."""
    signer = Signer("writer", os.urandom(32))
    roster = TrustRoster({"writer": signer.public_key})
    codec = WireCodec()
    clock = HybridClock()
    state, batch = ORMap(), ORMap(is_delta=True)
    for i in range(ops):
        d = state.assign("writer", (f"k{i}",), i, clock.now(physical_ms=1_800_000_000_000))
        state.merge(d)
        batch.merge(d)
    data = codec.seal(signer, subject=_SUBJECT, hlc=1, sequence=1, document=batch)
    body = data  # the signed body is the envelope less ~100 B: the same cost
    sig = signer.sign(body)
    steps: dict[str, Callable[[], Any]] = {
        "writer: Ed25519 sign of the batch": lambda: signer.sign(body),
        "replica: Ed25519 verify of the batch": lambda: roster.verify("writer", body, sig),
        "writer: seal (encode + sign)": lambda: codec.seal(
            signer, subject=_SUBJECT, hlc=1, sequence=1, document=batch),
        "replica: open (verify + decode)": lambda: codec.open(data, roster),
    }
    return _rounds(steps, n, rounds)


def table(costs: dict[str, list[float]], per: str, *, total: bool = False) -> list[str]:
    """Markdown rows ``| step (us per <per>) | median | min - max |``; with ``total`` a last
    row sums the steps (per round)."""
    rows = []
    sums = [sum(xs) for xs in zip(*costs.values(), strict=True)]
    for name, xs in costs.items():
        rows.append(f"| {name} (us per {per}) | {statistics.median(xs):,.1f} | "
                    f"{min(xs):,.1f} - {max(xs):,.1f} |")
    if total:
        rows.append(f"| every step of one {per} (us) | {statistics.median(sums):,.1f} | "
                    f"{min(sums):,.1f} - {max(sums):,.1f} |")
    return rows
