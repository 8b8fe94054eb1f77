"""Wiring the RPC server into a worknode service (kept apart from ``_service`` on purpose)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from broker.codec import RateLimiter, TrustRoster, WireCodec
from broker.codec._signing import DOMAIN
from broker.errors import InvalidArgumentError
from broker.rpc import (
    AuthorizerPool,
    MethodRegistry,
    RevocationList,
    RpcClient,
    RpcServer,
    TokenVerifier,
    builtin_methods,
)
from broker.transport import RequestSigner
from services._reload import KeyFileWatch
from services.worknode._rpc_metrics import RpcMetrics

if TYPE_CHECKING:
    from services.worknode._service import WorknodeService

__all__ = ["NodeForwarders", "keyring_watch", "read_keyring", "start_rpc"]


class NodeForwarders:
    """The peers that may pass on a caller's token in a nested call: the roster's *nodes*
    (never the healer or a writer), read on every check so a roster reload counts."""

    __slots__ = ("roster",)

    def __init__(self, roster: TrustRoster) -> None:
        self.roster = roster

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.roster.with_role("node")

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = DOMAIN) -> None:
        """The roster's verification (``signer`` is a node: checked by ``in`` first)."""
        self.roster.verify(signer, body, signature, domain)


def read_keyring(path: Path) -> dict[int, bytes]:
    """``{key id: root public key}`` from a JSON keyring file ``{"1": "<hex>", ...}``."""
    try:
        raw = json.loads(path.read_text())
        ring = {int(k): bytes.fromhex(str(v)) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InvalidArgumentError(f"cannot read keyring {path}: {exc}") from exc
    if not ring or any(len(k) != 32 for k in ring.values()):
        raise InvalidArgumentError(f"keyring {path} must hold 32-byte Ed25519 public keys")
    return ring


async def start_rpc(
    svc: WorknodeService, codec: WireCodec, methods: MethodRegistry | None
) -> RpcServer:
    """Serve the built-in and ``methods`` on every replica of ``svc``; returns the server."""
    s = svc.settings
    assert s.rpc_keyring_file is not None
    assert svc.transport is not None
    assert svc.signer is not None
    keyring = read_keyring(s.rpc_keyring_file)
    registry = builtin_methods(s.rpc_revocation_subject)
    if methods is not None:
        registry = registry.merged(methods)
    revocations = RevocationList(svc.replica(s.rpc_revocation_subject))
    # Nested calls are signed by this node (a roster peer may pass on its caller's token) and
    # their replies must come from a roster peer.
    client = RpcClient(
        svc.transport, namespace=s.namespace, codec=codec,
        signer=RequestSigner(svc.signer, svc.roster),
    )
    server = RpcServer(
        transport=svc.transport,
        namespace=s.namespace,
        node_id=s.node_id,
        replicas=svc.replicas,
        verifier=TokenVerifier(keyring),
        keyring=keyring,
        codec=codec,
        methods=registry,
        revocations=revocations,
        caller=client.call,
        observer=RpcMetrics(svc.metrics.registry, registry.names()),
        max_in_flight=s.rpc_max_in_flight,
        max_request_bytes=s.rpc_max_request_bytes,
        signer=svc.signer,
        forwarders=NodeForwarders(svc.roster),
        authorizer=AuthorizerPool(
            workers=s.rpc_authorize_workers, budget_ms=s.rpc_authorize_budget_ms
        ),
        limiter=RateLimiter(s.rpc_rate_per_s, s.rpc_burst),
    )
    await server.start()
    svc.key_watches.append(keyring_watch(server, s.rpc_keyring_file, svc))
    return server


def keyring_watch(server: RpcServer, path: Path, svc: WorknodeService) -> KeyFileWatch:
    """Reload the keyring into ``server`` when ``path`` changes (or on SIGHUP): the same
    verifier every call uses, and the keyring nested calls attenuate with."""
    metrics = svc.trust_metrics
    metrics.keyring_keys.set(len(server.keyring))

    def load() -> None:
        ring = read_keyring(path)
        server.verifier.set_keyring(ring)
        server.keyring = dict(ring)
        metrics.keyring_keys.set(len(ring))

    return KeyFileWatch(path, load, what="rpc_keyring", owner=svc.settings.node_id,
                        metrics=metrics, interval_s=svc.settings.key_reload_interval_s)
