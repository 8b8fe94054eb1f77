"""The fuzz targets: one per entry point that reads bytes from the network.

A target builds its valid seed messages once per worker (``setup``), turns a seed into a
hostile case (``case``: a mutation, re-signed by a roster key where the entry point checks a
signature, so the bytes reach the decoder), and feeds a case to the real entry point (``run``),
which answers ``ACCEPTED`` or the reason it was refused. Anything else a case does (another
exception, an abort, a hang) is a finding.

Entry points and what stands in for the network:

- ``delta``: ``Replica._on_delta`` (a published batch), refusals read from its observer;
- ``sync-request``: ``Replica._on_sync`` (catch-up requests and announces);
- ``sync-reply``: ``Replica._catchup`` with the transport's request answering the case
  (requests and replies signed and bound as peers send them, so cases reach the decoder);
- ``heal-root``, ``heal-nodes``, ``heal-leaves``, ``heal-fetch``, ``heal-apply``: the five
  handlers of ``HealEndpoints`` (refusals counted by its ``rejected`` counter);
- ``healer-root-reply``, ``healer-nodes-reply``, ``healer-leaves-reply``,
  ``healer-fetch-reply`` (a signed envelope), ``healer-apply-reply``: the healer's
  ``HealClient`` reading a replica's answers (seeds: real answers of the endpoints above);
- ``rpc-request``: ``decode_request`` and the token check the server runs on it;
- ``rpc-response``: ``decode_response`` (what a client reads).

Replica-side targets run a real ``Replica`` on a ``MemoryTransport`` over a ``DurableStore`` in
a temporary directory, holding a small state, so accepted cases are joined and logged as in
production.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
import tempfile
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.codec import (
    AUTH_HEADER,
    CURRENT_VERSION,
    ReplayGuard,
    Signer,
    TrustRoster,
    WireCodec,
    parse_auth,
    request_digest,
    sign_reply,
)
from broker.crdt import ORMap
from broker.errors import ClockSkewError, CodecError, ResourceExhaustedError, RpcError
from broker.healing import HealClient, HealEndpoints, Voucher, VoucherRefusedError
from broker.healing._wire import VERBS
from broker.replica import NullReplicaObserver, Replica, ReplicaConfig, reject_reason
from broker.replication import RequestCatchup
from broker.rpc import (
    Grant,
    Request,
    Response,
    RootKey,
    TokenVerifier,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    mint,
)
from broker.store import DurableStore
from broker.transport import (
    MemoryNetwork,
    Msg,
    RequestSigner,
    delta_subject,
    merkle_subject,
    sync_subject,
)
from tests.fuzz._documents import wide
from tests.fuzz._words import pack, unpack

__all__ = ["ACCEPTED", "TARGETS", "Harness", "Target"]

ACCEPTED = "accepted"
NS, SUBJECT, NODE, PEER = "fz", "orders", "n1", "w2"
T0 = 1_700_000_000_000 << 16
NOW_S = 1_700_000_000.0
PEER_SIGNER = Signer(PEER, b"p" * 32)
NODE_SIGNER = Signer(NODE, b"n" * 32)
ROSTER = TrustRoster({PEER: PEER_SIGNER.public_key, NODE: NODE_SIGNER.public_key})
SECRET = b"s" * 32
ROOT_KEY = RootKey(1, b"k" * 32)


class _Rejects(NullReplicaObserver):
    """Counts the replica's refusals by reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        self.counts[reason] += 1


@dataclass
class Harness:
    """What a worker's cases run against (built once per batch)."""

    codec: WireCodec
    replica: Replica | None = None
    endpoints: HealEndpoints | None = None
    rejects: _Rejects = field(default_factory=_Rejects)
    extra: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop what ``setup`` started."""
        for close in reversed(self.closers):
            await close()


# -- seeds -------------------------------------------------------------------------------------


def _ops(m: ORMap, writer: str, n: int, t: int) -> ORMap:
    """``n`` writes of every kind by ``writer`` on ``m``; returns their joined delta."""
    d = ORMap(is_delta=True)
    for i in range(n):
        steps = [
            lambda i=i: m.assign(writer, (f"k{i}", "title"), f"text {i}", t + i),
            lambda i=i: m.increment(writer, (f"k{i}", "count"), i - 3),
            lambda i=i: m.add(writer, (f"k{i}", "tags"), f"tag{i % 3}"),
            lambda i=i: m.assign_multi(writer, (f"k{i}", "blob"), bytes([i, 0, 255])),
            lambda i=i: m.assign(writer, (f"k{i}", "n", "deep"), 2**40 + i, t + i),
        ]
        for step in steps[: 1 + i % len(steps)]:
            x = step()
            m.merge(x)
            d.merge(x)
    return d


def _state(n: int, writer: str = PEER) -> ORMap:
    m = ORMap()
    _ops(m, writer, n, T0)
    return m


def _deltas() -> list[ORMap]:
    m = ORMap()
    return [_ops(m, PEER, 2, T0 + 100), _ops(m, PEER, 40, T0 + 200)]  # plain and compressed


def _wide() -> list[ORMap]:
    """Batches of 20 writes of each shape the fast reader reads as columns (``wide``)."""
    return [wide(random.Random(shape), T0, shape, 20) for shape in range(4)]


def _seal(codec: WireCodec, subject: str, doc: ORMap, *, state: bool = False) -> bytes:
    return codec.seal(PEER_SIGNER, subject=subject, hlc=T0 + 1_000, sequence=1, document=doc,
                      is_state=state)


# -- mutations ---------------------------------------------------------------------------------


def mutate_words(rng: random.Random, raw: bytes) -> bytes:
    """One to three word-level corruptions of unpacked message bytes: pointer offsets, list
    sizes, struct sizes, pointer kinds, far pointers, copied words, the segment table."""
    b = bytearray(raw)
    n = len(b) // 8
    if not n:
        return bytes(b)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        i = rng.randrange(n)
        w = struct.unpack_from("<Q", b, 8 * i)[0]
        lo, hi = w & 0xFFFFFFFF, w >> 32
        op = rng.randrange(9)
        if op == 0:  # pointer offset (30 signed bits): far out, negative, or off by a little
            off = rng.choice((rng.randrange(-(1 << 29), 1 << 29), (1 << 29) - 1, -(1 << 29),
                              (lo >> 2) + rng.choice((-2, -1, 1, 2, 64))))
            lo = (lo & 3) | ((off & 0x3FFFFFFF) << 2)
        elif op == 1:  # list element size and count
            hi = rng.randrange(8) | (rng.choice((1, 2, 255, 1 << 20, (1 << 29) - 1)) << 3)
        elif op == 2:  # struct data words / pointer count
            hi = rng.randrange(1 << 16) | (rng.randrange(1 << 16) << 16)
        elif op == 3:  # pointer kind: struct, list, far, capability
            lo = (lo & ~3) | rng.randrange(4)
        elif op == 4:  # a far pointer into a segment that may not exist
            lo = 2 | (rng.randrange(1 << 29) << 3) | (rng.randrange(2) << 2)
            hi = rng.choice((0, 1, 2, 511, rng.randrange(1 << 32)))
        elif op == 5:  # another word copied here (a pointer spliced onto another)
            j = rng.randrange(n)
            lo, hi = struct.unpack_from("<II", b, 8 * j)
        elif op == 6:
            lo, hi = rng.randrange(1 << 32), rng.randrange(1 << 32)
        elif op == 7:
            w ^= 1 << rng.randrange(64)
            lo, hi = w & 0xFFFFFFFF, w >> 32
        else:  # the segment table
            i = 0
            lo, hi = struct.unpack_from("<II", b, 0)
            if rng.random() < 0.5:
                lo = rng.choice((0, 1, 2, 511))
            else:
                hi = rng.choice((0, 1, hi - 1, hi + 1, 1 << 20))
        struct.pack_into("<II", b, 8 * i, lo & 0xFFFFFFFF, hi & 0xFFFFFFFF)
    return bytes(b)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage to a packed stream: flips, set bytes, cuts, inserts, splices."""
    b = bytearray(data)
    r = rng.random()
    if r < 0.05:
        return rng.randbytes(rng.randrange(0, 200))
    if r < 0.15:
        return bytes(b[: rng.randrange(0, len(b))])
    for _ in range(rng.randrange(1, 5)):
        if not b:
            break
        i = rng.randrange(len(b))
        op = rng.randrange(5)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
        elif op == 2:
            del b[i : i + rng.randrange(1, 9)]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
        else:
            j = rng.randrange(len(b))
            k = rng.randrange(1, 17)
            b[j : j + k] = b[i : i + k]
    return bytes(b)


def mutate_message(rng: random.Random, packed: bytes) -> bytes:
    """A hostile variant of a valid packed message: mostly word-level (pointers), sometimes
    byte-level."""
    if rng.random() < 0.75:
        raw = unpack(packed)
        if raw is not None:
            return pack(mutate_words(rng, raw))
    return mutate_bytes(rng, packed)


def _resign(codec: WireCodec, body: bytes, signer: Signer = PEER_SIGNER) -> bytes:
    outer = codec.schema.envelope.SignedEnvelope.new_message()
    outer.signer = signer.node_id
    outer.signature = signer.sign(body)
    outer.body = body
    return outer.to_bytes_packed()  # type: ignore[no-any-return]


def mutate_envelope(rng: random.Random, codec: WireCodec, envelope: bytes) -> bytes:
    """A hostile variant of a valid signed envelope, re-signed by its (trusted) signer so it
    reaches the body decoder: the body's words damaged (70%), the compressed document inside
    damaged and re-compressed (15% where there is one), or the outer message damaged and not
    re-signed (15%)."""
    outer = codec.schema.envelope.SignedEnvelope.from_bytes_packed(envelope)
    body = bytes(outer.body)
    signer = NODE_SIGNER if outer.signer == NODE else PEER_SIGNER
    r = rng.random()
    if r < 0.15:
        return mutate_message(rng, envelope)
    if r < 0.30:
        env = codec.schema.envelope.Envelope.from_bytes_packed(body)
        which = env.which()
        if which in ("deltaBatchZlib", "stateZlib"):
            doc = zlib.decompress(bytes(getattr(env, which)))
            b = env.as_builder()  # a valid body this module sealed: safe to copy
            setattr(b, which, zlib.compress(mutate_message(rng, doc)))
            return _resign(codec, b.to_bytes_packed(), signer)
    return _resign(codec, mutate_message(rng, body), signer)


# -- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One entry point under fuzzing."""

    name: str
    doc: str
    setup: Callable[[], Awaitable[Harness]]
    seeds: Callable[[Harness], list[bytes]]
    case: Callable[[random.Random, Harness, bytes], bytes]
    run: Callable[[Harness, bytes, random.Random], Awaitable[str]]


async def _replica_harness(heal: bool = False) -> Harness:
    codec = WireCodec(CURRENT_VERSION)
    tmp = tempfile.TemporaryDirectory(prefix="wn-fuzz-")
    net = MemoryNetwork()
    transport = net.transport(NODE)
    transport._open()
    store = DurableStore(Path(tmp.name) / "fuzz.db", synchronous="normal")
    store.open()
    h = Harness(codec)
    h.rejects = _LastReason(h)
    replica = Replica(
        signer=NODE_SIGNER, roster=ROSTER, codec=codec, transport=transport, store=store,
        # No rate limit: every case is a request from the same peer.
        config=ReplicaConfig(namespace=NS, subject=SUBJECT, catchup_timeout=0.05,
                             catchup_serve_rate=1e12, catchup_serve_burst=1e12),
        observer=h.rejects, now_ms=lambda: T0 >> 16,
    )
    await replica.start()
    await replica.apply_repair(_ops(replica.state.copy(), NODE, 12, T0))
    h.replica = replica

    async def close() -> None:
        await replica.stop(flush_timeout=0.5)
        await transport.stop()
        store.close()
        tmp.cleanup()

    h.closers.append(close)
    if heal:
        h.endpoints = HealEndpoints(
            transport=transport, namespace=NS, replicas={SUBJECT: replica}, signer=NODE_SIGNER,
            roster=ROSTER, codec=codec, secret=SECRET,
        )
    return h


def _envelope_case(rng: random.Random, h: Harness, seed: bytes) -> bytes:
    return mutate_envelope(rng, h.codec, seed)


def _message_case(rng: random.Random, h: Harness, seed: bytes) -> bytes:
    return mutate_message(rng, seed)


def _replica(h: Harness) -> Replica:
    assert h.replica is not None
    return h.replica


async def _observed(h: Harness, call: Awaitable[None]) -> str:
    """Run a replica handler that counts refusals on its observer: the reason, if it did."""
    h.extra.pop("last", None)
    await call
    reason: str = h.extra.pop("last", ACCEPTED)
    return reason


class _LastReason(_Rejects):
    """Like ``_Rejects``, and remembers the last reason for the case that caused it."""

    def __init__(self, h: Harness) -> None:
        super().__init__()
        self.h = h

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        super().rejected(subject, reason, writer)
        self.h.extra["last"] = reason

    def catchup_refused(self, subject: str, reason: str) -> None:
        self.counts[reason] += 1
        self.h.extra["last"] = reason


# delta ---------------------------------------------------------------------------------------


def _delta_seeds(h: Harness) -> list[bytes]:
    subject = delta_subject(NS, SUBJECT)
    v1 = WireCodec(1)
    return [_seal(h.codec, subject, d) for d in _deltas()] + [_seal(v1, subject, _deltas()[0])]


async def _delta_run(h: Harness, data: bytes, rng: random.Random) -> str:
    msg = Msg(delta_subject(NS, SUBJECT), data)
    return await _observed(h, _replica(h)._on_delta(msg))


# sync request / announce ---------------------------------------------------------------------


def _sync_request_seeds(h: Harness) -> list[bytes]:
    probe = ORMap(None, _state(6).context.copy(), is_delta=True)
    return [_seal(h.codec, sync_subject(NS, SUBJECT), probe),
            _seal(h.codec, sync_subject(NS, SUBJECT), ORMap(is_delta=True))]


async def _sync_request_run(h: Harness, data: bytes, rng: random.Random) -> str:
    kind = rng.choice(("request", "announce"))
    replica = _replica(h)
    if len(replica.requests.replay) > 50_000:  # the clock stands still: nothing expires
        replica.requests.replay = ReplayGuard()
    # Signed by the peer (fresh nonce), so the case reaches the envelope decoder.
    nonces = h.extra.setdefault("nonces", itertools.count())
    peer = RequestSigner(PEER_SIGNER, ROSTER, wall_ms=lambda: T0 >> 16,
                         nonce=lambda n: next(nonces).to_bytes(n, "big"))
    subject = sync_subject(NS, SUBJECT)
    headers, _ = peer.sign(subject, data, {"Worknode-Sync": kind},
                           reply_root="_INBOX" if kind == "request" else "")
    msg = Msg(subject, data, "_INBOX.fuzz" if kind == "request" else "", headers)
    return await _observed(h, replica._on_sync(msg))


# sync reply (catch-up state) -----------------------------------------------------------------


def _sync_reply_seeds(h: Harness) -> list[bytes]:
    subject = sync_subject(NS, SUBJECT)
    return [_seal(h.codec, subject, _state(3), state=True),
            _seal(h.codec, subject, _state(40), state=True),
            _seal(h.codec, subject, ORMap(is_delta=True))]


async def _sync_reply_run(h: Harness, data: bytes, rng: random.Random) -> str:
    replica = _replica(h)

    async def answer(subject: str, payload: bytes, **kw: Any) -> list[Msg]:
        # The peer's reply, signed and bound to the request, so the case reaches the decoder.
        request = parse_auth(kw["headers"][AUTH_HEADER])
        digest = request_digest(request, subject=subject, body=payload, headers=kw["headers"])
        auth = sign_reply(PEER_SIGNER, digest, body=data, headers=None, now_ms=T0 >> 16)
        reply = Msg("_INBOX.fuzz", data, "", {AUTH_HEADER: auth})
        return [reply] if kw["accept"](reply) else []

    replica.transport.request_many = answer  # type: ignore[method-assign]
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    reason = await _observed(h, replica._catchup(RequestCatchup(PEER, 0.05), done))
    if reason == ACCEPTED and not done.result():
        raise AssertionError("a catch-up reply neither joined nor refused")
    return reason


# healer endpoints ----------------------------------------------------------------------------


def _endpoints(h: Harness) -> HealEndpoints:
    assert h.endpoints is not None
    return h.endpoints


def _healer_request(h: Harness, struct_name: str, **fields: Any) -> bytes:
    msg = getattr(h.codec.schema.healer, struct_name).new_message()
    for name, value in fields.items():
        if isinstance(value, list):
            lst = msg.init(name, len(value))
            for i, v in enumerate(value):
                lst[i] = v
        else:
            setattr(msg, name, value)
    return msg.to_bytes_packed()  # type: ignore[no-any-return]


def _heal_seeds(verb: str) -> Callable[[Harness], list[bytes]]:
    def seeds(h: Harness) -> list[bytes]:
        r = _healer_request
        if verb == "root":
            return [r(h, "RootRequest", subject=SUBJECT),
                    r(h, "RootRequest", subject=SUBJECT, levels=2, hashBytes=6,
                      levelsUnless=b"x" * 32)]
        if verb in ("nodes", "leaves"):
            tree = _endpoints(h).trees[SUBJECT].current()
            bits = tree.fanout.bit_length() - 1
            depth = tree.depth
            size = max(1, (depth * bits + 7) // 8)
            both = [r(h, "NodeHashesRequest", subject=SUBJECT, prefixes=[b"\x01", b"\x02"]),
                    r(h, "NodeHashesRequest", subject=SUBJECT, prefixLevel=1, hashBytes=6,
                      packedPrefixes=b"\x00\x03"),
                    r(h, "NodeHashesRequest", subject=SUBJECT, prefixLevel=depth, hashBytes=4,
                      digestsOnly=True, packedPrefixes=bytes(size) + b"\x00" * (size - 1)
                      + b"\x05")]
            if verb == "nodes":
                return both[:2]
            # leaves are asked at leaf level (a shorter prefix would list a whole subtree)
            return [r(h, "NodeHashesRequest", subject=SUBJECT,
                      prefixes=[bytes(depth), bytes(depth - 1) + b"\x02"]),
                    r(h, "NodeHashesRequest", subject=SUBJECT, prefixLevel=depth, hashBytes=6,
                      packedPrefixes=bytes(size) + b"\x00" * (size - 1) + b"\x03"),
                    both[2]]
        if verb == "fetch":
            return [r(h, "FetchStatesRequest", subject=SUBJECT, keys=["k1", "k3", "nope"]),
                    r(h, "FetchStatesRequest", subject=SUBJECT, hashBytes=4,
                      items=b"\x00\x00\x00\x02abcd\x00\x00\x00\x07efgh")]
        # A voucher: another replica's (PEER's) fetch reply, as the healer forwards it.
        subject = merkle_subject(NS, SUBJECT, PEER, "fetch")
        return [_seal(h.codec, subject, d) for d in _deltas()]

    return seeds


def _heal_run(verb: str) -> Callable[[Harness, bytes, random.Random], Awaitable[str]]:
    async def run(h: Harness, data: bytes, rng: random.Random) -> str:
        ep = _endpoints(h)
        handler = ep._handler(SUBJECT, verb)
        before = sum(ep.rejected.values())
        try:
            await handler(Msg(merkle_subject(NS, SUBJECT, NODE, verb), data))
        except (CodecError, ResourceExhaustedError, VoucherRefusedError,
                ClockSkewError) as exc:
            if sum(ep.rejected.values()) != before + 1:
                raise AssertionError(f"{verb}: a refusal not counted: {exc!r}") from exc
            if isinstance(exc, VoucherRefusedError):
                return exc.reason  # a voucher its source cannot vouch for
            if isinstance(exc, ClockSkewError):
                return "clock_skew"
            # more work than one request may ask: refused before doing it, counted apart
            return reject_reason(exc) if isinstance(exc, CodecError) else "too_costly"
        return ACCEPTED

    return run


# the healer's side: replies from a replica -------------------------------------------------


def _healer_calls(verb: str) -> Callable[[HealClient, Harness], Awaitable[object]]:
    """The client call that reads a ``verb`` reply (one request per call)."""

    async def call(client: HealClient, h: Harness) -> object:
        if verb == "root":
            return await client.root(SUBJECT, NODE, levels=2, width=6)
        if verb == "nodes":
            return await client.nodes(SUBJECT, NODE, [(1,), (2,)])
        if verb == "leaves":
            depth = _endpoints(h).trees[SUBJECT].current().depth
            return await client.leaf_digests(
                SUBJECT, NODE, [(0,) * depth, (0,) * (depth - 1) + (5,)], 4
            )
        if verb == "fetch":
            return await client.fetch(SUBJECT, NODE, ["k1", "k3", "nope"])
        doc = _deltas()[0]
        raw = _seal(h.codec, merkle_subject(NS, SUBJECT, PEER, "fetch"), doc)
        return await client.push(SUBJECT, NODE, Voucher(PEER, doc, raw))

    return call


async def _healer_harness() -> Harness:
    """A replica with its endpoints, and a healer's client whose calls are answered by them
    (to record valid replies: the seeds) or by the case under test."""
    h = await _replica_harness(heal=True)
    client = HealClient(_replica(h).transport, namespace=NS, codec=h.codec,
                        signer=PEER_SIGNER, roster=ROSTER)
    ep = _endpoints(h)
    replies: dict[str, list[bytes]] = {}

    async def real(subject: str, node: str, verb: str, body: bytes) -> bytes:
        data: bytes = await ep._handler(subject, verb)(Msg(verb, body))
        replies.setdefault(verb, []).append(data)
        return data

    client._call = real  # type: ignore[method-assign]
    for verb in VERBS:
        await _healer_calls(verb)(client, h)
    h.extra["client"], h.extra["replies"] = client, replies
    return h


def _healer_run(verb: str) -> Callable[[Harness, bytes, random.Random], Awaitable[str]]:
    async def run(h: Harness, data: bytes, rng: random.Random) -> str:
        client: HealClient = h.extra["client"]

        async def answer(subject: str, node: str, verb: str, body: bytes) -> bytes:
            return data

        client._call = answer  # type: ignore[method-assign]
        try:
            await _healer_calls(verb)(client, h)
        except CodecError as exc:
            return reject_reason(exc)
        return ACCEPTED

    return run


def _healer_target(verb: str, what: str) -> Target:
    return Target(
        f"healer-{verb}-reply", f"the healer reading a replica's {what} (HealClient)",
        _healer_harness, lambda h: h.extra["replies"][verb],
        _envelope_case if verb == "fetch" else _message_case, _healer_run(verb),
    )


# rpc -----------------------------------------------------------------------------------------


async def _rpc_harness() -> Harness:
    h = Harness(WireCodec(CURRENT_VERSION))
    h.extra["verifier"] = TokenVerifier({ROOT_KEY.key_id: ROOT_KEY.public_key})
    h.extra["token"] = mint(ROOT_KEY, [Grant(NS, SUBJECT)], expires_at=NOW_S + 3600,
                           holder=bytes(range(32)))
    return h


def _rpc_request_seeds(h: Harness) -> list[bytes]:
    token = h.extra["token"]
    reqs = [
        Request("root", "get", {}, token, 5000, 0, b"t" * 16),
        Request("k1", "set", {"field": "title", "value": "x" * 40, "n": 3, "f": 1.5,
                              "b": b"\x00\x01", "z": None, "t": True}, token, 200, 3, b""),
    ]
    return [encode_request(h.codec, r) for r in reqs]


async def _rpc_request_run(h: Harness, data: bytes, rng: random.Random) -> str:
    try:
        req = decode_request(h.codec, data)
        h.extra["verifier"].verify(req.token, namespace=NS, subject=SUBJECT,
                                   path=("root",), method="get", now=NOW_S)
    except RpcError as exc:
        return type(exc).__name__
    return ACCEPTED


def _rpc_response_seeds(h: Harness) -> list[bytes]:
    from broker.errors import StatusCode

    resps = [
        Response(StatusCode.OK, "", {"value": "v", "n": 1}, _state(4), b"t" * 16),
        Response(StatusCode.PERMISSION_DENIED, "no", {"reason": "x"}, None, b""),
    ]
    return [encode_response(h.codec, r) for r in resps]


async def _rpc_response_run(h: Harness, data: bytes, rng: random.Random) -> str:
    try:
        decode_response(h.codec, data)
    except RpcError as exc:
        return type(exc).__name__
    return ACCEPTED


# fast codec: differential against pycapnp -----------------------------------------------------


class DifferentialError(AssertionError):
    """The fast codec and pycapnp disagreed on one input (a finding)."""


async def _differential_harness() -> Harness:
    h = Harness(WireCodec(CURRENT_VERSION, peer_version=CURRENT_VERSION))
    h.extra["oracle"] = WireCodec(CURRENT_VERSION, peer_version=CURRENT_VERSION, fast=False)
    return h


def _differential_seeds(h: Harness) -> list[bytes]:
    subject = delta_subject(NS, SUBJECT)
    plain = WireCodec(CURRENT_VERSION)  # peer_version 1: uncompressed
    docs = [*_deltas(), _state(8), *_wide()]
    return ([_seal(plain, subject, d) for d in docs] + [_seal(h.codec, subject, d) for d in docs]
            + [_seal(plain, subject, _state(5), state=True)])


def _open_outcome(codec: WireCodec, data: bytes, keep: bool) -> tuple[str, Any]:
    try:
        return ACCEPTED, codec.open(data, ROSTER, keep_packed=keep)
    except CodecError as exc:
        return type(exc).__name__, None


async def _differential_run(h: Harness, data: bytes, rng: random.Random) -> str:
    # Signed (re-signed after mutation) envelopes through WireCodec.open, fast path vs
    # pycapnp: both refuse with the same error class, or both accept with equal envelopes.
    keep = rng.random() < 0.2
    fast = _open_outcome(h.codec, data, keep)
    oracle = _open_outcome(h.extra["oracle"], data, keep)
    if fast != oracle:
        raise DifferentialError(f"fast codec {fast[0]}, pycapnp {oracle[0]}")
    return fast[0]


def _reader_seeds(h: Harness) -> list[bytes]:
    return [h.codec.encode_document(d) for d in [*_deltas(), _state(8), _state(2), *_wide()]]


async def _reader_run(h: Harness, data: bytes, rng: random.Random) -> str:
    # The pure-Python reader alone (over unpack(), no pycapnp copy first) on hostile bytes:
    # only CodecErrors; what it accepts, pycapnp accepts with equal content.
    from broker.codec._fast import read_document
    from broker.codec._fast import unpack as fast_unpack

    try:
        got = read_document(fast_unpack(data), h.codec.schema.kinds)
    except CodecError as exc:
        return type(exc).__name__
    oracle = _open_doc(h.extra["oracle"], data)
    if oracle != got:
        raise DifferentialError("the fast reader accepted what pycapnp reads otherwise")
    return ACCEPTED


def _open_doc(codec: WireCodec, data: bytes) -> Any:
    try:
        return codec.decode_document(data)
    except CodecError as exc:
        return type(exc).__name__


# self-test: proves the runner sees an abort ---------------------------------------------------


async def _plain_harness() -> Harness:
    return Harness(WireCodec(CURRENT_VERSION))


async def _abort_run(h: Harness, data: bytes, rng: random.Random) -> str:
    if rng.random() < 0.5:
        import os

        os.abort()
    return ACCEPTED


async def _hang_run(h: Harness, data: bytes, rng: random.Random) -> str:
    import time

    time.sleep(3600)
    return ACCEPTED


def _replica_h() -> Awaitable[Harness]:
    return _replica_harness()


def _heal_h() -> Awaitable[Harness]:
    return _replica_harness(heal=True)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("delta", "a published delta batch (Replica._on_delta)", _replica_h,
               _delta_seeds, _envelope_case, _delta_run),
        Target("sync-request", "a catch-up request or announce (Replica._on_sync)", _replica_h,
               _sync_request_seeds, _envelope_case, _sync_request_run),
        Target("sync-reply", "a catch-up reply: a state transfer (Replica._catchup)",
               _replica_h, _sync_reply_seeds, _envelope_case, _sync_reply_run),
        Target("heal-root", "healer root request (HealEndpoints root)", _heal_h,
               _heal_seeds("root"), _message_case, _heal_run("root")),
        Target("heal-nodes", "healer node-hashes request (HealEndpoints nodes)", _heal_h,
               _heal_seeds("nodes"), _message_case, _heal_run("nodes")),
        Target("heal-leaves", "healer leaves request (HealEndpoints leaves)", _heal_h,
               _heal_seeds("leaves"), _message_case, _heal_run("leaves")),
        Target("heal-fetch", "healer state fetch (HealEndpoints fetch)", _heal_h,
               _heal_seeds("fetch"), _message_case, _heal_run("fetch")),
        Target("heal-apply", "a signed repair (HealEndpoints apply)", _heal_h,
               _heal_seeds("apply"), _envelope_case, _heal_run("apply")),
        _healer_target("root", "root reply"),
        _healer_target("nodes", "node hashes"),
        _healer_target("leaves", "leaf digests"),
        _healer_target("fetch", "fetched states (a signed envelope)"),
        _healer_target("apply", "apply reply"),
        Target("rpc-request", "an RPC request body and its token (decode_request, verify)",
               _rpc_harness, _rpc_request_seeds, _message_case, _rpc_request_run),
        Target("rpc-response", "an RPC response body (decode_response)", _rpc_harness,
               _rpc_response_seeds, _message_case, _rpc_response_run),
        Target("codec-differential", "signed envelopes: fast codec vs pycapnp (WireCodec.open)",
               _differential_harness, _differential_seeds, _envelope_case, _differential_run),
        Target("fast-reader", "a packed document: the fast reader alone vs pycapnp",
               _differential_harness, _reader_seeds, _message_case, _reader_run),
    ]
}
"""Every entry point, by name (``python -m tests.fuzz --target NAME``)."""

SELF_TESTS: dict[str, Target] = {
    "selftest-abort": Target("selftest-abort", "aborts on half the cases", _plain_harness,
                             lambda h: [b"\x00" * 8], _message_case, _abort_run),
    "selftest-hang": Target("selftest-hang", "hangs on every case", _plain_harness,
                            lambda h: [b"\x00" * 8], _message_case, _hang_run),
}
"""Targets that misbehave on purpose: the tests prove the runner reports them."""
