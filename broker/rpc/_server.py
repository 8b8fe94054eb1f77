"""The RPC server: a worknode service's methods as NATS micro (ADR-32) endpoints.

One micro service ``worknode-rpc`` per node (metadata: ``node``, ``namespace``, ``subjects``,
``methods``), with one endpoint per (subject, method) on ``wn.<ns>.rpc.<subject>.<method>``,
in the ADR-32 queue group: every node that replicates a subject serves its worknodes' methods,
and each request goes to one of them. Bodies are ``RpcRequest`` / ``RpcResponse``; an error
travels both in the body (status code and message) and in the ``Nats-Service-Error`` /
``Nats-Service-Error-Code`` headers.

What happens to one request, in order (each refusal answers at once with its status):

1. the server is stopping -> ``UNAVAILABLE``; the body is larger than ``max_request_bytes``,
   or ``max_in_flight`` requests already run at this endpoint -> ``RESOURCE_EXHAUSTED``
   (never queued);
2. decode (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION`` for an unsupported wire version);
   call depth above ``MAX_CALL_DEPTH`` -> ``RESOURCE_EXHAUSTED`` (``CallDepthExceededError``);
   a deadline already passed -> ``DEADLINE_EXCEEDED`` and the work is dropped, not run;
3. the token must be valid (``UNAUTHENTICATED``), within the ``TokenLimits``
   (``RESOURCE_EXHAUSTED``, reason ``token_limit``), name a holder, and the request must be
   signed (``Worknode-Auth``) by that holder's key, fresh and not replayed (else
   ``UNAUTHENTICATED``: a sniffed token is useless to anyone else), within the holder's rate
   (``limiter``: else ``RESOURCE_EXHAUSTED``); a peer in ``forwarders``
   (the roster: nodes making nested calls) may sign instead of the holder. Then it must grant
   the method on the worknode's subtree (``PERMISSION_DENIED``): a decision not cached runs
   in an ``AuthorizerPool`` worker process under a hard budget (``token_limit`` when over),
   never on the event loop. Only then is a missing worknode ``NOT_FOUND`` (a missing
   worknode is authorized as a child of the root, so a token for another subtree learns
   nothing about it). A call asking ``consistency: "strong"`` on a STRONG worknode missing
   here (for a create: its parent) is not refused yet: this replica may only lag the
   subject's STRONG log, and the worknode's create may have been acknowledged before the
   call began (``NOT_FOUND`` then would not be linearizable). Its authorization waits: the
   log is fenced first (applied here up to its current end, within the deadline:
   ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED`` as for any STRONG operation), the worknode
   looked up again, and the call authorized against the path found then, its real one;
   still missing, it is ``NOT_FOUND`` as above. It never runs on a decision taken for
   another path (the root-child one: a token refusing its subtree would pass that);
4. the handler runs under the remaining deadline. A coroutine handler runs in its own task
   and is cancelled when the deadline passes; a plain-function handler runs inline (steps 1-3
   do too, synchronously on the receive path, but for an authorization not cached and a
   fence) and cannot be cancelled. Either way a late result is discarded and the caller
   gets ``DEADLINE_EXCEEDED``.

Every reply, refusals included, is signed by this node and bound to the request it answers
(``Worknode-Auth``), so a client detects a relayed or replayed response. The revocation
subject serves only ``revoke`` and reads: generic writes to it are refused whatever the token
grants (its set is add-only).

This is the thin adapter: protocol, deadlines and token checks are the pure modules
``_protocol`` and ``_capability``; this module reads the clocks and moves bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import nacl.bindings
import nacl.exceptions
import nacl.signing

from broker.codec import (
    AUTH_HEADER,
    KeyLookup,
    RateLimiter,
    ReplayGuard,
    Signer,
    WireCodec,
    verify_request,
)
from broker.codec._binding import REPLAY_SHARE, REQUEST_DOMAIN
from broker.codec._signing import SIGNATURE_SIZE
from broker.crdt import ROOT_ID, Tree, validate_node_id
from broker.errors import (
    BadSignatureError,
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcInvalidArgumentError,
    RpcNotFoundError,
    SignatureError,
    StatusCode,
    TokenLimitError,
    UnauthenticatedError,
    UnavailableError,
    UnknownSignerError,
    WorknodeError,
)
from broker.replica import Replica
from broker.replication import is_strong
from broker.rpc._capability import NO_HOLDER, AuthorizeJob, TokenVerifier, attenuate, authorize
from broker.rpc._protocol import (
    MAX_CALL_DEPTH,
    MAX_REQUEST_BYTES,
    Deadline,
    Request,
    Response,
    check_depth,
    child_depth,
    decode_request,
    encode_response,
    encode_result,
    error_response,
    new_response,
)
from broker.rpc._revocation import RevocationList
from broker.rpc._worker import AuthorizerPool

if TYPE_CHECKING:
    from broker.crdt._ops import TreeOp
    from broker.strong import StrongMode
from broker.transport import (
    Endpoint,
    ErrorReply,
    Msg,
    RequestSigner,
    ServiceHandle,
    Transport,
    rpc_subject,
)

__all__ = [
    "AUTHORIZE_PENALTY_S",
    "DEFAULT_MAX_IN_FLIGHT",
    "OTHER_METHOD",
    "READ_METHODS",
    "RPC_SERVICE",
    "CallContext",
    "Forwarders",
    "HolderKeys",
    "MethodRegistry",
    "NullRpcObserver",
    "RpcObserver",
    "RpcServer",
    "builtin_methods",
]

log = logging.getLogger(__name__)

RPC_SERVICE: Final = "worknode-rpc"
DEFAULT_MAX_IN_FLIGHT: Final = 64
"""Requests one endpoint runs at once (the ``rpc_max_in_flight`` setting's default)."""
OTHER_METHOD: Final = "other"
"""The metrics label for a method name that is not registered."""
AUTHORIZE_PENALTY_S: Final = 10.0
"""After one of its tokens ran over the authorization budget, a holder's tokens not yet
authorized on this node are refused for this long (its cached decisions still hold). Only the
root key mints holders, so this bounds what one holder's hostile tokens cost a node: one
budget (and one worker restart) per period, whatever it attenuates offline."""
READ_METHODS: Final = frozenset({"get"})
"""Methods that only read: with ``revoke``, all the revocation subject serves."""
_VERSION: Final = "1.0.0"
_MAX_PATH: Final = 1024
_MAX_PATHS: Final = 4096


class RpcObserver(Protocol):
    """Receives RPC server events (metrics). Methods are synchronous and cheap."""

    def request(self, method: str, code: StatusCode, seconds: float) -> None:
        """A request to ``method`` ended with ``code`` after ``seconds`` of handling."""
        ...

    def in_flight(self, method: str, delta: int) -> None:
        """Requests running at ``method`` changed by ``delta``."""
        ...

    def token_verified(self, seconds: float) -> None:
        """A token check took ``seconds``."""
        ...


class NullRpcObserver:
    """An ``RpcObserver`` that ignores every event."""

    def request(self, method: str, code: StatusCode, seconds: float) -> None:
        """Ignore."""

    def in_flight(self, method: str, delta: int) -> None:
        """Ignore."""

    def token_verified(self, seconds: float) -> None:
        """Ignore."""


Caller = Callable[..., Awaitable[Response]]


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it serves, and how it calls further.

    ``call`` passes on the time remaining (never the original deadline), the call depth + 1,
    the trace id, and the caller's token attenuated to expire with this call's deadline
    (narrowed further by ``methods`` / ``worknode`` when given).
    """

    namespace: str
    subject: str
    worknode: str
    method: str
    arguments: Mapping[str, Any]
    trace_id: bytes
    depth: int
    deadline: Deadline
    token: bytes
    replica: Replica
    revocations: RevocationList | None = None
    _server: RpcServer | None = field(default=None, repr=False)

    def remaining_ms(self) -> int:
        """Milliseconds left before this call's deadline."""
        return self.deadline.remaining_ms(_now_ms())

    async def call(
        self,
        subject: str,
        worknode: str,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout_ms: float | None = None,
        methods: Collection[str] | None = None,
        subtree: str | None = None,
    ) -> Response:
        """Call ``method`` on ``worknode`` of ``subject`` (same namespace) from this handler."""
        server = self._server
        if server is None or server.caller is None:
            raise UnavailableError("this server cannot make nested calls")
        depth = child_depth(self.depth)
        timeout = self.deadline.child_timeout_ms(_now_ms(), timeout_ms)
        token = attenuate(
            self.token,
            server.keyring,
            methods=methods,
            worknode=subtree,
            expires_at=math.ceil(time.time() + timeout / 1000),
        )
        return await server.caller(
            subject, worknode, method, arguments or {}, token=token, timeout_ms=timeout,
            depth=depth, trace_id=self.trace_id,
        )


Result = Mapping[str, Any] | Response | None
Handler = Callable[[CallContext], Awaitable[Result] | Result]
"""A method: a coroutine function, or a plain function for a method that never waits (it
runs inline on the receive path, with no task and no timer; keep it short)."""


@dataclass(frozen=True, slots=True)
class _Method:
    name: str
    handler: Handler
    creates: bool
    subjects: frozenset[str] | None


class MethodRegistry:
    """Methods a server exposes; register user handlers with ``@registry.method("name")``.

    A handler takes a ``CallContext`` and returns the result arguments (a mapping of atoms),
    a full ``Response`` (to return a state), or None. Raise an ``RpcError`` (or an
    ``InvalidArgumentError``) to answer with that status.
    """

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    def method(
        self, name: str, *, creates: bool = False, subjects: Collection[str] | None = None
    ) -> Callable[[Handler], Handler]:
        """Register the decorated handler as ``name``. ``creates``: the worknode need not
        exist yet (it is authorized by its future parent's subtree); ``subjects``: serve it
        only on these subjects."""
        from broker.transport import validate_token

        validate_token(name, "method")

        def deco(fn: Handler) -> Handler:
            self._methods[name] = _Method(
                name, fn, creates, frozenset(subjects) if subjects is not None else None
            )
            return fn

        return deco

    def merged(self, other: MethodRegistry) -> MethodRegistry:
        """A registry with this one's methods and ``other``'s (``other`` wins)."""
        out = MethodRegistry()
        out._methods = {**self._methods, **other._methods}
        return out

    def names(self) -> list[str]:
        """Registered method names, sorted."""
        return sorted(self._methods)

    def get(self, name: str) -> _Method | None:
        """The method registered as ``name``."""
        return self._methods.get(name)

    def for_subject(self, subject: str) -> list[_Method]:
        """Methods served on ``subject``."""
        return [
            m for _, m in sorted(self._methods.items())
            if m.subjects is None or subject in m.subjects
        ]


_monotonic: Final = time.monotonic
_perf_counter: Final = time.perf_counter


def _now_ms() -> float:
    return _monotonic() * 1000.0


class _Ancestry:
    """A replica's resolved parent edges and the paths asked for, recomputed only after the
    tree changed (at most ``_MAX_PATHS`` paths are remembered)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._parents: dict[str, str] | None = None
        self._paths: dict[str, tuple[str, ...]] = {}
        replica.add_change_listener(self._on_change)

    def _on_change(self, keys: Collection[str] | None) -> None:
        self._parents = None
        self._paths = {}

    def path(self, worknode: str) -> tuple[str, ...] | None:
        """``(worknode, parent, ..., root)``, or None if the worknode does not exist."""
        known = self._paths.get(worknode)
        if known is not None:
            return known
        if worknode == ROOT_ID:
            return (ROOT_ID,)
        if self._parents is None:
            self._parents = Tree(self.replica.state).parents()
        parents = self._parents
        if worknode not in parents:
            return None
        out = [worknode]
        cur = parents[worknode]
        while cur != ROOT_ID and len(out) < _MAX_PATH:
            out.append(cur)
            cur = parents.get(cur, ROOT_ID)
        out.append(ROOT_ID)
        path = tuple(out)
        if len(self._paths) < _MAX_PATHS:
            self._paths[worknode] = path
        return path


_open: Final = nacl.bindings.crypto_sign_open


class Forwarders(KeyLookup, Protocol):
    """Peers that may sign a request carrying a token someone else holds (a ``TrustRoster``:
    nodes passing on their caller's token in nested calls)."""

    def __contains__(self, node_id: object) -> bool:
        """Whether ``node_id`` is such a peer."""
        ...


class HolderKeys:
    """The ``KeyLookup`` of one RPC request: its signature must verify with the public key of
    the token's holder (the signer id is then only a label), or be a ``forwarders`` peer's."""

    __slots__ = ("_forwarders", "_key")

    def __init__(self, holder: bytes, forwarders: Forwarders | None = None) -> None:
        try:
            # Checked as a key once; verified with the binding directly (see ``verify``).
            self._key = bytes(nacl.signing.VerifyKey(holder))
        except (nacl.exceptions.ValueError, nacl.exceptions.TypeError):
            raise UnauthenticatedError("the token's holder is not an Ed25519 public key") from None
        self._forwarders = forwarders

    def verify(
        self, signer: str, body: bytes, signature: bytes, domain: bytes = REQUEST_DOMAIN
    ) -> None:
        """Raise a ``SignatureError`` subclass unless the holder (or a forwarder) signed."""
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignatureError(f"signature is {len(signature)} bytes, not {SIGNATURE_SIZE}")
        try:
            # What VerifyKey.verify does, without its encoder and checks: on every request.
            _open(signature + domain + body, self._key)
            return
        except nacl.exceptions.BadSignatureError:
            pass
        forwarders = self._forwarders
        if forwarders is not None and signer in forwarders:
            forwarders.verify(signer, body, signature, domain)
            return
        raise BadSignatureError(
            f"request signed by {signer!r} is not signed by the token's holder"
        )


class _SignedReplies:
    """``Endpoint.auth`` of the RPC endpoints: requests pass through (their signature is
    checked with the key their token names, once the body is decoded); every reply is signed
    by this node and bound to its request.

    The digest a reply binds to is the SHA-256 of the request's signed bytes, which verifying
    the request computed already: ``remember`` keeps it for that very message object (held,
    so its id cannot be reused meanwhile) until its reply is signed, and the reply does not
    parse the header and rebuild and hash the signed bytes a second time. A request never
    verified (refused before) gets its digest computed from what arrived, as before; the
    table is bounded (full: cleared, and the replies recompute)."""

    __slots__ = ("_digests", "signer")

    def __init__(self, signer: RequestSigner) -> None:
        self.signer = signer
        self._digests: dict[int, tuple[Msg, bytes]] = {}

    def authenticate(self, msg: Msg) -> None:
        """Nothing yet (see the class doc)."""

    def remember(self, msg: Msg, digest: bytes) -> None:
        """``msg`` verified, its signed bytes hashing to ``digest``."""
        digests = self._digests
        if len(digests) >= _MAX_DIGESTS:
            digests.clear()
        digests[id(msg)] = (msg, digest)

    def reply_headers(
        self, msg: Msg, body: bytes, headers: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The reply's headers, signed."""
        known = self._digests.pop(id(msg), None)
        digest = known[1] if known is not None and known[0] is msg else None
        return self.signer.reply_headers(msg, body, headers, digest=digest)


def _status_of(exc: BaseException) -> StatusCode:
    """The status answering ``exc``: its own ``code`` (every ``WorknodeError`` has one); a
    builtin ``ValueError`` from a handler is bad input; anything else is a bug."""
    if isinstance(exc, WorknodeError):
        return exc.code
    if isinstance(exc, ValueError):
        return StatusCode.INVALID_ARGUMENT
    return StatusCode.INTERNAL


class RpcServer:
    """Serves ``methods`` for every replica in ``replicas`` (see module doc).

    ``caller`` makes nested calls (an ``RpcClient.call``); ``wall_clock`` gives Unix seconds for
    token expiry (injectable for tests). ``signer`` signs every reply (without one, replies go
    unsigned: tests of the pure paths only); ``forwarders`` may sign requests carrying a token
    they do not hold; ``authorizer`` runs uncached authorizations under a budget (None: inline,
    on the event loop: tests only); ``limiter`` bounds each token holder's request rate
    (``RESOURCE_EXHAUSTED`` over it).
    """

    def __init__(
        self,
        *,
        transport: Transport,
        namespace: str,
        node_id: str,
        replicas: Mapping[str, Replica],
        verifier: TokenVerifier,
        keyring: Mapping[int, bytes],
        codec: WireCodec,
        methods: MethodRegistry,
        revocations: RevocationList | None = None,
        caller: Caller | None = None,
        observer: RpcObserver | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        wall_clock: Callable[[], float] = time.time,
        signer: Signer | None = None,
        forwarders: Forwarders | None = None,
        authorizer: AuthorizerPool | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        if max_in_flight < 1 or max_request_bytes < 64:
            raise InvalidArgumentError("max_in_flight >= 1 and max_request_bytes >= 64")
        self.transport = transport
        self.namespace = namespace
        self.node_id = node_id
        self.replicas = dict(replicas)
        self.verifier = verifier
        self.keyring = dict(keyring)
        self.codec = codec
        self.methods = methods
        self.revocations = revocations
        self.caller = caller
        self.observer: RpcObserver = observer if observer is not None else NullRpcObserver()
        self.max_in_flight = max_in_flight
        self.max_request_bytes = max_request_bytes
        self.wall_clock = wall_clock
        self.forwarders = forwarders
        self.authorizer = authorizer
        self.limiter = limiter
        """Requests per token holder (a bucket per holder key), checked once the request is
        known to be the holder's (None: no limit)."""
        # A holder's share: one token holder's flood of fresh requests cannot lock out others.
        # Requests issued before this server existed are refused: a request captured before
        # a restart cannot be served twice.
        self.replay = ReplayGuard(
            per_signer=REPLAY_SHARE, not_before_ms=int(wall_clock() * 1000)
        )
        self._holder_keys: dict[bytes, HolderKeys] = {}
        self._penalized: dict[bytes, float] = {}
        self._auth = (
            _SignedReplies(RequestSigner(signer, forwarders or _NoKeys()))
            if signer is not None else None
        )
        self._ancestry = {s: _Ancestry(r) for s, r in self.replicas.items()}
        self._in_flight: dict[tuple[str, str], int] = {}
        self._service: ServiceHandle | None = None
        self._stopping = False

    @property
    def method_labels(self) -> list[str]:
        """The bounded set of method labels this server reports (plus ``other``)."""
        return [*self.methods.names(), OTHER_METHOD]

    def in_flight(self, subject: str, method: str) -> int:
        """Requests running now at one endpoint."""
        return self._in_flight.get((subject, method), 0)

    async def start(self) -> None:
        """Register the micro service. Idempotent."""
        if self._service is not None:
            return
        self._stopping = False
        if self.authorizer is not None:
            await self.authorizer.start()
        endpoints = []
        for subject in sorted(self.replicas):
            for m in self.methods.for_subject(subject):
                endpoints.append(
                    Endpoint(
                        f"{subject}-{m.name}",
                        rpc_subject(self.namespace, subject, m.name),
                        self._endpoint(subject, m),
                        concurrent=True,
                        auth=self._auth,
                    )
                )
        self._service = await self.transport.add_service(
            name=RPC_SERVICE,
            version=_VERSION,
            description="worknode RPC: capability-checked methods of worknodes",
            endpoints=endpoints,
            metadata={
                "node": self.node_id,
                "namespace": self.namespace,
                "subjects": ",".join(sorted(self.replicas)),
                "methods": ",".join(self.methods.names()),
            },
        )

    async def stop(self) -> None:
        """Refuse new requests (``UNAVAILABLE``), let running ones finish (bounded), and
        unregister. Idempotent."""
        if self._service is None:
            return
        self._stopping = True
        service, self._service = self._service, None
        await service.stop()  # unsubscribes, then waits (bounded) for running requests
        if self.authorizer is not None:
            await self.authorizer.stop()

    # -- one request ---------------------------------------------------------------------

    def _endpoint(self, subject: str, m: _Method) -> Callable[[Msg], bytes | Awaitable[bytes]]:
        key = (subject, m.name)

        def handle(msg: Msg) -> bytes | Awaitable[bytes]:
            return self._handle(key, m, msg)

        return handle

    def _refuse(self, code: StatusCode, message: str, trace_id: bytes = b"") -> ErrorReply:
        return self._reply(Response(code, message, trace_id=trace_id))

    def _reply(self, response: Response) -> ErrorReply:
        body = encode_response(self.codec, response)
        code = response.status
        return ErrorReply(code.http, f"{code.label}: {response.message}", body)

    def _error_reply(self, subject: str, label: str, exc: Exception, trace: bytes) -> ErrorReply:
        if isinstance(exc, WorknodeError):
            return self._reply(error_response(exc, str(exc) or type(exc).__name__, trace))
        code = _status_of(exc)
        if code is StatusCode.INTERNAL:
            log.error("rpc %s.%s failed", subject, label, exc_info=exc)
            text = f"internal error: {type(exc).__name__}"
        else:
            text = str(exc) or type(exc).__name__
        return self._refuse(code, text, trace)

    def _done(self, key: tuple[str, str], code: StatusCode, t0: float) -> None:
        self._in_flight[key] -= 1
        label = key[1]
        observer = self.observer
        observer.in_flight(label, -1)
        observer.request(label, code, (_monotonic() * 1000.0 - t0) / 1000.0)

    def _handle(self, key: tuple[str, str], m: _Method, msg: Msg) -> bytes | Awaitable[bytes]:
        """Everything up to the handler runs here, synchronously, on the receive path. A
        handler that answers without awaiting (a plain function) is answered at once, with
        no task and no timer; a coroutine handler's rest runs in its own task (returned as
        an awaitable) under the remaining deadline, and so does an authorization not cached
        (in the authorizer pool) and whatever follows it."""
        t0 = _monotonic() * 1000.0
        subject, label = key
        if self._stopping:
            self.observer.request(label, StatusCode.UNAVAILABLE, 0.0)
            raise self._refuse(StatusCode.UNAVAILABLE, f"{self.node_id} is stopping")
        if len(msg.data) > self.max_request_bytes:
            self.observer.request(label, StatusCode.RESOURCE_EXHAUSTED, 0.0)
            raise self._refuse(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request of {len(msg.data)} bytes, over max_request_bytes="
                f"{self.max_request_bytes}",
            )
        in_flight = self._in_flight
        running = in_flight.get(key, 0)
        if running >= self.max_in_flight:
            self.observer.request(label, StatusCode.RESOURCE_EXHAUSTED, 0.0)
            raise self._refuse(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_in_flight} requests already in flight at {subject}.{label}",
            )
        in_flight[key] = running + 1
        self.observer.in_flight(label, 1)
        code = StatusCode.INTERNAL
        trace = b""
        handed_off = False
        try:
            req = decode_request(self.codec, msg.data)
            trace = req.trace_id
            admitted = self._admit(subject, m, req, t0, msg)
            if isinstance(admitted, _Pending):
                handed_off = True
                return self._authorize_then_run(subject, m, key, req, admitted, t0)
            ctx = admitted
            out = self._invoke(m, req, ctx)
            if not isinstance(out, bytes):
                handed_off = True
                return self._finish(subject, m, key, req, ctx.deadline, out, t0)
            code = StatusCode.OK
            return out
        except ErrorReply:
            raise
        except Exception as exc:
            code = _status_of(exc)
            raise self._error_reply(subject, label, exc, trace) from None
        finally:
            if not handed_off:
                self._done(key, code, t0)

    async def _authorize_then_run(
        self,
        subject: str,
        m: _Method,
        key: tuple[str, str],
        req: Request,
        pending: _Pending,
        t0: float,
    ) -> bytes:
        """The rest of a request whose authorization was not cached: authorize it in the
        pool (the event loop only waits), then run the handler as ``_handle`` would. A
        lagging STRONG call (no job yet) fences first (``_fenced``)."""
        code = StatusCode.INTERNAL
        handed_off = False
        ctx = pending.ctx
        try:
            job, missing = pending.job, pending.missing
            if job is None:
                job, missing = await self._fenced(subject, m, req, pending)
            if job is not None:
                v0 = _perf_counter()
                try:
                    assert self.authorizer is not None
                    await self.authorizer.authorize(
                        job, wait_ms=ctx.deadline.remaining_ms(_now_ms())
                    )
                except TokenLimitError:
                    self.verifier.too_costly(job.token)  # never run it again
                    self._penalize(pending.holder)
                    raise
                finally:
                    self.observer.token_verified(_perf_counter() - v0)
                self.verifier.remember(job)
            if missing:
                raise RpcNotFoundError(missing)
            if ctx.deadline.expired(_now_ms()):
                raise DeadlineExceededError("deadline passed before the handler ran")
            out = self._invoke(m, req, ctx)
            if not isinstance(out, bytes):
                handed_off = True
                return await self._finish(subject, m, key, req, ctx.deadline, out, t0)
            code = StatusCode.OK
            return out
        except ErrorReply:
            raise
        except Exception as exc:
            code = _status_of(exc)
            raise self._error_reply(subject, m.name, exc, req.trace_id) from None
        finally:
            if not handed_off:
                self._done(key, code, t0)

    async def _finish(
        self,
        subject: str,
        m: _Method,
        key: tuple[str, str],
        req: Request,
        deadline: Deadline,
        pending: Awaitable[Any],
        t0: float,
    ) -> bytes:
        code = StatusCode.INTERNAL
        try:
            left = deadline.remaining_ms(_now_ms())
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left / 1000.0):
                    out = await pending
            except TimeoutError:
                # The handler was cancelled: its late result is discarded, never sent.
                raise self._late(m, req) from None
            finally:
                if left <= 0 and inspect.iscoroutine(pending):
                    pending.close()  # never started: do not leave it unawaited
            body = _encode(self.codec, out, req)
            code = StatusCode.OK
            return body
        except ErrorReply:
            raise
        except Exception as exc:
            code = _status_of(exc)
            raise self._error_reply(subject, m.name, exc, req.trace_id) from None
        finally:
            self._done(key, code, t0)

    def _invoke(self, m: _Method, req: Request, ctx: CallContext) -> bytes | Awaitable[Any]:
        """Run the handler: the encoded response of a plain function, or the awaitable a
        coroutine handler returned (``_finish`` awaits it under the deadline). A result past
        the deadline is discarded (``DeadlineExceededError``)."""
        try:
            out = m.handler(ctx)
        except TimeoutError:
            raise self._late(m, req) from None
        # (An exact type first: the ABC check costs more than the rest of this function.)
        if type(out) is not dict and type(out) is not Response and isinstance(out, Awaitable):
            return out
        if _monotonic() * 1000.0 > ctx.deadline.at_ms:
            raise self._late(m, req)  # the late result is discarded
        return _encode(self.codec, out, req)

    @staticmethod
    def _late(m: _Method, req: Request) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"{m.name} on {req.worknode} did not finish within the deadline"
        )

    def penalized(self, holder: bytes) -> bool:
        """Whether ``holder``'s tokens not yet authorized are refused now (see
        ``AUTHORIZE_PENALTY_S``)."""
        until = self._penalized.get(holder)
        if until is None:
            return False
        if _monotonic() < until:
            return True
        del self._penalized[holder]
        return False

    def _penalize(self, holder: bytes) -> None:
        if len(self._penalized) >= _MAX_PENALIZED:
            now = _monotonic()
            self._penalized = {h: t for h, t in self._penalized.items() if t > now}
            if len(self._penalized) >= _MAX_PENALIZED:
                return  # full of live penalties: the budget alone still bounds each token
        self._penalized[holder] = _monotonic() + AUTHORIZE_PENALTY_S

    def _caller(self, msg: Msg, holder: bytes | None, wall_s: float) -> None:
        """The request must be signed by the token's holder (or a forwarder), fresh and not
        replayed; else ``UnauthenticatedError``."""
        if holder is None:
            raise UnauthenticatedError(NO_HOLDER)
        keys = self._holder_keys.get(holder)
        if keys is None:
            keys = HolderKeys(holder, self.forwarders)
            if len(self._holder_keys) >= _MAX_HOLDER_KEYS:
                self._holder_keys.clear()
            self._holder_keys[holder] = keys
        now_ms = int(wall_s * 1000)
        headers = msg.headers or {}
        try:
            auth = verify_request(
                keys, headers.get(AUTH_HEADER), subject=msg.subject, reply=msg.reply,
                body=msg.data, headers=headers, now_ms=now_ms,
            )
            # Counted against the holder (the signer id is only a label a caller picks).
            owner = holder.hex()
            self.replay.check(auth, now_ms, owner)
        except SignatureError as exc:  # replayed and expired requests included
            raise UnauthenticatedError(
                f"request not signed by the token's holder: {exc}"
            ) from None
        if self._auth is not None:
            self._auth.remember(msg, auth.digest)
        limiter = self.limiter
        if limiter is not None and not limiter.allow(owner, now_ms):
            raise ResourceExhaustedError(
                "requests of this token's holder over their rate limit; retry later"
            )

    def _admit(
        self, subject: str, m: _Method, req: Request, t0: float, msg: Msg
    ) -> CallContext | _Pending:
        """Method, depth, deadline, token and caller checks; the handler's context if all
        pass, or what remains when the authorization is not cached (``_Pending``)."""
        if req.method != m.name:
            raise RpcInvalidArgumentError(
                f"request for method {req.method!r} sent to the endpoint of {m.name!r}"
            )
        if req.call_depth > MAX_CALL_DEPTH:
            check_depth(req.call_depth)  # raises
        deadline = Deadline.start(t0, req.deadline_ms)
        if not deadline.at_ms - _monotonic() * 1000.0 >= 1.0:  # Deadline.expired, inlined
            raise DeadlineExceededError("deadline passed before the request was handled")
        if self.revocations is not None and subject == self.revocations.subject and (
            m.name != "revoke" and m.name not in READ_METHODS
        ):
            # Its set is add-only: no token, not even one granting ``*``, writes it otherwise.
            raise PermissionDeniedError(
                f"{subject} is the revocation subject: it serves only revoke and reads"
            )
        worknode = req.worknode
        path = self._ancestry[subject].path(worknode)  # only valid ids are in the tree
        missing = ""
        lagging = False
        if path is None:
            path, missing, absent = self._missing_path(subject, m, req)
            lagging = bool(missing) and self._may_lag(subject, req, absent)
        v0 = _perf_counter()
        now = self.wall_clock()
        verifier = self.verifier
        try:
            admitted = verifier.admit(
                req.token, now=now,
                revoked=self.revocations.ids if self.revocations is not None else (),
            )
            self._caller(msg, admitted.holder, now)
            pending: AuthorizeJob | None = None
            # The cached decision first: the job is built only when there is none. A lagging
            # call is authorized after its fence, against the path found then (_fenced).
            if not lagging and not verifier.allowed_call(
                req.token, self.namespace, subject, path, m.name, now
            ):
                pending = self._uncached(req.token, subject, path, m.name, admitted.holder, now)
        finally:
            self.observer.token_verified(_perf_counter() - v0)
        ctx = CallContext(
            self.namespace, subject, worknode, m.name, req.arguments, req.trace_id,
            req.call_depth, deadline, req.token, self.replicas[subject], self.revocations,
            self,
        )
        if pending is not None:
            assert admitted.holder is not None  # checked by _caller
            return _Pending(ctx, pending, missing, admitted.holder)
        if missing:
            if lagging:
                assert admitted.holder is not None  # checked by _caller
                return _Pending(ctx, None, missing, admitted.holder)
            raise RpcNotFoundError(missing)
        if not deadline.at_ms - _monotonic() * 1000.0 >= 1.0:
            raise DeadlineExceededError("deadline passed before the handler ran")
        return ctx

    def _missing_path(
        self, subject: str, m: _Method, req: Request
    ) -> tuple[tuple[str, ...], str, str | None]:
        """For a worknode not in this replica's tree: the path to authorize the call against,
        why it is ``NOT_FOUND`` ("": it is not, a create under a parent that exists), and the
        id whose absence that is (the worknode, or a create's parent; None: not an id)."""
        worknode = req.worknode
        try:
            validate_node_id(worknode, allow_root=True)
        except InvalidArgumentError as exc:
            raise RpcInvalidArgumentError(str(exc)) from None
        parent = req.arguments.get("parent", ROOT_ID) if m.creates else None
        parent_path = self._ancestry[subject].path(parent) if isinstance(parent, str) else None
        if parent_path is not None:
            return (worknode, *parent_path), "", None
        # Authorize as if the worknode hung under the root, so that only a token that could
        # see it learns that it does not exist (others get PERMISSION_DENIED).
        if m.creates:
            return (
                (worknode, ROOT_ID), f"no parent worknode {parent!r} in {subject}",
                parent if isinstance(parent, str) else None,
            )
        return (worknode, ROOT_ID), f"no worknode {worknode!r} in {subject}", worknode

    def _may_lag(self, subject: str, req: Request, absent: str | None) -> bool:
        """Whether a call must fence the STRONG log before ``absent`` (a worknode missing
        here) counts as missing: it asks ``consistency: "strong"`` and ``absent`` is a STRONG
        worknode id of a subject with a STRONG side here. Its create may have been
        acknowledged before this call began and this replica only lag the log: answering
        NOT_FOUND then would not be linearizable. (Decided on the id and the arguments
        alone, never on what exists.)"""
        if absent is None or req.arguments.get("consistency") != "strong":
            return False
        strong = self.replicas[subject].strong
        return strong is not None and is_strong(absent, strong.prefixes)

    def _uncached(
        self, token: bytes, subject: str, path: tuple[str, ...], method: str,
        holder: bytes | None, now: float,
    ) -> AuthorizeJob | None:
        """A call's authorization not cached: the job to run in the authorizer pool (a
        penalized holder's is refused at once), or None once run inline (no pool)."""
        job = self.verifier.job(
            token, namespace=self.namespace, subject=subject, path=path, method=method,
            now=now,
        )
        if self.authorizer is not None:
            if holder is not None and self.penalized(holder):
                raise TokenLimitError(
                    "a token of this holder ran over its authorization budget: its "
                    f"new tokens are refused for {AUTHORIZE_PENALTY_S:g} s"
                )
            return job  # off the event loop, under its budget
        authorize(job)  # inline: only without a pool (tests of pure paths)
        self.verifier.remember(job)
        return None

    async def _fenced(
        self, subject: str, m: _Method, req: Request, pending: _Pending
    ) -> tuple[AuthorizeJob | None, str]:
        """A lagging call (``_may_lag``): apply the STRONG log up to a fence (within the
        call's deadline: ``DEADLINE_EXCEEDED``; a log that cannot be fenced or applied in
        time is ``UNAVAILABLE``, as for any STRONG operation), look the worknode up again,
        and authorize the call against the path found now: its real one if it exists, as a
        child of the root if it still does not. Returns what ``_Pending`` would hold: the
        authorization job still to run in the pool (None: decided), and why the worknode is
        missing ("": it exists)."""
        ctx = pending.ctx
        strong = ctx.replica.strong
        assert strong is not None  # checked by _may_lag
        left = ctx.deadline.remaining_ms(_now_ms())
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left / 1000.0):
                # A linearizable read of nothing: every write acknowledged before it (the
                # create this call may be about) is applied here once it returns.
                await strong.read(())
        except TimeoutError:
            raise self._late(m, req) from None
        path = self._ancestry[subject].path(req.worknode)
        missing = ""
        if path is None:
            path, missing, _ = self._missing_path(subject, m, req)
        v0 = _perf_counter()
        now = self.wall_clock()
        verifier = self.verifier
        try:
            # Again (no signature check: the request was verified once, and a second look
            # would see a replay): a revocation or expiry during the fence counts.
            verifier.admit(
                req.token, now=now,
                revoked=self.revocations.ids if self.revocations is not None else (),
            )
            if verifier.allowed_call(req.token, self.namespace, subject, path, m.name, now):
                return None, missing
            return self._uncached(req.token, subject, path, m.name, pending.holder, now), missing
        finally:
            self.observer.token_verified(_perf_counter() - v0)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A request admitted but for its authorization (not cached): run ``job`` first. No
    ``job``: a STRONG call on a worknode missing here, fenced first (``RpcServer._fenced``)
    and then authorized."""

    ctx: CallContext
    job: AuthorizeJob | None
    missing: str
    holder: bytes


class _NoKeys:
    """A key lookup that knows nobody (a server without forwarders verifies no peer)."""

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = b"") -> None:
        """Always refuse."""
        raise UnknownSignerError(f"signer {signer!r} is not known here")


_MAX_HOLDER_KEYS: Final = 4096
_MAX_DIGESTS: Final = 4096
"""Verified requests whose reply is not yet signed (more than run at once, by far)."""
_MAX_PENALIZED: Final = 4096


def _encode(codec: WireCodec, out: Any, req: Request) -> bytes:
    """The encoded reply to ``req`` of a handler's result (a ``Response``, or the mapping
    of an OK response, encoded without building one)."""
    if isinstance(out, Response):
        return encode_response(codec, _response(out, req))
    return encode_result(codec, out, req.trace_id)


def _response(out: Any, req: Request) -> Response:
    if isinstance(out, Response):
        return new_response(out.status, out.message, out.result, out.state, req.trace_id)
    # Encoded at once and dropped: the handler's mapping needs no copy.
    return new_response(StatusCode.OK, "", out if out else {}, None, req.trace_id)


# -- built-in methods -----------------------------------------------------------------------


def _field(ctx: CallContext) -> tuple[str, ...]:
    raw = ctx.arguments.get("path")
    if not isinstance(raw, str) or not raw:
        raise RpcInvalidArgumentError("argument 'path' (dotted field path) is required")
    return tuple(raw.split("."))


def _strong(ctx: CallContext) -> StrongMode | None:
    """The replica's STRONG side when the call asks ``consistency: "strong"`` (None: the
    default, EVENTUAL); ``RpcInvalidArgumentError`` for another value, ``if_version``
    without STRONG, or a subject with no STRONG log here."""
    mode = ctx.arguments.get("consistency", "eventual")
    if mode not in ("strong", "eventual"):
        raise RpcInvalidArgumentError("argument 'consistency' must be 'strong' or 'eventual'")
    if mode == "eventual":
        if "if_version" in ctx.arguments:
            raise RpcInvalidArgumentError("argument 'if_version' needs consistency 'strong'")
        return None
    strong = ctx.replica.strong
    if strong is None:
        raise RpcInvalidArgumentError(
            f"subject {ctx.replica.config.subject!r} has no STRONG worknodes here")
    return strong


def _if_version(ctx: CallContext, default: int | None = None) -> int | None:
    raw = ctx.arguments.get("if_version", default)
    if raw is not None and (type(raw) is not int or raw < 0):
        raise RpcInvalidArgumentError("argument 'if_version' must be an int >= 0")
    return raw


async def _write_strong(strong: StrongMode, op: TreeOp, if_version: int | None
                        ) -> Mapping[str, Any]:
    """A STRONG write's result: its log sequence, the worknode's new ``version`` (a lost
    compare-and-set raises ``ConflictError``: FAILED_PRECONDITION with both versions)."""
    return {"ok": True, "version": await strong.write([op], if_version=if_version)}


def builtin_methods(revocation_subject: str | None = None) -> MethodRegistry:
    """``get`` (a worknode's state), ``set``/``incr``/``add`` (a field, through the replica:
    persisted and replicated), ``create`` (a child of argument ``parent``), and ``revoke``
    (argument ``token_id``; only on ``revocation_subject``).

    ``consistency: "strong"`` (a STRONG worknode, ``broker.strong``): ``get`` reads
    linearizably and returns the worknode's ``version``; writes go through the subject's
    STRONG log and return the new ``version``; ``if_version`` makes a write conditional
    (``create`` is create-if-absent: ``if_version`` 0). A lost compare-and-set answers
    FAILED_PRECONDITION with ``expected`` and ``current`` (``RpcConflictError``); no quorum
    in time answers UNAVAILABLE."""
    from broker.crdt import Add, Assign, Create, Increment
    from broker.repair import subset

    reg = MethodRegistry()

    async def get_strong(ctx: CallContext, strong: StrongMode) -> Response:
        read = await strong.read([ctx.worknode])
        return Response(StatusCode.OK, state=read.state, result={
            "worknode": ctx.worknode, "version": read.versions[ctx.worknode],
            "seq": read.seq})

    @reg.method("get")
    def get(ctx: CallContext) -> Response | Awaitable[Response]:  # EVENTUAL: runs inline
        strong = _strong(ctx)
        if strong is not None:
            return get_strong(ctx, strong)
        if ctx.worknode == ROOT_ID:
            return Response(StatusCode.OK, result={"children": len(ctx.replica.state)})
        state = subset(ctx.replica.state, [ctx.worknode])
        return Response(StatusCode.OK, result={"worknode": ctx.worknode}, state=state)

    @reg.method("set")
    async def set_(ctx: CallContext) -> Mapping[str, Any]:
        if "value" not in ctx.arguments:
            raise RpcInvalidArgumentError("argument 'value' is required")
        if (strong := _strong(ctx)) is not None:
            op = Assign(ctx.worknode, _field(ctx), ctx.arguments["value"])
            return await _write_strong(strong, op, _if_version(ctx))
        await ctx.replica.set(ctx.worknode, _field(ctx), ctx.arguments["value"])
        return {"ok": True}

    @reg.method("incr")
    async def incr(ctx: CallContext) -> Mapping[str, Any]:
        amount = ctx.arguments.get("amount", 1)
        if type(amount) is not int:
            raise RpcInvalidArgumentError("argument 'amount' must be an int")
        if (strong := _strong(ctx)) is not None:
            return await _write_strong(
                strong, Increment(ctx.worknode, _field(ctx), amount), _if_version(ctx))
        await ctx.replica.increment(ctx.worknode, _field(ctx), amount)
        return {"ok": True}

    @reg.method("add")
    async def add(ctx: CallContext) -> Mapping[str, Any]:
        if "element" not in ctx.arguments:
            raise RpcInvalidArgumentError("argument 'element' is required")
        if (strong := _strong(ctx)) is not None:
            op = Add(ctx.worknode, _field(ctx), ctx.arguments["element"])
            return await _write_strong(strong, op, _if_version(ctx))
        await ctx.replica.add(ctx.worknode, _field(ctx), ctx.arguments["element"])
        return {"ok": True}

    @reg.method("create", creates=True)
    async def create(ctx: CallContext) -> Mapping[str, Any]:
        parent = ctx.arguments.get("parent", ROOT_ID)
        if not isinstance(parent, str):
            raise RpcInvalidArgumentError("argument 'parent' must be a worknode id")
        if (strong := _strong(ctx)) is not None:
            return await _write_strong(
                strong, Create(ctx.worknode, parent), _if_version(ctx, default=0))
        await ctx.replica.create(ctx.worknode, parent)
        return {"ok": True}

    if revocation_subject is not None:

        @reg.method("revoke", subjects=[revocation_subject])
        async def revoke(ctx: CallContext) -> Mapping[str, Any]:
            token_id = ctx.arguments.get("token_id")
            if not isinstance(token_id, str) or ctx.revocations is None:
                raise RpcInvalidArgumentError("argument 'token_id' (hex) is required")
            await ctx.revocations.revoke([token_id])
            return {"revoked": token_id}

    return reg
