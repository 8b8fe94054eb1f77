"""The token authorizer's worker processes (real child processes): a normal authorization
answers, a Datalog-heavy one is cut at its budget (its worker killed and replaced), and stop
leaves no process behind."""

from __future__ import annotations

import time

import biscuit_auth as bi
import pytest

from broker.rpc import (
    AuthorizeJob,
    AuthorizerPool,
    Grant,
    PermissionDeniedError,
    RootKey,
    TokenLimitError,
    TokenVerifier,
    UnavailableError,
    mint,
)

ROOT = RootKey(1, bytes(range(32)))
HOLDER = bytes(range(32, 64))


def _costly(token: bytes) -> bytes:
    parsed = bi.Biscuit.from_bytes(
        token, lambda kid: bi.PublicKey.from_bytes(ROOT.public_key, bi.Algorithm.Ed25519)
    )
    code = ("\n".join(f"n({i});" for i in range(126))
            + "\ncheck if n($a), n($b), " + " + ".join(["$a * $b"] * 300) + " == -1;")
    return bytes(parsed.append(bi.BlockBuilder(code)).to_bytes())


async def test_the_budget_kills_a_costly_authorization_and_the_pool_carries_on() -> None:
    verifier = TokenVerifier({1: ROOT.public_key})
    token = mint(ROOT, [Grant("shop", "orders", "root", ("get",))],
                 expires_at=time.time() + 60, holder=HOLDER)

    def job(tok: bytes, method: str = "get") -> AuthorizeJob:
        return verifier.job(tok, namespace="shop", subject="orders", path=("root",),
                            method=method, now=time.time())

    pool = AuthorizerPool(workers=1, budget_ms=100)
    await pool.start()
    try:
        await pool.authorize(job(token), wait_ms=10_000)  # waits for the worker to start
        with pytest.raises(PermissionDeniedError):
            await pool.authorize(job(token, "set"), wait_ms=10_000)
        first = next(iter(pool._all)).proc
        with pytest.raises(TokenLimitError):
            await pool.authorize(job(_costly(token)), wait_ms=10_000)
        assert pool.killed == 1
        assert first.returncode is not None  # that worker is gone
        await pool.authorize(job(token), wait_ms=10_000)  # a new one serves
        procs = [w.proc for w in pool._all]
    finally:
        await pool.stop()
    assert all(p.returncode is not None for p in procs)
    with pytest.raises(UnavailableError):
        await pool.authorize(job(token), wait_ms=10)
