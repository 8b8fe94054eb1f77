"""The transport contract: what replicas, RPC and the healer may assume about moving bytes.

Two implementations keep this contract: ``NatsTransport`` (a real NATS connection) and
``MemoryTransport`` (an in-process fake for unit tests). Invariants both keep:

- Only ``broker.errors`` exceptions escape a transport. Invalid subjects raise
  ``InvalidSubjectError`` before anything is sent; a message larger than the server's
  ``max_payload`` (payload plus encoded headers) raises ``PayloadTooLargeError`` before
  anything is sent.
- Handlers run on the event loop, one message at a time per subscription, never inside
  ``publish`` (delivery is not re-entrant). A handler that raises is counted and reported to
  the observer; the subscription keeps running.
- Each subscription has a bounded pending queue. A message that does not fit is dropped and
  *counted* (``Subscription.dropped``); the observer hears ``slow_consumer`` and the
  subscription's ``on_slow_consumer`` callback runs, so the owner can catch up. Drops are
  never silent: ``delivered + dropped + pending`` is every message that reached the client.
- ``stop()`` drains: no new messages are accepted, the ones already pending are handled,
  then the connection closes. It is idempotent.
- Observer and ``on_slow_consumer`` callbacks are synchronous and must be cheap; an exception
  they raise is logged and swallowed, never allowed to break message delivery.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, Self, runtime_checkable

from broker.errors import InvalidArgumentError, InvalidSubjectError
from broker.transport._auth import INBOX_ROOT

if TYPE_CHECKING:
    from broker.transport._micro import Endpoint, ServiceHandle

__all__ = [
    "DEFAULT_PENDING_BYTES_LIMIT",
    "DEFAULT_PENDING_MSGS_LIMIT",
    "Handler",
    "Msg",
    "NullObserver",
    "SlowConsumerCallback",
    "Subscription",
    "Transport",
    "TransportObserver",
    "check_reply_subject",
    "encoded_size",
    "is_reply_subject",
    "new_msg",
    "validate_headers",
]

_log = logging.getLogger("broker.transport")

#: Pending messages one subscription may hold before new ones are dropped (and counted).
#: nats-py's default (512 Ki) let a fast in-process publisher lose 29% of 1M messages with
#: nobody noticing; a smaller, deliberate bound plus counted drops and catch-up is the design.
DEFAULT_PENDING_MSGS_LIMIT: Final = 65_536
#: Pending bytes one subscription may hold before new messages are dropped (and counted).
DEFAULT_PENDING_BYTES_LIMIT: Final = 64 * 1024 * 1024

REPLY_PREFIX: Final = f"{INBOX_ROOT}."
"""Every reply goes to a subject below ``_INBOX``: a responder answers nowhere else."""


def is_reply_subject(subject: str | None) -> bool:
    """Whether ``subject`` is an inbox a responder may answer on. Anything else would let a
    requester make the responder publish where the requester chose (NATS lets a reply
    through every permission of the responder: ``allow_responses``)."""
    return subject is not None and subject.startswith(REPLY_PREFIX)


def check_reply_subject(msg: Msg) -> None:
    """Raise ``InvalidSubjectError`` unless ``msg`` has an inbox to answer on."""
    if not msg.reply:
        raise InvalidSubjectError(
            f"cannot respond to the message on {msg.subject!r}: it has no reply subject")
    if not is_reply_subject(msg.reply):
        raise InvalidSubjectError(
            f"cannot respond to the message on {msg.subject!r}: its reply subject is not an "
            f"inbox ({REPLY_PREFIX}*)")


_HEADER_KEY: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
_HEADER_VALUE_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_LINE: Final = len(b"NATS/1.0\r\n")


@dataclass(frozen=True, slots=True)
class Msg:
    """One message as a handler or a requester sees it.

    ``reply`` is the subject to answer on (empty when no answer is expected); ``headers`` is
    None when the message carried none.
    """

    subject: str
    data: bytes
    reply: str = ""
    headers: Mapping[str, str] | None = None


_new: Final = object.__new__
_MSG_SETTERS: Final = tuple(
    Msg.__dict__[name].__set__ for name in ("subject", "data", "reply", "headers")
)


def new_msg(subject: str, data: bytes, reply: str, headers: Mapping[str, str] | None) -> Msg:
    """``Msg(subject, data, reply, headers)``, built by the slot setters: a transport makes
    one per message received, and the frozen dataclass's ``__init__`` (object.__setattr__ per
    field) costs twice as much. The same frozen object."""
    m: Msg = _new(Msg)
    s_subject, s_data, s_reply, s_headers = _MSG_SETTERS
    s_subject(m, subject)
    s_data(m, data)
    s_reply(m, reply)
    s_headers(m, headers)
    return m


Handler = Callable[[Msg], Awaitable[None]]
"""An async callable that handles one message. Exceptions it raises are counted, not fatal."""

SlowConsumerCallback = Callable[[], None]
"""Called (on the event loop, after a burst of drops) when a subscription dropped messages."""


def validate_headers(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """Return headers as they will arrive, or raise ``InvalidArgumentError``.

    Keys are RFC 7230 tokens (printable ASCII without separators); values are text without
    control characters and arrive stripped of surrounding whitespace, as on the NATS wire.
    Empty or missing headers arrive as None.
    """
    if not headers:
        return None
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or _HEADER_KEY.fullmatch(key) is None:
            raise InvalidArgumentError(f"invalid header name {key!r}: use an RFC 7230 token")
        if not isinstance(value, str):
            raise InvalidArgumentError(f"header {key!r}: value must be a str")
        if _HEADER_VALUE_FORBIDDEN.search(value) is not None:
            raise InvalidArgumentError(f"header {key!r}: control characters are not allowed")
        out[key] = value.strip()
    return MappingProxyType(out)


def encoded_size(data: bytes, headers: Mapping[str, str] | None) -> int:
    """Bytes the server counts against ``max_payload``: the payload plus the header block."""
    if not headers:
        return len(data)
    size = _HEADER_LINE + 2  # "NATS/1.0\r\n" ... "\r\n"
    for key, value in headers.items():
        size += len(key.encode()) + 2 + len(value.encode()) + 2  # "key: value\r\n"
    return size + len(data)


@runtime_checkable
class Subscription(Protocol):
    """Interest in a subject (or pattern). Counters only grow."""

    @property
    def subject(self) -> str:
        """The subject or pattern subscribed to."""
        ...

    @property
    def delivered(self) -> int:
        """Messages handed to the handler so far."""
        ...

    @property
    def dropped(self) -> int:
        """Messages dropped because the pending queue was full (slow consumer)."""
        ...

    async def unsubscribe(self) -> None:
        """Stop receiving; pending messages are discarded. Idempotent."""
        ...


class TransportObserver(Protocol):
    """Receives transport events (for metrics and logs). Methods are synchronous and cheap."""

    def connected(self) -> None:
        """The first connection was established."""
        ...

    def disconnected(self) -> None:
        """The connection was lost (not called for a deliberate ``stop()``)."""
        ...

    def reconnected(self) -> None:
        """The connection is back; subscriptions were restored. Messages may have been missed."""
        ...

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """``dropped`` messages for the subscription on ``subject`` were dropped in one burst."""
        ...

    def handler_error(self, subject: str, exc: Exception) -> None:
        """The handler of the subscription on ``subject`` raised ``exc``."""
        ...


class NullObserver:
    """A ``TransportObserver`` that ignores every event."""

    def connected(self) -> None:
        """Ignore."""

    def disconnected(self) -> None:
        """Ignore."""

    def reconnected(self) -> None:
        """Ignore."""

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """Ignore."""

    def handler_error(self, subject: str, exc: Exception) -> None:
        """Ignore."""


def notify(callback: Callable[..., None], *args: object) -> None:
    """Call an observer or user callback; log and swallow whatever it raises.

    Callbacks run inside the transport's delivery path, where an escaping exception would
    break delivery for everyone (in nats-py it would even force a reconnect).
    """
    try:
        callback(*args)
    except Exception:
        _log.exception("transport callback %r raised", callback)


class Transport(Protocol):
    """Publish/subscribe and request/reply over NATS subjects. Use as ``async with``."""

    @property
    def max_payload(self) -> int:
        """Largest message (payload plus headers) the server accepts, in bytes; 0 before
        the first connection."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the transport can reach the server right now."""
        ...

    @property
    def reply_root(self) -> str:
        """The inbox prefix every reply subject of this transport's requests lies under: what
        a signed request names as its requester's inbox (see ``broker.codec.sign_request``)."""
        ...

    async def start(self) -> None:
        """Connect. Idempotent."""
        ...

    async def stop(self) -> None:
        """Drain (handle what is pending, publish what is buffered) and close. Idempotent."""
        ...

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send one message to a literal subject (fire and forget)."""
        ...

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        on_slow_consumer: SlowConsumerCallback | None = None,
    ) -> Subscription:
        """Call ``handler`` for every message on ``subject`` (a pattern may hold ``*`` and a
        final ``>``). With ``queue``, each message goes to one member of the queue group."""
        ...

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline is part of the request contract
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and wait for the first reply.

        Raises ``NoRespondersError`` when nobody subscribes to ``subject``,
        ``TransportTimeoutError`` when no reply comes within ``timeout`` seconds and
        ``NotConnectedError`` when the transport stops while waiting.
        """
        ...

    async def respond(
        self, msg: Msg, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request received by a handler (publish to ``msg.reply``)."""
        ...

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - as nats-py
        """Wait until everything published so far has reached the server."""
        ...

    async def request_many(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the collection window
        max_replies: int = 0,
        idle: float = 0.0,
        min_replies: int = 0,
        headers: Mapping[str, str] | None = None,
        accept: Callable[[Msg], bool] | None = None,
    ) -> list[Msg]:
        """Send a request and collect every reply within ``timeout`` (discovery); with
        ``idle``, stop early once at least ``min_replies`` (and at least one) replies came
        and no other followed for ``idle`` seconds.
        ``headers``: sent with the request; ``accept``: a reply it refuses (a forged or
        replayed answer, say) is dropped as if it never came, so it neither counts nor ends
        the wait."""
        ...

    async def add_service(
        self,
        *,
        name: str,
        version: str,
        endpoints: Sequence[Endpoint],
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ServiceHandle:
        """Serve ``endpoints`` as a NATS micro (ADR-32) service."""
        ...

    async def __aenter__(self) -> Self:
        """Start and return the transport."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the transport."""
        ...


async def until_enough_or_idle(
    enough: asyncio.Event,
    arrived: asyncio.Event,
    replies: list[Msg],
    idle: float,
    min_replies: int = 0,
) -> None:
    """``request_many``'s collection wait, shared by the transports: return when
    ``enough`` is set, or (``idle`` > 0) once ``max(1, min_replies)`` replies came and no
    other followed within ``idle`` seconds; the caller bounds the whole wait."""
    while not enough.is_set():
        arrived.clear()
        if idle > 0 and len(replies) >= max(1, min_replies):
            try:
                async with asyncio.timeout(idle):
                    await arrived.wait()
            except TimeoutError:
                return
        else:
            await arrived.wait()


async def complete_despite_cancel(cleanup: Awaitable[None]) -> None:
    """Await ``cleanup`` (a stop or teardown) to its end even if the caller is cancelled
    meanwhile, then re-raise the cancellation: a stop interrupted halfway (Ctrl-C while a
    service stops) would leave connections open, stores unclosed and servers orphaned."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task  # cancelled again meanwhile: give up, the caller insists
        raise
