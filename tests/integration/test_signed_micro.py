"""Signed micro endpoints (``Endpoint.auth``) over a real server and the memory transport:
requests verified before the handler runs, replies (errors too) signed and bound to their
request; unsigned, replayed, relayed and over-limit requests refused and counted."""

from __future__ import annotations

from collections import Counter

import pytest

from broker.codec import AUTH_HEADER, RateLimiter, Signer, TrustRoster
from broker.errors import BadSignatureError, InvalidArgumentError, StatusCode
from broker.testing import memory_transport_pair
from broker.transport import (
    EmbeddedNatsServer,
    Endpoint,
    Msg,
    NatsTransport,
    RequestSigner,
    ServiceCallError,
    Transport,
    call,
)

SERVER = Signer("node-a", bytes(range(32)))
OTHER = Signer("node-b", bytes(range(2, 34)))
HEALER = Signer("healer", bytes(range(1, 33)))
STRANGER = Signer("node-e", bytes(range(3, 35)))
ROSTER = TrustRoster({s.node_id: s.public_key for s in (SERVER, OTHER, HEALER)})


async def _exercise(srv: Transport, cli: Transport) -> None:
    served: list[bytes] = []
    refused: Counter[str] = Counter()

    def echo(msg: Msg) -> bytes:
        served.append(msg.data)
        return b"echo:" + msg.data

    def refuse(msg: Msg) -> bytes:
        raise InvalidArgumentError("no thanks")

    responder = RequestSigner(SERVER, ROSTER)
    auth = responder.endpoint_auth(
        {"healer"},
        limiter=RateLimiter(rate=0.001, burst=5),
        on_refused=lambda msg, exc: refused.update([type(exc).__name__]),
    )
    relay = RequestSigner(OTHER, ROSTER).endpoint_auth({"healer"})
    handles = [
        await srv.add_service(
            name="signed-test", version="1.0.0", metadata={},
            endpoints=[
                Endpoint("echo", "wn.t.merkle.s.node-a.echo", echo, auth=auth),
                Endpoint("refuse", "wn.t.merkle.s.node-a.refuse", refuse, auth=auth),
                Endpoint("relay", "wn.t.merkle.s.node-b.echo", echo, auth=relay),
            ],
        )
    ]
    await srv.flush()
    healer = RequestSigner(HEALER, ROSTER)
    try:
        # Signed both ways: the healer checks the reply came from node-a, for this request.
        out = await call(cli, "wn.t.merkle.s.node-a.echo", b"hi", timeout=2, signer=healer,
                         signers={"node-a"})
        assert out == b"echo:hi"
        # An error reply is signed and bound too.
        with pytest.raises(ServiceCallError) as err:
            await call(cli, "wn.t.merkle.s.node-a.refuse", b"", timeout=2, signer=healer,
                       signers={"node-a"})
        assert err.value.code is StatusCode.INVALID_ARGUMENT
        # A reply from another responder than the one asked (a relay) is detected.
        with pytest.raises(BadSignatureError):
            await call(cli, "wn.t.merkle.s.node-b.echo", b"x", timeout=2, signer=healer,
                       signers={"node-a"})
        n_served = len(served)
        # Unsigned: refused before the handler.
        with pytest.raises(ServiceCallError) as err:
            await call(cli, "wn.t.merkle.s.node-a.echo", b"plain", timeout=2)
        assert err.value.code is StatusCode.UNAUTHENTICATED
        # Signed by a roster member that is not the healer: refused.
        with pytest.raises(ServiceCallError) as err:
            await call(cli, "wn.t.merkle.s.node-a.echo", b"y", timeout=2,
                       signer=RequestSigner(OTHER, ROSTER), signers={"node-a"})
        assert err.value.code is StatusCode.UNAUTHENTICATED
        # A stranger's key is unknown.
        with pytest.raises(ServiceCallError):
            await call(cli, "wn.t.merkle.s.node-a.echo", b"z", timeout=2,
                       signer=RequestSigner(STRANGER, ROSTER), signers={"node-a"})
        # A captured request replayed byte for byte (same headers, same inbox root).
        hdrs, _ = healer.sign("wn.t.merkle.s.node-a.echo", b"again",
                              reply_root=cli.reply_root, lifetime_ms=5000)
        first = await cli.request("wn.t.merkle.s.node-a.echo", b"again", timeout=2,
                                  headers=hdrs)
        assert first.data == b"echo:again"
        second = await cli.request("wn.t.merkle.s.node-a.echo", b"again", timeout=2,
                                   headers=hdrs)
        assert second.headers is not None
        assert second.headers.get("Nats-Service-Error-Code") == "401"
        assert AUTH_HEADER in second.headers  # the refusal is signed too
        assert served.count(b"again") == 1
        assert len(served) == n_served + 1
        # Over the rate limit: refused with RESOURCE_EXHAUSTED (burst 5 spent by now).
        codes = []
        for _ in range(6):
            try:
                await call(cli, "wn.t.merkle.s.node-a.echo", b"r", timeout=2, signer=healer,
                           signers={"node-a"})
            except ServiceCallError as exc:
                codes.append(exc.code)
        assert codes == [StatusCode.RESOURCE_EXHAUSTED] * 4  # 3 of the burst of 5 spent above
        assert refused["UnsignedMessageError"] == 1
        assert refused["BadSignatureError"] == 2  # a node's key; a stranger's
        assert refused["ReplayedRequestError"] == 1
        assert refused["ResourceExhaustedError"] == 4
    finally:
        for h in handles:
            await h.stop()


async def test_signed_endpoints_over_a_real_server(nats_server: EmbeddedNatsServer) -> None:
    async with NatsTransport([nats_server.url], name="srv") as srv, NatsTransport(
        [nats_server.url], name="cli"
    ) as cli:
        await _exercise(srv, cli)


async def test_signed_endpoints_over_the_memory_transport() -> None:
    a, b = memory_transport_pair()
    try:
        await _exercise(a, b)
    finally:
        await a.stop()
        await b.stop()
