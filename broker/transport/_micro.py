"""Request/reply services in the NATS micro (ADR-32) style, over any ``Transport``.

A service has a name, a version, an id, metadata, and endpoints (name -> subject -> handler).
It answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` (plain, ``.<name>`` and
``.<name>.<id>``) with the ADR-32 JSON documents, so ``nats micro ls`` and nats.micro clients
discover it, and endpoints join the queue group ``q`` as ADR-32 prescribes. ``NatsTransport``
serves through nats-py's ``nats.micro`` itself; this module is the same contract for the
in-memory transport and the shared client side: ``discover`` and ``call``.

Handlers return the reply body or raise: a ``WorknodeError`` becomes an error reply with the
``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers (the HTTP form of its ``code``:
400 for invalid input, 401 for a bad signature, ...; 500 for any other exception) and
``call`` raises ``ServiceCallError`` with them on the client side.
A handler that raises ``ErrorReply`` chooses the code and also sends a body (RPC replies carry
their status in both).

A handler may answer synchronously (return the body) or return an awaitable of the body. An
endpoint is served one request at a time unless ``concurrent`` is set: then the handler is
called at once on the receive path and a body it returns is answered at once (no task); only
an awaitable it returns runs in its own task, and the handler itself must bound how many run
at once (the RPC server refuses requests beyond its in-flight limit at once). A concurrent
handler's synchronous part must therefore be short and must not await.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from broker.errors import StatusCode, WorknodeError
from broker.transport._protocol import Msg, Subscription, Transport
from broker.transport._signed import RequestSigner, Signers

__all__ = [
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "Endpoint",
    "EndpointAuth",
    "EndpointHandler",
    "ErrorReply",
    "GenericService",
    "ServiceCallError",
    "ServiceHandle",
    "ServiceInfo",
    "TaskSet",
    "call",
    "discover",
    "error_body",
    "error_code",
    "error_headers",
]

ERROR_HEADER: Final = "Nats-Service-Error"
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
QUEUE_GROUP: Final = "q"

EndpointHandler = Callable[[Msg], "bytes | Awaitable[bytes]"]
"""Request in, reply body (or an awaitable of it) out; raise ``WorknodeError`` for an error
reply."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a service."""

    name: str
    subject: str
    handler: EndpointHandler
    concurrent: bool = False
    """Call the handler at once for each request and run the awaitable it returns, if any,
    in its own task (the handler bounds concurrency itself)."""
    auth: EndpointAuth | None = None
    """Authenticate each request before the handler sees it (a refusal is answered as the
    error it raises) and sign every reply (``broker.transport.SignedEndpointAuth``)."""


class EndpointAuth(Protocol):
    """Who may call an endpoint, and the signature on its replies."""

    def authenticate(self, msg: Msg) -> object:
        """Return if ``msg`` may be served; raise the ``WorknodeError`` to answer if not."""
        ...

    def reply_headers(
        self, msg: Msg, body: bytes, headers: Mapping[str, str] | None
    ) -> dict[str, str]:
        """``headers`` of the reply to ``msg`` carrying ``body``, plus its signature."""
        ...


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What ``$SRV.PING``/``$SRV.INFO`` told about one service instance."""

    name: str
    id: str
    version: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    endpoints: tuple[tuple[str, str], ...] = ()
    """(endpoint name, subject) pairs (INFO only)."""


class ServiceHandle(Protocol):
    """A running service."""

    @property
    def id(self) -> str:
        """This instance's id."""
        ...

    async def stop(self) -> None:
        """Stop answering. Idempotent."""
        ...


class ServiceCallError(WorknodeError):
    """A service answered with an error reply: ``http_code`` and ``description`` from the
    ADR-32 headers, ``code`` the status that code stands for. Whether to retry depends on the
    code: 5xx may succeed later (``retriable``); 4xx fails again for the same request."""

    def __init__(self, http_code: str, description: str) -> None:
        super().__init__(f"{http_code}: {description}")
        self.http_code = http_code
        self.code = StatusCode.from_http(http_code)
        self.description = description
        self.retriable = http_code.startswith("5")


class ErrorReply(WorknodeError):
    """Raised by an endpoint handler to answer with an error ``http_code`` (ADR-32 header),
    a ``description`` and a reply ``body``; ``code`` is the status of ``http_code``. The
    endpoint's caller gets it as ``ServiceCallError``."""

    def __init__(self, http_code: str, description: str, body: bytes = b"") -> None:
        super().__init__(description)
        self.http_code = http_code
        self.code = StatusCode.from_http(http_code)
        self.description = description
        self.body = body


def error_code(exc: BaseException) -> str:
    """The ADR-32 error code for a handler's exception: the one an ``ErrorReply`` chose, the
    HTTP form of a ``WorknodeError``'s status, 500 (a bug) for anything else."""
    if isinstance(exc, ErrorReply):
        return exc.http_code
    return exc.code.http if isinstance(exc, WorknodeError) else "500"


def error_body(exc: BaseException) -> bytes:
    """The body of the error reply for a handler's exception (empty unless ``ErrorReply``)."""
    return exc.body if isinstance(exc, ErrorReply) else b""


def error_headers(exc: BaseException) -> dict[str, str]:
    """The ADR-32 headers of the error reply for a handler's exception (a bug is answered
    500 without its text)."""
    if isinstance(exc, WorknodeError):
        # One header line: a message's line breaks would end the header block.
        text = " ".join(str(exc).split())
        return {ERROR_HEADER: text, ERROR_CODE_HEADER: error_code(exc)}
    return {ERROR_HEADER: f"internal error: {type(exc).__name__}", ERROR_CODE_HEADER: "500"}


class TaskSet:
    """Tasks of concurrent endpoints, kept referenced until they finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in its own task."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:  # noqa: ASYNC109 - a bounded stop
        """Wait up to ``timeout`` seconds for running tasks, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()


class GenericService:
    """An ADR-32 service over plain transport subscriptions (used by the memory transport)."""

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        version: str,
        description: str = "",
        endpoints: Sequence[Endpoint],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.transport = transport
        self.name = name
        self.version = version
        self.description = description
        self.endpoints = list(endpoints)
        self.metadata = dict(metadata or {})
        self._id = secrets.token_hex(11)
        self._subs: list[Subscription] = []
        self._tasks = TaskSet()
        self._started = ""
        self._stats: dict[str, dict[str, Any]] = {
            ep.name: {"num_requests": 0, "num_errors": 0, "processing_time": 0} for ep in endpoints
        }

    @property
    def id(self) -> str:
        """This instance's id."""
        return self._id

    async def start(self) -> None:
        """Subscribe endpoints and the ``$SRV`` control subjects."""
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for ep in self.endpoints:
            self._subs.append(
                await self.transport.subscribe(ep.subject, self._wrap(ep), queue=QUEUE_GROUP)
            )
        for verb in ("PING", "INFO", "STATS"):
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{self.name}",
                f"$SRV.{verb}.{self.name}.{self._id}",
            ):
                self._subs.append(await self.transport.subscribe(subject, self._control(verb)))

    async def stop(self) -> None:
        """Unsubscribe everything. Idempotent."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()
        await self._tasks.wait(5.0)

    def _wrap(self, ep: Endpoint) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            stats = self._stats[ep.name]
            stats["num_requests"] += 1
            t0 = time.perf_counter_ns()
            try:
                if ep.auth is not None:
                    ep.auth.authenticate(msg)
                out = ep.handler(msg)
                if not isinstance(out, bytes):
                    if ep.concurrent:
                        self._tasks.spawn(finish(msg, out, t0))
                        return
                    out = await out
            except Exception as exc:
                stats["processing_time"] += time.perf_counter_ns() - t0
                await self._answer_error(ep, msg, exc)
                return
            stats["processing_time"] += time.perf_counter_ns() - t0
            await self._answer(ep, msg, out)

        async def finish(msg: Msg, pending: Awaitable[bytes], t0: int) -> None:
            try:
                body = await pending
            except Exception as exc:
                self._stats[ep.name]["processing_time"] += time.perf_counter_ns() - t0
                await self._answer_error(ep, msg, exc)
                return
            self._stats[ep.name]["processing_time"] += time.perf_counter_ns() - t0
            await self._answer(ep, msg, body)

        return handle

    async def _answer(
        self, ep: Endpoint, msg: Msg, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        if not msg.reply:
            return
        if ep.auth is not None:
            headers = ep.auth.reply_headers(msg, body, headers)
        await self.transport.respond(msg, body, headers=headers)

    async def _answer_error(self, ep: Endpoint, msg: Msg, exc: Exception) -> None:
        self._stats[ep.name]["num_errors"] += 1
        await self._answer(ep, msg, error_body(exc), error_headers(exc))

    def _document(self, verb: str) -> dict[str, Any]:
        base = {"name": self.name, "id": self._id, "version": self.version,
                "metadata": self.metadata}
        if verb == "PING":
            return base | {"type": "io.nats.micro.v1.ping_response"}
        if verb == "INFO":
            return base | {
                "type": "io.nats.micro.v1.info_response",
                "description": self.description,
                "endpoints": [
                    {"name": ep.name, "subject": ep.subject, "queue_group": QUEUE_GROUP,
                     "metadata": None}
                    for ep in self.endpoints
                ],
            }
        return base | {
            "type": "io.nats.micro.v1.stats_response",
            "started": self._started,
            "endpoints": [
                {"name": ep.name, "subject": ep.subject, "queue_group": QUEUE_GROUP,
                 **self._stats[ep.name]}
                for ep in self.endpoints
            ],
        }

    def _control(self, verb: str) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            if msg.reply:
                await self.transport.respond(msg, json.dumps(self._document(verb)).encode())

        return handle


async def discover(
    transport: Any,
    name: str,
    *,
    timeout: float = 0.5,  # noqa: ASYNC109
    idle: float = 0.0,
    min_replies: int = 0,
) -> list[ServiceInfo]:
    """Every instance of service ``name`` that answers ``$SRV.INFO.<name>`` within
    ``timeout`` seconds (the transport must offer ``request_many``); with ``idle``, the
    ones that answer before a pause of ``idle`` seconds between replies once at least
    ``min_replies`` answered (say, as many as last time)."""
    replies: list[Msg] = await transport.request_many(
        f"$SRV.INFO.{name}", b"", timeout=timeout, idle=idle, min_replies=min_replies
    )
    out = []
    for reply in replies:
        try:
            doc = json.loads(reply.data)
            out.append(
                ServiceInfo(
                    name=str(doc["name"]),
                    id=str(doc["id"]),
                    version=str(doc.get("version", "")),
                    metadata={str(k): str(v) for k, v in (doc.get("metadata") or {}).items()},
                    endpoints=tuple(
                        (str(e["name"]), str(e["subject"])) for e in doc.get("endpoints") or []
                    ),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a micro service reply: ignore it
    return sorted(out, key=lambda s: (s.metadata.get("node", ""), s.id))


async def call(
    transport: Transport,
    subject: str,
    data: bytes,
    *,
    timeout: float,  # noqa: ASYNC109
    signer: RequestSigner | None = None,
    signers: Signers = None,
) -> bytes:
    """Request ``subject``; the reply body, or ``ServiceCallError`` for an error reply.
    With ``signer`` the request is signed and the reply (error replies too) must be signed by
    one of ``signers`` and bound to it, else a ``SignatureError`` subclass."""
    if signer is not None:
        reply = await signer.request(transport, subject, data, timeout=timeout, signers=signers)
    else:
        reply = await transport.request(subject, data, timeout=timeout)
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise ServiceCallError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))
    return reply.data
