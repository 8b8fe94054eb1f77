"""``MemoryNetwork`` and ``MemoryTransport``: the ``Transport`` contract in one process.

For fast, deterministic unit tests of everything above the transport. It keeps the contract
of ``_protocol`` with the same errors as ``NatsTransport``: NATS subject matching (``*``, a
final ``>``), queue groups (one member per group gets each message), request/reply with
timeouts and no-responders, ``max_payload``, bounded per-subscription queues whose overflow
is dropped *and counted* exactly like nats-py's slow consumers, and delivery on the event loop
(``publish`` only enqueues; handlers run later in one task per subscription, so delivery is
never re-entrant).

Test hooks, all deterministic for a given ``seed``:

- ``partition(groups)`` / ``heal()``: transports in different groups (or in none) do not
  reach each other; each delivery lost that way is counted in ``partitioned``. A subscriber
  the requester cannot reach is no interest, so a request sees ``NoRespondersError``, as
  across a cut NATS cluster.
- ``disconnect(name)`` / ``reconnect(name)``: a transport loses its link (the observer hears
  ``disconnected``/``reconnected``); meanwhile its publishes raise ``NotConnectedError`` and
  deliveries to it are lost (counted in ``partitioned``); subscriptions survive.
- ``drop_rate`` / ``duplicate_rate``: each delivery is lost (``chaos_dropped``) or delivered
  twice (``duplicated``) with that probability, drawn from ``random`` (a seeded
  ``random.Random``, also used to pick queue-group members).
- ``settle()``: wait until every queue is empty and every handler idle.

Differences from NATS, on purpose: publishing while disconnected raises instead of buffering;
``flush`` has nothing to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Self

from broker.errors import (
    InvalidArgumentError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    TransportTimeoutError,
)
from broker.transport._micro import Endpoint, GenericService, ServiceHandle
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
    notify,
    until_enough_or_idle,
    validate_headers,
)
from broker.transport._subjects import (
    subject_matches,
    validate_pattern,
    validate_subject,
    validate_token,
)

__all__ = ["DEFAULT_MEMORY_MAX_PAYLOAD", "MemoryNetwork", "MemorySubscription", "MemoryTransport"]

_log = logging.getLogger("broker.transport.memory")

#: The max_payload of a ``MemoryNetwork`` unless given: nats-server's default, 1 MiB.
DEFAULT_MEMORY_MAX_PAYLOAD: Final = 1024 * 1024


def _check_rate(value: float, what: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{what} must be within [0, 1], got {value!r}")
    return float(value)


class MemoryNetwork:
    """The in-process "server" that ``MemoryTransport`` objects talk through."""

    def __init__(
        self,
        *,
        max_payload: int = DEFAULT_MEMORY_MAX_PAYLOAD,
        seed: int = 0,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
    ) -> None:
        if max_payload < 1:
            raise InvalidArgumentError(f"max_payload must be >= 1, got {max_payload!r}")
        self.max_payload = max_payload
        #: The source of every random choice (chaos rates, queue-group members).
        self.random = random.Random(seed)
        self._drop_rate = _check_rate(drop_rate, "drop_rate")
        self._duplicate_rate = _check_rate(duplicate_rate, "duplicate_rate")
        self._transports: dict[str, MemoryTransport] = {}
        self._subs: list[MemorySubscription] = []
        self._groups: dict[str, int] | None = None
        self._ids = itertools.count(1)
        #: Deliveries lost to a partition or a disconnected transport.
        self.partitioned = 0
        #: Deliveries lost to ``drop_rate``.
        self.chaos_dropped = 0
        #: Deliveries made twice because of ``duplicate_rate``.
        self.duplicated = 0
        #: Messages published (requests and replies included).
        self.published = 0

    @property
    def drop_rate(self) -> float:
        """Probability that one delivery is lost."""
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        self._drop_rate = _check_rate(value, "drop_rate")

    @property
    def duplicate_rate(self) -> float:
        """Probability that one delivery happens twice."""
        return self._duplicate_rate

    @duplicate_rate.setter
    def duplicate_rate(self, value: float) -> None:
        self._duplicate_rate = _check_rate(value, "duplicate_rate")

    def transport(
        self,
        name: str,
        *,
        observer: TransportObserver | None = None,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES_LIMIT,
        drain_timeout: float = 5.0,
        echo: bool = True,
    ) -> MemoryTransport:
        """A new transport on this network (not started). ``name`` is a token, unique among
        the transports not yet stopped; partitions refer to it."""
        validate_token(name, "transport name")
        if name in self._transports:
            raise InvalidArgumentError(f"a transport named {name!r} is already on this network")
        return MemoryTransport(
            self,
            name,
            observer=observer,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
            drain_timeout=drain_timeout,
            echo=echo,
        )

    # -- test hooks -----------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[str | MemoryTransport]]) -> None:
        """Cut the network into ``groups`` of transports (or their names).

        Transports reach each other only within a group; a transport in no group reaches
        only itself. Replaces any previous partition; ``heal()`` removes it.
        """
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for member in group:
                name = member.name if isinstance(member, MemoryTransport) else member
                if name in group_of:
                    raise InvalidArgumentError(f"{name!r} is in more than one partition group")
                group_of[name] = index
        self._groups = group_of

    def heal(self) -> None:
        """Remove the partition: every transport reaches every other again."""
        self._groups = None

    def disconnect(self, name: str) -> None:
        """Take a transport's link down (see the module docstring)."""
        transport = self._get(name)
        if transport._link_up:
            transport._link_up = False
            notify(transport._observer.disconnected)

    def reconnect(self, name: str) -> None:
        """Bring a transport's link back up; its observer hears ``reconnected``."""
        transport = self._get(name)
        if not transport._link_up:
            transport._link_up = True
            notify(transport._observer.reconnected)

    async def settle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - test hook
        """Wait until every subscription's queue is empty and its handler idle (handlers
        may publish more; that is waited for too). Raises ``TransportTimeoutError``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    busy = [sub for sub in self._subs if sub._unfinished]
                    if not busy:
                        await asyncio.sleep(0)  # let scheduled slow-consumer reports run
                        if not any(sub._unfinished for sub in self._subs):
                            return
                        continue
                    for sub in busy:
                        await sub._idle.wait()
        except TimeoutError:
            raise TransportTimeoutError(f"network did not settle within {timeout} s") from None

    # -- routing --------------------------------------------------------------------------

    def _get(self, name: str) -> MemoryTransport:
        try:
            return self._transports[name]
        except KeyError:
            raise InvalidArgumentError(f"no running transport named {name!r}") from None

    def _next_id(self) -> int:
        return next(self._ids)

    def _reachable(self, sender: MemoryTransport, receiver: MemoryTransport) -> bool:
        if sender is receiver:
            return True
        if not receiver._link_up:
            return False
        if self._groups is None:
            return True
        group = self._groups.get(sender.name)
        return group is not None and group == self._groups.get(receiver.name)

    def _route(self, sender: MemoryTransport, msg: Msg) -> bool:
        """Deliver ``msg`` to every matching subscription ``sender`` reaches (one member
        per queue group). Returns whether any reachable subscription was interested."""
        self.published += 1
        targets: list[MemorySubscription] = []
        queue_groups: dict[str, list[MemorySubscription]] = {}
        interested = False
        for sub in self._subs:
            if not subject_matches(sub.subject, msg.subject):
                continue
            if sub._transport is sender and not sender._echo:
                continue
            if not self._reachable(sender, sub._transport):
                self.partitioned += 1
                continue
            interested = True
            if sub.queue:
                queue_groups.setdefault(sub.queue, []).append(sub)
            else:
                targets.append(sub)
        for members in queue_groups.values():
            targets.append(members[self.random.randrange(len(members))])
        for sub in targets:
            if self._drop_rate and self.random.random() < self._drop_rate:
                self.chaos_dropped += 1
                continue
            sub._offer(msg)
            if self._duplicate_rate and self.random.random() < self._duplicate_rate:
                self.duplicated += 1
                sub._offer(msg)
        return interested

    def __repr__(self) -> str:
        return (
            f"<MemoryNetwork transports={sorted(self._transports)} subs={len(self._subs)} "
            f"partitioned={self.partitioned} chaos_dropped={self.chaos_dropped} "
            f"duplicated={self.duplicated}>"
        )


class MemorySubscription:
    """A subscription on a ``MemoryTransport`` (see ``Subscription``)."""

    def __init__(
        self,
        transport: MemoryTransport,
        subject: str,
        queue: str,
        handler: Handler,
        on_slow_consumer: SlowConsumerCallback | None,
    ) -> None:
        self._transport = transport
        self._subject = subject
        self._queue = queue
        self._handler = handler
        self._on_slow_consumer = on_slow_consumer
        self._messages: asyncio.Queue[Msg] = asyncio.Queue()
        self._pending_bytes = 0
        self._unfinished = 0  # queued or being handled
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._handler_errors = 0
        self._unreported = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"memory-sub:{transport.name}:{subject}"
        )

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
        """Messages queued and waiting for the handler."""
        return self._messages.qsize()

    @property
    def active(self) -> bool:
        """Whether the subscription still receives messages."""
        return not self._closed

    def _offer(self, msg: Msg) -> None:
        size = len(msg.data)
        transport = self._transport
        if (
            self._messages.qsize() >= transport._pending_msgs_limit
            or self._pending_bytes + size >= transport._pending_bytes_limit
        ):
            self._dropped += 1
            self._unreported += 1
            if self._unreported == 1:
                asyncio.get_running_loop().call_soon(self._report_drops)
            return
        self._pending_bytes += size
        self._unfinished += 1
        self._idle.clear()
        self._messages.put_nowait(msg)

    def _report_drops(self) -> None:
        dropped, self._unreported = self._unreported, 0
        notify(self._transport._observer.slow_consumer, self._subject, dropped)
        if self._on_slow_consumer is not None:
            notify(self._on_slow_consumer)

    def _done_one(self) -> None:
        if self._closed:
            return  # _close() already zeroed the count
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    async def _run(self) -> None:
        while not self._closed:
            msg = await self._messages.get()
            self._pending_bytes -= len(msg.data)
            try:
                if self._closed:
                    continue
                self._delivered += 1
                try:
                    await self._handler(msg)
                except Exception as exc:
                    self._handler_errors += 1
                    notify(self._transport._observer.handler_error, self._subject, exc)
            finally:
                self._messages.task_done()
                self._done_one()

    def _detach(self) -> None:
        """Stop receiving new messages (pending ones stay queued)."""
        with contextlib.suppress(ValueError):
            self._transport._network._subs.remove(self)

    async def _close(self) -> None:
        self._closed = True
        self._detach()
        self._unfinished = 0
        self._pending_bytes = 0
        self._idle.set()
        task = self._task
        if task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])

    async def unsubscribe(self) -> None:
        """Stop receiving; pending messages are discarded. Idempotent."""
        if self._closed:
            return
        with contextlib.suppress(ValueError):
            self._transport._subs.remove(self)
        await self._close()

    def __repr__(self) -> str:
        return (
            f"<MemorySubscription {self._subject!r} queue={self._queue!r} "
            f"delivered={self._delivered} dropped={self._dropped} closed={self._closed}>"
        )


class MemoryTransport:
    """The ``Transport`` over a ``MemoryNetwork``. Create it with ``network.transport(name)``."""

    def __init__(
        self,
        network: MemoryNetwork,
        name: str,
        *,
        observer: TransportObserver | None = None,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES_LIMIT,
        drain_timeout: float = 5.0,
        echo: bool = True,
    ) -> None:
        if pending_msgs_limit < 1 or pending_bytes_limit < 1:
            raise InvalidArgumentError("pending limits must be >= 1")
        if not drain_timeout > 0:
            raise InvalidArgumentError(f"drain_timeout must be > 0, got {drain_timeout!r}")
        self._network = network
        self._name = validate_token(name, "transport name")
        self._observer: TransportObserver = observer if observer is not None else NullObserver()
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._drain_timeout = drain_timeout
        self._echo = echo
        self._state = "new"  # -> "started" -> "draining" -> "stopped"
        self._link_up = True
        self._subs: list[MemorySubscription] = []
        self._inbox_prefix = ""
        self._inbox_ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future[Msg]] = {}
        self._inbox_sub: MemorySubscription | None = None

    @property
    def name(self) -> str:
        """The transport's name on its network."""
        return self._name

    @property
    def network(self) -> MemoryNetwork:
        """The network this transport is on."""
        return self._network

    @property
    def reply_root(self) -> str:
        """The inbox prefix every reply subject of this transport's requests lies under
        (fixed when it starts; '' before)."""
        return self._inbox_prefix

    @property
    def max_payload(self) -> int:
        """The network's max_payload."""
        return self._network.max_payload

    @property
    def connected(self) -> bool:
        """Started, not stopped, and the link is up."""
        return self._state in ("started", "draining") and self._link_up

    def _open(self) -> None:
        if self._state != "new":
            return
        network = self._network
        if self._name in network._transports:
            raise InvalidArgumentError(f"a transport named {self._name!r} is already running")
        network._transports[self._name] = self
        self._inbox_prefix = f"_INBOX.m{network._next_id()}"
        self._state = "started"
        notify(self._observer.connected)

    async def start(self) -> None:
        """Join the network. Idempotent; a stopped transport stays stopped (make a new one)."""
        if self._state == "stopped":
            raise NotConnectedError(f"transport {self._name!r} is stopped; create a new one")
        self._open()

    async def stop(self) -> None:
        """Drain (handle what is queued, up to ``drain_timeout``) and leave the network.
        Idempotent. As with NATS, stop from another task than this transport's handlers."""
        if self._state in ("stopped", "draining"):
            return
        if self._state == "new":
            self._state = "stopped"
            return
        self._state = "draining"
        subs = list(self._subs)
        for sub in subs:
            sub._detach()
        try:
            async with asyncio.timeout(self._drain_timeout):
                for sub in subs:
                    await sub._idle.wait()
        except TimeoutError:
            _log.warning("transport %r: drain timed out; pending messages lost", self._name)
        for sub in subs:
            await sub._close()
        self._subs.clear()
        self._inbox_sub = None
        for future in self._replies.values():
            if not future.done():
                future.set_exception(NotConnectedError(f"transport {self._name!r} stopped"))
        self._replies.clear()
        self._state = "stopped"
        self._network._transports.pop(self._name, None)

    async def __aenter__(self) -> Self:
        """Start and return the transport."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the transport."""
        await self.stop()

    def _require(self, *, publishing: bool = True, link: bool = True) -> None:
        if self._state == "new":
            raise NotConnectedError(f"transport {self._name!r} is not started")
        if self._state == "stopped" or (self._state == "draining" and not publishing):
            raise NotConnectedError(f"transport {self._name!r} is stopped")
        if link and not self._link_up:
            raise NotConnectedError(f"transport {self._name!r} is disconnected")

    def _prepare(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> Mapping[str, str] | None:
        validate_subject(subject)
        if not isinstance(data, bytes):
            raise InvalidArgumentError(f"message data must be bytes, not {type(data).__name__}")
        hdrs = validate_headers(headers)
        self._require()
        size = encoded_size(data, hdrs)
        if size > self._network.max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes (payload and headers) exceeds the server's "
                f"max_payload of {self._network.max_payload} bytes"
            )
        return hdrs

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send one message to a literal subject; handlers run later, on the loop."""
        hdrs = self._prepare(subject, data, headers)
        self._network._route(self, Msg(subject, data, "", hdrs))

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        on_slow_consumer: SlowConsumerCallback | None = None,
    ) -> MemorySubscription:
        """Call ``handler`` for every message on ``subject`` (``*`` and a final ``>``
        allowed); with ``queue``, one member of the group gets each message."""
        validate_pattern(subject)
        if queue:
            validate_subject(queue, "queue group")
        # As with NATS, subscribing while disconnected works: the subscription receives
        # once the link is back.
        self._require(publishing=False, link=False)
        return self._add_sub(subject, queue, handler, on_slow_consumer)

    def _add_sub(
        self,
        subject: str,
        queue: str,
        handler: Handler,
        on_slow_consumer: SlowConsumerCallback | None,
    ) -> MemorySubscription:
        sub = MemorySubscription(self, subject, queue, handler, on_slow_consumer)
        self._subs.append(sub)
        self._network._subs.append(sub)
        return sub

    async def _on_reply(self, msg: Msg) -> None:
        future = self._replies.get(msg.subject)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline is part of the request contract
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the first reply (``NoRespondersError`` if nobody
        reachable subscribes, ``TransportTimeoutError`` after ``timeout`` seconds)."""
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        hdrs = self._prepare(subject, data, headers)
        self._require(publishing=False)  # the reply could not arrive while draining
        if self._inbox_sub is None:
            self._inbox_sub = self._add_sub(f"{self._inbox_prefix}.*", "", self._on_reply, None)
        inbox = f"{self._inbox_prefix}.{next(self._inbox_ids)}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._replies[inbox] = future
        try:
            if not self._network._route(self, Msg(subject, data, inbox, hdrs)):
                raise NoRespondersError(f"request on {subject!r}: no responders")
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise TransportTimeoutError(
                    f"request on {subject!r}: no reply within {timeout} s"
                ) from None
        finally:
            self._replies.pop(inbox, None)

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
        an empty list when nobody answers.
        ``headers``: sent with the request; ``accept``: a reply it refuses (a forged or
        replayed answer, say) is dropped as if it never came, so it neither counts nor ends
        the wait."""
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        hdrs = self._prepare(subject, data, headers)
        self._require(publishing=False)
        inbox = f"{self._inbox_prefix}.many.{next(self._inbox_ids)}"
        replies: list[Msg] = []
        enough = asyncio.Event()
        arrived = asyncio.Event()

        async def collect(msg: Msg) -> None:
            if accept is not None and not accept(msg):
                return
            replies.append(msg)
            arrived.set()
            if max_replies and len(replies) >= max_replies:
                enough.set()

        sub = await self.subscribe(inbox, collect)
        try:
            if self._network._route(self, Msg(subject, data, inbox, hdrs)):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await until_enough_or_idle(enough, arrived, replies, idle, min_replies)
        finally:
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
        """Serve ``endpoints`` as an ADR-32 service (see ``_micro``)."""
        svc = GenericService(
            self, name=name, version=version, description=description,
            endpoints=endpoints, metadata=metadata,
        )
        await svc.start()
        return svc

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - as nats-py
        """Nothing to wait for (publish hands messages over at once); checks the link."""
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        self._require()
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"<MemoryTransport {self._name!r} {self._state} link_up={self._link_up}>"


if TYPE_CHECKING:

    def _keeps_the_contract(
        t: MemoryTransport, s: MemorySubscription
    ) -> tuple[Transport, Subscription]:
        return t, s  # mypy proves MemoryTransport is a Transport
