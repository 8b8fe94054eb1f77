"""``NatsTransport``: the ``Transport`` contract over nats-py.

Invariants (on top of those in ``_protocol``):

- No nats-py exception escapes. Every call into nats-py runs inside ``_mapped``, which turns
  timeouts into ``TransportTimeoutError``, no responders into ``NoRespondersError``, a closed,
  draining, reconnecting-with-full-buffer or server-less client into ``NotConnectedError``,
  max payload into ``PayloadTooLargeError``, a bad subject into ``InvalidSubjectError`` and
  anything else into ``TransportError``.
- Subjects, queue groups and headers are validated here, before nats-py sees them, so the
  client runs with ``skip_subject_validation=True`` (a third faster per publish).
- Every subscription gets deliberate pending limits. nats-py reports a full pending queue
  only to ``error_cb`` (as ``SlowConsumerError``); here each one is counted on its
  subscription, and after each burst the observer and the subscription's
  ``on_slow_consumer`` callback hear about it once.
- Handlers are wrapped: their exceptions are counted and reported to the observer and never
  reach nats-py. The callbacks given to nats-py never raise either: they run inside its read
  loop, where an exception would force a reconnect.
- The initial connect is bounded by ``start_timeout`` even when ``max_reconnect_attempts``
  is -1 (reconnect forever, the default once connected).
- ``request`` multiplexes: one wildcard inbox subscription per connection, one future per
  request keyed by its reply token (``_RequestMux``), removed on every path (reply, timeout,
  cancellation, failure); any number of requests may be in flight at once (pipelined).
- ``stop`` (and a connection closed for good) fails the requests still waiting for a reply
  with ``NotConnectedError`` (nats-py would let them wait out their timeout), and
  ``request_many`` never returns the server's no-responders status as a reply: the same
  behaviour as ``MemoryTransport``, checked by tests/conformance.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self, cast

import nats.errors
from nats.aio.client import NO_RESPONDERS_STATUS, Client
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription as NatsSubscriptionImpl

from broker.errors import (
    ConnectionRefusedByServerError,
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    TransportError,
    TransportTimeoutError,
    WorknodeError,
)
from broker.transport._micro import (
    Endpoint,
    ErrorReply,
    ServiceHandle,
    TaskSet,
    error_body,
    error_headers,
)
from broker.transport._protocol import (
    DEFAULT_PENDING_BYTES_LIMIT,
    DEFAULT_PENDING_MSGS_LIMIT,
    Handler,
    Msg,
    NullObserver,
    SlowConsumerCallback,
    Subscription,
    Transport,
    TransportObserver,
    check_reply_subject,
    encoded_size,
    is_reply_subject,
    new_msg,
    notify,
    until_enough_or_idle,
    validate_headers,
)
from broker.transport._subjects import validate_pattern, validate_subject

__all__ = ["DEFAULT_RECONNECT_BUFFER_SIZE", "NatsSubscription", "NatsTransport"]

_log = logging.getLogger("broker.transport.nats")


class _TlsEofNoise(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl". It
    fires whenever a peer closes a TLS connection of nats-py, which upgrades a plain stream
    to TLS (``start_tls``) while the stream's protocol still answers EOF as if it were
    plain; nothing is wrong and nothing can be done about it by the user it would alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


if not any(isinstance(f, _TlsEofNoise) for f in logging.getLogger("asyncio").filters):
    logging.getLogger("asyncio").addFilter(_TlsEofNoise())

#: Bytes of publishes nats-py buffers while reconnecting; beyond it publish raises
#: ``NotConnectedError``.
DEFAULT_RECONNECT_BUFFER_SIZE: Final = 8 * 1024 * 1024

_NOT_CONNECTED: Final = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    ConnectionError,
)


# Not "authentication timeout": a slow or loaded client may get one and succeed next time.
_AUTH_REFUSALS: Final = ("authorization violation", "user authentication")


def _refusal(exc: BaseException) -> str:
    """Why the server refused this client for good ("" when ``exc`` is something a retry
    may cure): its credentials (an authorization violation) or TLS (a certificate that does
    not verify, a handshake the server or the client rejects)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the server's certificate does not verify ({exc.verify_message}); "
                "set the CA that signed it (--tls-ca / nats_tls_ca_file)")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}): check the TLS settings"
    text = str(exc).lower()
    if any(marker in text for marker in _AUTH_REFUSALS):
        return ("the server refused this client's credentials (authorization violation): "
                "check its NATS identity (--nats-nkey / nats_nkey_file, creds, user or token)")
    if "secure connection" in text or "tls required" in text:
        return f"TLS: {exc} (set --tls-ca / nats_tls_ca_file)"
    return ""


def _translate(exc: Exception, action: str) -> WorknodeError:
    """The worknode error for an exception raised by nats-py while doing ``action``."""
    detail = f"{action}: {exc}" if str(exc) else f"{action}: {type(exc).__name__}"
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLargeError(detail)
    if isinstance(exc, nats.errors.NoRespondersError):
        return NoRespondersError(detail)
    if isinstance(exc, _NOT_CONNECTED):
        return NotConnectedError(detail)
    if isinstance(exc, nats.errors.BadSubjectError):
        return InvalidSubjectError(detail)
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError and FlushTimeoutError too
        return TransportTimeoutError(detail)
    return TransportError(detail)


@contextlib.contextmanager
def _mapped(action: str, *args: object) -> Iterator[None]:
    """Translate every exception nats-py raises inside the block (see ``_translate``);
    ``action % args`` names what failed (formatted only on failure: requests are hot)."""
    try:
        yield
    except WorknodeError:
        raise
    except Exception as exc:
        raise _translate(exc, action % args if args else action) from exc


class _OrderedClient(Client):
    """nats-py's client with PING kept in order behind everything sent before it.

    nats-py writes PING (used by ``flush()``, ``drain()`` and the ping timer) straight to the
    socket, while SUB, UNSUB and PUB commands wait in its pending buffer for the flusher task.
    The PING can overtake them, so a PONG proved nothing: measured here, about 8% of fresh
    subscriptions missed messages published right after ``subscribe()`` + ``flush()``, and
    ``drain()`` could drop messages that arrived after its UNSUB's PONG. Writing the pending
    buffer first restores the NATS guarantee: a PONG means the server has processed every
    command sent before the PING.
    """

    def _connect_command(self) -> bytes:
        # Called once the TLS decision is made, before CONNECT (credentials) is sent. nats-py
        # upgrades to TLS only when the server's INFO asks for it, so a client given a CA
        # would otherwise send its token, password or nonce signature in the clear to a
        # server (or a man in the middle) that does not announce TLS.
        scheme = self._current_server.uri.scheme if self._current_server else "nats"
        wants_tls = self.options.get("tls") is not None or scheme == "tls"
        if wants_tls and scheme not in ("ws", "wss") and not (
                self._server_info.get("tls_required")):
            raise nats.errors.Error(
                "nats: tls required by this client, but the server does not offer TLS: "
                "refusing to send credentials in the clear")
        command: bytes = super()._connect_command()
        return command

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        if self._pending and self._transport is not None and self.is_connected:
            self._transport.writelines(self._pending[:])
            self._pending = []
            self._pending_data_size = 0
        await super()._send_ping(future)


class _MicroHandle:
    """A running nats.micro service."""

    def __init__(self, svc: Any, tasks: TaskSet) -> None:
        self._svc = svc
        self._tasks = tasks
        self._stopped = False

    @property
    def id(self) -> str:
        """This instance's id."""
        return str(self._svc.id)

    async def stop(self) -> None:
        """Stop answering. Idempotent."""
        if not self._stopped:
            self._stopped = True
            # nats.micro drains its control subscriptions without a deadline; bound it so a
            # stop never hangs (closing the connection later cleans up whatever is left).
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._svc.stop()
            await self._tasks.wait(5.0)


def _micro_handler(ep: Endpoint, tasks: TaskSet) -> Any:
    # nats.micro awaits this in the endpoint subscription's task, one request at a time: a
    # concurrent endpoint's handler answers at once, or hands back an awaitable that gets its
    # own task (see ``Endpoint``).
    handler = ep.handler
    concurrent = ep.concurrent
    auth = ep.auth

    async def handle(req: Any) -> None:
        nmsg = req._msg
        # What nats.micro's Request.respond publishes with (not nats-py's Msg.respond, which
        # would send the request's own headers back).
        publish = nmsg._client.publish
        reply = nmsg.reply
        if not is_reply_subject(reply):
            # A reply subject that is no inbox would make this node publish where the
            # requester chose (allow_responses lets a reply through any permission): drop.
            _log.warning("endpoint %s: request with reply subject %r dropped (not an inbox)",
                         ep.subject, reply[:80])
            return
        # The reply subject is part of a signed request (its inbox root): keep it.
        msg = new_msg(nmsg.subject, nmsg.data, reply if auth is not None else "", nmsg.headers)
        try:
            if auth is not None:
                auth.authenticate(msg)
            out = handler(msg)
            if not isinstance(out, bytes):
                if concurrent:
                    tasks.spawn(finish(req, msg, out))
                    return
                out = await out
        except Exception as exc:
            await _answer_error(ep, req, msg, exc)
            return
        try:  # _answer and Request.respond, inlined: two coroutines less on every request
            if auth is not None:
                await publish(reply, out, headers=auth.reply_headers(msg, out, None))
            else:
                await publish(reply, out)
        except nats.errors.Error as exc:
            await _answer_failed(ep, req, msg, exc)

    async def finish(req: Any, msg: Msg, pending: Awaitable[bytes]) -> None:
        try:
            body = await pending
        except Exception as exc:
            await _answer_error(ep, req, msg, exc)
            return
        await _answer(ep, req, msg, body)

    return handle


async def _answer_error(ep: Endpoint, req: Any, msg: Msg, exc: Exception) -> None:
    if not isinstance(exc, WorknodeError):
        # A bug: answer 500 rather than leave the caller waiting.
        _log.error("endpoint %s raised", ep.subject, exc_info=exc)
    body = error_body(exc)
    headers = error_headers(exc)
    if ep.auth is not None:
        headers = ep.auth.reply_headers(msg, body, headers)
    with contextlib.suppress(nats.errors.Error):
        await req.respond(body, headers=headers)


async def _answer(ep: Endpoint, req: Any, msg: Msg, body: bytes) -> None:
    try:
        if ep.auth is not None:
            await req.respond(body, headers=ep.auth.reply_headers(msg, body, None))
        else:
            await req.respond(body)
    except nats.errors.Error as exc:
        await _answer_failed(ep, req, msg, exc)


async def _answer_failed(ep: Endpoint, req: Any, msg: Msg, exc: nats.errors.Error) -> None:
    if isinstance(exc, nats.errors.MaxPayloadError):
        # Never leave the caller to time out: say why there is no answer.
        await _answer_error(
            ep, req, msg, ErrorReply("413", "reply larger than the server's max_payload")
        )
    else:
        _log.warning("could not answer a request on %s", ep.subject)


def _to_msg(nmsg: NatsMsg) -> Msg:
    return new_msg(nmsg.subject, nmsg.data, nmsg.reply, nmsg.headers or None)


def _no_responders(nmsg: NatsMsg) -> bool:
    """Whether ``nmsg`` is the server's no-responders status (503), not an answer."""
    return not nmsg.data and (nmsg.headers or {}).get("Status") == NO_RESPONDERS_STATUS


def _check_data(data: object) -> None:
    if not isinstance(data, bytes):
        raise InvalidArgumentError(f"message data must be bytes, not {type(data).__name__}")


class _RequestMux:
    """Request/reply multiplexing on one connection: one wildcard inbox subscription
    (``<reply root>.<random>.*``), one future per request keyed by its reply token.

    Built on public nats-py calls only. nats-py's own ``request`` multiplexes as well, but
    pays for a NUID, ``secrets.token_hex``, three ``decode`` calls, a done-callback and
    ``asyncio.wait_for`` (two futures and a timer) per request; here a request costs one
    future, one timer (``asyncio.timeout``) and a dict entry, which ``request`` always
    removes (reply, timeout, cancellation or failure: no future outlives its request).
    Tokens are a counter (unique) followed by random bytes (unguessable: a reply subject
    someone saw tells nothing of the next one).
    """

    __slots__ = ("_futures", "_ids", "_lock", "_plen", "_prefix", "_sub")

    def __init__(self, reply_root: str) -> None:
        self._prefix = f"{reply_root}.{os.urandom(9).hex()}."
        self._plen = len(self._prefix)
        self._futures: dict[str, asyncio.Future[NatsMsg]] = {}
        self._ids = itertools.count(1)
        self._sub: NatsSubscriptionImpl | None = None
        self._lock = asyncio.Lock()  # held while the SUB is being made

    def __len__(self) -> int:
        return len(self._futures)

    async def ensure(self, nc: Client, pending_msgs: int, pending_bytes: int) -> None:
        """Subscribe to the inbox wildcard once (concurrent first requests wait for it; if
        the one subscribing is cancelled or fails, the next one tries)."""
        async with self._lock:
            if self._sub is None:
                self._sub = await nc.subscribe(
                    self._prefix + "*", cb=self._deliver,
                    pending_msgs_limit=pending_msgs, pending_bytes_limit=pending_bytes,
                )

    async def _deliver(self, nmsg: NatsMsg) -> None:
        future = self._futures.pop(nmsg.subject[self._plen:], None)
        if future is not None and not future.done():
            future.set_result(nmsg)
        # else: a late reply (its request timed out or was cancelled) or a stray: dropped

    def open(self) -> tuple[str, asyncio.Future[NatsMsg]]:
        """A fresh reply subject and the future its reply completes."""
        token = f"{next(self._ids):x}{os.urandom(6).hex()}"
        future: asyncio.Future[NatsMsg] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        return self._prefix + token, future

    def close(self, inbox: str) -> None:
        """Forget the request of ``inbox`` (idempotent)."""
        self._futures.pop(inbox[self._plen:], None)

    def fail_all(self, exc_type: type[Exception]) -> None:
        """Fail every waiting request (the connection is gone for good)."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(exc_type())


class NatsSubscription:
    """A subscription made by ``NatsTransport.subscribe`` (see ``Subscription``)."""

    __slots__ = (
        "_closed",
        "_delivered",
        "_dropped",
        "_handler",
        "_handler_errors",
        "_nsub",
        "_observer",
        "_on_slow_consumer",
        "_queue",
        "_subject",
        "_transport",
        "_unreported",
    )

    def __init__(
        self,
        transport: NatsTransport,
        subject: str,
        queue: str,
        handler: Handler,
        on_slow_consumer: SlowConsumerCallback | None,
        observer: TransportObserver,
    ) -> None:
        self._transport = transport
        self._subject = subject
        self._queue = queue
        self._handler = handler
        self._on_slow_consumer = on_slow_consumer
        self._observer = observer
        self._nsub: NatsSubscriptionImpl | None = None
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._handler_errors = 0
        self._unreported = 0  # drops not yet reported; >0 means a report is scheduled

    @property
    def subject(self) -> str:
        """The subject or pattern subscribed to."""
        return self._subject

    @property
    def queue(self) -> str:
        """The queue group ("" for none)."""
        return self._queue

    @property
    def delivered(self) -> int:
        """Messages handed to the handler so far."""
        return self._delivered

    @property
    def dropped(self) -> int:
        """Messages dropped because the pending queue was full."""
        return self._dropped

    @property
    def handler_errors(self) -> int:
        """Messages whose handler raised."""
        return self._handler_errors

    @property
    def pending(self) -> int:
        """Messages received and waiting for the handler."""
        return 0 if self._nsub is None or self._closed else self._nsub.pending_msgs

    @property
    def active(self) -> bool:
        """Whether the subscription still receives messages."""
        return not self._closed

    async def _deliver(self, nmsg: NatsMsg) -> None:
        # Runs in nats-py's per-subscription task; must not raise (nats-py would pass the
        # exception to error_cb, the only trace it leaves).
        if self._closed:
            return  # unsubscribed (maybe by its own handler): pending messages are discarded
        self._delivered += 1
        try:
            await self._handler(_to_msg(nmsg))
        except Exception as exc:
            self._handler_errors += 1
            notify(self._observer.handler_error, self._subject, exc)

    def _record_drop(self) -> None:
        self._dropped += 1
        self._unreported += 1
        if self._unreported == 1:
            # nats-py reports drops one by one from its read loop; one report per burst
            # (everything dropped before the loop runs again) keeps catch-up from firing
            # thousands of times.
            asyncio.get_running_loop().call_soon(self._report_drops)

    def _report_drops(self) -> None:
        dropped, self._unreported = self._unreported, 0
        notify(self._observer.slow_consumer, self._subject, dropped)
        if self._on_slow_consumer is not None:
            notify(self._on_slow_consumer)

    async def unsubscribe(self) -> None:
        """Stop receiving; pending messages are discarded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        nsub = self._nsub
        if nsub is None:
            return
        self._transport._forget(nsub)
        try:
            await nsub.unsubscribe()
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
            nats.errors.BadSubscriptionError,
        ):
            pass  # already gone (or being drained): nothing left to undo
        except Exception as exc:
            raise _translate(exc, f"unsubscribe from {self._subject!r}") from exc

    def __repr__(self) -> str:
        return (
            f"<NatsSubscription {self._subject!r} queue={self._queue!r} "
            f"delivered={self._delivered} dropped={self._dropped} closed={self._closed}>"
        )


NATS_URL_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
"""URL schemes nats-py connects with (a URL without ``://`` means ``nats://``)."""

# Up to the last "@" of the URL: a password may hold "@" or "/" (unencoded, as users type it).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def redact_credentials(text: str) -> str:
    """``text`` with the user, password or token of every URL in it replaced by ``***``:
    error messages and logs name a server without leaking its credentials."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def validate_nats_url(url: str) -> str:
    """``url`` if nats-py can connect with it (``nats://``, ``tls://``, ``ws://`` or
    ``wss://``, a host, an optional port in 1..65535, nothing after); raises
    ``InvalidArgumentError`` naming the URL without its credentials otherwise, so a typo
    fails at once instead of after the connect timeout."""
    shown = redact_credentials(url)
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgumentError("empty NATS URL")
    full = url if "://" in url else f"nats://{url}"
    try:
        parts = urllib.parse.urlsplit(full)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid NATS URL {shown!r}: {exc}") from None
    if parts.scheme not in NATS_URL_SCHEMES:
        raise InvalidArgumentError(
            f"invalid NATS URL {shown!r}: scheme {parts.scheme!r} is not one of "
            f"{', '.join(sorted(NATS_URL_SCHEMES))}"
        )
    if not parts.hostname:
        raise InvalidArgumentError(f"invalid NATS URL {shown!r}: no host")
    if port == 0:
        raise InvalidArgumentError(f"invalid NATS URL {shown!r}: port 0")
    if (parts.path not in ("", "/") or parts.query or parts.fragment) and "@" in full:
        # What follows could be part of a password with a "/" in it: do not echo it.
        raise InvalidArgumentError(f"invalid NATS URL {shown!r}: unexpected text after the "
                                   "host and port (percent-encode '/', '@' and ':' in a "
                                   "user or password)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        extra = parts.path + (f"?{parts.query}" if parts.query else "") + (
            f"#{parts.fragment}" if parts.fragment else "")
        raise InvalidArgumentError(f"invalid NATS URL {shown!r}: unexpected {extra!r} after the "
                                   "host and port")
    return url


class NatsTransport:
    """The ``Transport`` over a NATS connection (nats-py), with reconnects and drain on stop.

    ``servers`` lists one or more ``nats://`` (or ``tls://``) URLs of one deployment.
    Credentials: ``user``/``password``, ``token``, a ``creds_file`` (JWT + nkey seed) or an
    ``nkey_seed`` (an nkey user seed, ``SU...``: the server checks a signature of its nonce);
    ``tls`` is a client ``ssl.SSLContext``; ``inbox_prefix`` replaces ``_INBOX`` in reply
    subjects (one per identity, so permissions can keep each identity's replies its own).
    Services build it through ``ConnectOptions`` (one settings model for every command).
    Once connected the client reconnects by itself
    (``max_reconnect_attempts`` times, -1 = forever, ``reconnect_time_wait`` seconds apart),
    buffers up to ``reconnect_buffer_size`` bytes of publishes meanwhile, and restores
    subscriptions; the observer hears ``disconnected`` and ``reconnected`` (messages sent
    while away are lost: catch up after ``reconnected``). ``echo=False`` stops delivery of
    this connection's own messages to its own subscriptions.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        name: str,
        observer: TransportObserver | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | Path | None = None,
        nkey_seed: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        inbox_prefix: str | None = None,
        connect_timeout: float = 2.0,
        start_timeout: float = 10.0,
        max_reconnect_attempts: int = -1,
        reconnect_time_wait: float = 1.0,
        reconnect_buffer_size: int = DEFAULT_RECONNECT_BUFFER_SIZE,
        ping_interval: float = 20.0,
        max_outstanding_pings: int = 3,
        drain_timeout: float = 5.0,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES_LIMIT,
        echo: bool = True,
    ) -> None:
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls or not all(isinstance(url, str) and url for url in urls):
            raise InvalidArgumentError("need at least one NATS server URL")
        for url in urls:
            validate_nats_url(url)
        for label, value in (
            ("connect_timeout", connect_timeout),
            ("start_timeout", start_timeout),
            ("reconnect_time_wait", reconnect_time_wait),
            ("ping_interval", ping_interval),
            ("drain_timeout", drain_timeout),
        ):
            if not value > 0:
                raise InvalidArgumentError(f"{label} must be > 0, got {value!r}")
        for label, count in (
            ("pending_msgs_limit", pending_msgs_limit),
            ("pending_bytes_limit", pending_bytes_limit),
            ("reconnect_buffer_size", reconnect_buffer_size),
            ("max_outstanding_pings", max_outstanding_pings),
        ):
            if count < 1:
                raise InvalidArgumentError(f"{label} must be >= 1, got {count!r}")
        if inbox_prefix is not None:
            validate_subject(inbox_prefix, "inbox prefix")
        self._reply_root = inbox_prefix if inbox_prefix is not None else "_INBOX"
        self._servers = urls
        self._shown = [redact_credentials(url) for url in urls]  # for messages: no secrets
        self._name = name
        self._observer: TransportObserver = observer if observer is not None else NullObserver()
        self._start_timeout = start_timeout
        self._flush_timeout = max(connect_timeout, 1.0)
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._options: dict[str, Any] = {
            "servers": urls,
            "name": name,
            "user": user,
            "password": password,
            "token": token,
            "user_credentials": str(creds_file) if creds_file is not None else None,
            "nkeys_seed_str": nkey_seed,
            "tls": tls,
            "tls_hostname": tls_hostname,
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": max_reconnect_attempts,
            "reconnect_time_wait": reconnect_time_wait,
            "pending_size": reconnect_buffer_size,
            "ping_interval": ping_interval,
            "max_outstanding_pings": max_outstanding_pings,
            "drain_timeout": drain_timeout,
            "no_echo": not echo,
            "skip_subject_validation": True,
            **({"inbox_prefix": inbox_prefix} if inbox_prefix is not None else {}),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        self._nc: Client | None = None
        self._refused: asyncio.Future[Exception] | None = None  # set while start() runs
        self._starting: Client | None = None  # the client start() is connecting
        self._refusing: set[str] = set()  # servers that refused it for good
        self._subs: dict[NatsSubscriptionImpl, NatsSubscription] = {}
        self._stopping = False
        self._lock = asyncio.Lock()
        self._mux = _RequestMux(self._reply_root)

    # -- state ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The connection name (shown in the server's monitoring)."""
        return self._name

    @property
    def reply_root(self) -> str:
        """The inbox prefix every reply subject of this transport's requests lies under."""
        return self._reply_root

    @property
    def max_payload(self) -> int:
        """The server's max_payload (from its INFO); 0 before the first connection."""
        return 0 if self._nc is None else self._nc.max_payload

    @property
    def connected(self) -> bool:
        """Whether the connection is up (false while reconnecting and after stop)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def auth_required(self) -> bool:
        """Whether the server this client is connected to demands credentials (from its
        INFO; False before the first connection)."""
        info = getattr(self._nc, "_server_info", None) or {}
        return bool(info.get("auth_required"))

    @property
    def tls_required(self) -> bool:
        """Whether the connection to the server is encrypted: the server demands TLS, or
        this client asked for it."""
        info = getattr(self._nc, "_server_info", None) or {}
        return bool(info.get("tls_required")) or self._options.get("tls") is not None

    @property
    def reconnects(self) -> int:
        """How many times the client reconnected since start."""
        return 0 if self._nc is None else int(self._nc.stats["reconnects"])

    def _client(self) -> Client:
        nc = self._nc
        if nc is None:
            raise NotConnectedError(f"transport {self._name!r} is not started")
        if nc.is_closed:
            reason = "stopped" if self._stopping else f"closed (last error: {nc.last_error!r})"
            raise NotConnectedError(f"transport {self._name!r} is {reason}")
        return nc

    def nats_client(self) -> Client:
        """The nats-py client of this connection, for adapters that speak a protocol on top
        of it (JetStream: ``StrongLog``) and translate nats-py's errors themselves. Raises
        ``NotConnectedError`` before ``start()`` and after ``stop()``."""
        return self._client()

    def _check_payload(self, nc: Client, data: bytes, headers: Mapping[str, str] | None) -> None:
        size = encoded_size(data, headers)
        if size > nc.max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes (payload and headers) exceeds the server's "
                f"max_payload of {nc.max_payload} bytes"
            )

    def _forget(self, nsub: NatsSubscriptionImpl) -> None:
        self._subs.pop(nsub, None)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the first reachable server. Idempotent.

        Raises ``TransportTimeoutError`` if no connection is made within ``start_timeout``
        seconds, ``NotConnectedError`` if every server was tried ``max_reconnect_attempts``
        times, ``TransportError`` for other failures (bad URL, TLS, authentication).
        """
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return
            nc = _OrderedClient()
            self._stopping = False
            self._mux.fail_all(nats.errors.ConnectionClosedError)
            self._mux = _RequestMux(self._reply_root)  # its SUB belongs to one client
            self._refused = asyncio.get_running_loop().create_future()
            self._starting, self._refusing = nc, set()
            try:
                async with asyncio.timeout(self._start_timeout):
                    await self._connect_or_refused(nc)
            except TimeoutError as exc:
                self._stopping = True  # keeps the close callbacks quiet
                await _close_quietly(nc)
                raise TransportTimeoutError(
                    f"could not connect to {self._shown} within {self._start_timeout} s "
                    f"(last error: {nc.last_error!r})"
                ) from exc
            except WorknodeError:
                raise  # refused: already closed and explained
            except Exception as exc:
                self._stopping = True
                await _close_quietly(nc)
                raise _translate(exc, f"connect to {self._shown}") from exc
            self._nc = nc
            self._refused = self._starting = None
        notify(self._observer.connected)

    async def _connect_or_refused(self, nc: Client) -> None:
        """``nc.connect``, cut short when the server refuses this client for good (bad
        credentials, a certificate that does not verify): nats-py would retry that until the
        start timeout, and the user would wait ten seconds for a misleading "timed out"."""
        connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(**self._options))
        refused = self._refused
        assert refused is not None
        waiting: set[asyncio.Future[Any]] = {connecting, refused}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            connecting.cancel()
            raise
        if connecting.done():
            connecting.result()
            return
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        exc = refused.result()
        self._stopping = True
        await _close_quietly(nc)
        raise ConnectionRefusedByServerError(f"connect to {self._shown}: {_refusal(exc)}") from exc

    async def stop(self) -> None:
        """Drain and close: unsubscribe, let handlers finish what is pending (up to
        ``drain_timeout``), flush buffered publishes, close. Idempotent; never raises a
        transport error. Called from inside one of this transport's handlers, the drain
        waits for that very handler until ``drain_timeout``: stop from another task."""
        async with self._lock:
            nc = self._nc
            if nc is None or nc.is_closed:
                self._stopping = True
                self._close_subs()
                return
            self._stopping = True
            try:
                if nc.is_connected and not nc.is_draining:
                    await nc.drain()
            except Exception as exc:  # reconnecting, or the server went away meanwhile
                _log.info("transport %r: drain failed (%r); closing", self._name, exc)
            finally:
                await _close_quietly(nc)
                _fail_pending_requests(nc)
                self._mux.fail_all(nats.errors.ConnectionClosedError)
                self._close_subs()

    def _close_subs(self) -> None:
        for sub in self._subs.values():
            sub._closed = True
        self._subs.clear()

    async def __aenter__(self) -> Self:
        """Start and return the transport."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the transport."""
        await self.stop()

    # -- messaging ------------------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send one message to a literal subject.

        While reconnecting, the message is buffered (up to ``reconnect_buffer_size``);
        beyond that ``NotConnectedError`` is raised.
        """
        validate_subject(subject)
        _check_data(data)
        hdrs = validate_headers(headers)
        nc = self._client()
        self._check_payload(nc, data, hdrs)
        with _mapped(f"publish to {subject!r}"):
            await nc.publish(subject, data, headers=dict(hdrs) if hdrs else None)

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        on_slow_consumer: SlowConsumerCallback | None = None,
    ) -> NatsSubscription:
        """Call ``handler`` for every message on ``subject`` (``*`` and a final ``>`` allowed).

        With ``queue``, each message goes to one member of the queue group. When the pending
        queue overflows, messages are dropped and counted, and ``on_slow_consumer`` runs once
        per burst.
        """
        validate_pattern(subject)
        if queue:
            validate_subject(queue, "queue group")
        nc = self._client()
        sub = NatsSubscription(self, subject, queue, handler, on_slow_consumer, self._observer)
        with _mapped(f"subscribe to {subject!r}"):
            nsub = await nc.subscribe(
                subject,
                queue=queue,
                cb=sub._deliver,
                pending_msgs_limit=self._pending_msgs_limit,
                pending_bytes_limit=self._pending_bytes_limit,
            )
        sub._nsub = nsub
        self._subs[nsub] = sub
        if nc.is_connected:
            # One round trip, so that messages published after subscribe() returns reach
            # this subscription (while reconnecting, nats-py replays the SUB instead).
            try:
                with _mapped(f"subscribe to {subject!r}"):
                    await cast(Any, nc).flush(self._flush_timeout)
            except TransportError:
                await sub.unsubscribe()
                raise
        return sub

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline is part of the request contract
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the first reply.

        Raises ``NoRespondersError`` if nobody subscribes to ``subject``,
        ``TransportTimeoutError`` if no reply comes within ``timeout`` seconds.
        """
        validate_subject(subject)
        if type(data) is not bytes:
            _check_data(data)
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        hdrs = validate_headers(headers) if headers else None
        nc = self._client()
        if hdrs is not None or len(data) > nc.max_payload:
            self._check_payload(nc, data, hdrs)
        mux = self._mux
        try:  # _mapped, inlined: requests are the hottest path
            if mux._sub is None:
                await mux.ensure(nc, self._pending_msgs_limit, self._pending_bytes_limit)
            inbox, future = mux.open()
            try:
                await nc.publish(subject, data, reply=inbox,
                                 headers=dict(hdrs) if hdrs else None)
                async with asyncio.timeout(timeout):
                    reply = await future
            finally:
                mux.close(inbox)  # on every path: no future outlives its request
        except WorknodeError:
            raise
        except TimeoutError as exc:
            raise TransportTimeoutError(
                f"request on {subject!r}: no reply within {timeout} s"
            ) from exc
        except Exception as exc:
            raise _translate(exc, f"request on {subject!r} (timeout {timeout} s)") from exc
        rh = reply.headers
        if rh and not reply.data and rh.get("Status") == NO_RESPONDERS_STATUS:
            raise NoRespondersError(f"request on {subject!r}: no responders")
        return new_msg(reply.subject, reply.data, reply.reply, rh or None)

    async def respond(
        self, msg: Msg, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request: publish ``data`` to ``msg.reply``, which must be an inbox
        (``is_reply_subject``; ``InvalidSubjectError`` otherwise)."""
        check_reply_subject(msg)
        await self.publish(msg.reply, data, headers=headers)

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
        """Send a request and collect every reply within ``timeout`` seconds (or until
        ``max_replies``, or once ``idle`` seconds pass without another reply after at least
        ``max(1, min_replies)``);
        an empty list when nobody answers (discovery uses this).
        ``headers``: sent with the request; ``accept``: a reply it refuses (a forged or
        replayed answer, say) is dropped as if it never came, so it neither counts nor ends
        the wait. With ``accept`` a no-responders status does not end the wait either: it is
        unsigned, and anyone allowed to answer could send one (an empty message with the
        header ``Status: 503``) to cut the wait short; the window runs out instead."""
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        validate_subject(subject)
        hdrs = validate_headers(headers) if headers else None
        nc = self._client()
        if hdrs is not None or len(data) > nc.max_payload:
            self._check_payload(nc, data, hdrs)
        replies: list[Msg] = []
        enough = asyncio.Event()
        arrived = asyncio.Event()

        async def collect(nmsg: NatsMsg) -> None:
            if _no_responders(nmsg):
                if accept is not None:
                    return  # unverifiable: a responder could forge it (see the docstring)
                # The server's status message, not a reply: nobody subscribes, so nobody
                # will answer (the contract's empty list, at once).
                enough.set()
                arrived.set()  # wakes the collection wait, which then sees ``enough``
                return
            msg = _to_msg(nmsg)
            if accept is not None and not accept(msg):
                return
            replies.append(msg)
            arrived.set()
            if max_replies and len(replies) >= max_replies:
                enough.set()

        with _mapped(f"request_many on {subject!r}"):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, cb=collect)
            try:
                await nc.publish(
                    subject, data, reply=inbox, headers=dict(hdrs) if hdrs else None
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await until_enough_or_idle(enough, arrived, replies, idle, min_replies)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        return replies

    async def add_service(
        self,
        *,
        name: str,
        version: str,
        endpoints: Sequence[Endpoint],
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ServiceHandle:
        """Serve ``endpoints`` as a NATS micro (ADR-32) service with nats-py's ``nats.micro``:
        discoverable with ``$SRV.PING``/``INFO``/``STATS``; errors travel in the
        ``Nats-Service-Error``/``Nats-Service-Error-Code`` headers."""
        from nats import micro

        nc = self._client()
        tasks = TaskSet()
        with _mapped(f"service {name!r}"):
            svc = await micro.add_service(
                nc, name=name, version=version, description=description or None,
                metadata=dict(metadata or {}),
            )
            for ep in endpoints:
                await svc.add_endpoint(name=ep.name, subject=ep.subject,
                                       handler=_micro_handler(ep, tasks))
        # Served once this returns: the subscriptions have reached the server (a request
        # sent right after would otherwise race them and find no responders).
        with contextlib.suppress(TransportError):
            await self.flush()
        return _MicroHandle(svc, tasks)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - as nats-py
        """Wait (PING/PONG) until the server has processed everything sent so far."""
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        nc = self._client()
        if not nc.is_connected:
            # nats-py's flush returns at once while reconnecting; nothing reached the server.
            raise NotConnectedError(
                f"transport {self._name!r} is reconnecting; buffered messages go out once "
                "it is back"
            )
        with _mapped(f"flush (timeout {timeout} s)"):
            # nats-py annotates the timeout as int but passes it to asyncio.wait_for.
            await cast(Any, nc).flush(timeout)

    # -- nats-py callbacks: they run inside nats-py's loops and must never raise ------------

    async def _on_error(self, exc: Exception) -> None:
        try:
            refused = self._refused
            if refused is not None and not refused.done() and _refusal(exc):
                # Fails start() once every configured server refused: retrying cannot help
                # (until then another may accept: a key rotation reloaded on some servers).
                server = getattr(self._starting, "_current_server", None)
                self._refusing.add(str(server.uri.netloc) if server is not None else "")
                if len(self._refusing) >= len(self._servers):
                    refused.set_result(exc)
                return
            if isinstance(exc, nats.errors.SlowConsumerError):
                sub = self._subs.get(exc.sub)
                if sub is not None:
                    sub._record_drop()
                else:  # an internal subscription (the request inbox)
                    notify(self._observer.slow_consumer, exc.sub.subject, 1)
            elif isinstance(exc, OSError | nats.errors.StaleConnectionError | TimeoutError):
                _log.debug("transport %r: connection error %r", self._name, exc)
            else:
                _log.warning("transport %r: %r", self._name, exc)
        except Exception:
            _log.exception("transport %r: error while handling %r", self._name, exc)

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            notify(self._observer.disconnected)

    async def _on_reconnected(self) -> None:
        notify(self._observer.reconnected)

    async def _on_closed(self) -> None:
        # Closed for good (stop, or out of reconnect attempts): nobody will answer.
        self._mux.fail_all(nats.errors.ConnectionClosedError)
        if not self._stopping:
            last = self._nc.last_error if self._nc is not None else None
            _log.warning("transport %r: connection closed (last error: %r)", self._name, last)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<NatsTransport {self._name!r} {self._shown} {state}>"


def _fail_pending_requests(nc: Client) -> None:
    """Fail the requests still waiting for a reply on a closed client.

    nats-py leaves them waiting out their whole timeout, and the caller then sees a retriable
    ``TransportTimeoutError`` from a transport that is gone; the contract (and
    ``MemoryTransport``) fails them at once with ``NotConnectedError``, which ``_translate``
    makes of ``ConnectionClosedError``. The transport's own requests wait in ``_RequestMux``
    (failed by ``stop``); these are those of adapters calling ``nc.request`` (``StrongLog``).
    """
    for future in list(nc._resp_map.values()):
        if not future.done():
            future.set_exception(nats.errors.ConnectionClosedError())


async def _close_quietly(nc: Client) -> None:
    if nc.is_closed:
        return
    try:
        await nc.close()
    except Exception as exc:
        _log.debug("closing nats client: %r", exc)


if TYPE_CHECKING:

    def _keeps_the_contract(
        t: NatsTransport, s: NatsSubscription
    ) -> tuple[Transport, Subscription]:
        return t, s  # mypy proves NatsTransport is a Transport
