"""Chaos harness: real nats-server clusters whose every route runs through a TCP proxy.

What the harness guarantees:

- Loopback only. Proxies listen on and forward to loopback addresses; the servers are
  ``EmbeddedNatsServer`` instances, which refuse anything else.
- No route bypasses a proxy. Each *ordered* pair of servers has its own ``TcpProxy``:
  ``cluster.proxy(i, j)`` is the proxy server ``i`` dials to reach server ``j``, and every
  server lists all of its peers, through those proxies, as explicit routes. Ordered rather than
  one proxy per pair because nats-server refuses to run clustered JetStream on a server with no
  configured route, and because this is the standard NATS layout (every server lists every
  other; the servers keep one route per peer and drop the duplicate). Both directions of a
  pair are cut together, so a cut pair has no link left.
- Every server advertises, as its cluster address, a loopback port that is bound but never
  listening (held open by the harness for the cluster's lifetime, so nothing else can take
  it). Gossip makes servers dial the advertised address of peers they hear about; those dials
  are refused, so no *implicit* route can go around the proxies (see DESIGN.md, "Facts
  measured": without this a cut stops nothing).
- A cut takes effect at once, without awaiting: live connections are aborted and new ones
  are refused, or held until ``restore()``; nothing published after ``cut()`` returns crosses
  the link. Routes come back when nats-server redials (it retries configured routes about
  once a second): measured here, 0.07-1.1 s from ``restore()`` to routes up and messages
  flowing; ``wait_routes()`` tells when.
- ``stop()`` (and leaving ``async with``) stops every server and proxy and releases every
  port, also after a failed ``start()`` and when some part fails to stop.
- TLS passes through unchanged: a proxy forwards bytes, so TLS on routes (``cluster_tls`` in
  ``server_options``) and on clients (``tls``) is end to end between the servers (and
  clients). Route certificates must name ``127.0.0.1``, the host every route dials (the
  proxies listen there); a route forms only between servers whose certificates come from
  the CA the other trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import math
import random
import socket
import ssl
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import nats

from broker.transport import EmbeddedNatsServer, client_ssl_context, complete_despite_cancel

__all__ = ["NatsCluster", "TcpProxy"]

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 64  # per direction: bounds what a delayed link holds in memory
_CHAOS_TICK = 0.05
_POLL = 0.05


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_loopback(host: str, what: str) -> None:
    if not _is_loopback(host):
        raise ValueError(f"{what} {host!r} is not a loopback address; the harness stays local")


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client side and the dialled upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class TcpProxy:
    """A loopback TCP proxy to ``target`` that a test can cut, slow down and disturb.

    Bytes are forwarded both ways unchanged; when either side closes, both are closed.
    ``cut()`` aborts every live connection and refuses new ones (accepts and aborts them) until
    ``restore()``; with ``hold=True`` new connections are kept waiting instead and forwarded
    once restored. ``delay`` (seconds, settable at any time) holds every chunk back that long
    in each direction, in order, without serialising chunks (up to 64 in flight per
    direction). ``drop_connections_rate`` (settable) resets each live connection at random at
    that mean rate per second; ``seed`` makes it repeatable.
    Counters: ``bytes_up`` (client to target), ``bytes_down``, ``connections_accepted``
    (forwarded), ``connections_refused``, ``connections_dropped`` (aborted by a cut or at
    random) and ``active_connections``. Use as ``async with``; ``start``/``stop`` are idempotent.
    """

    def __init__(
        self,
        listen_host: str = "127.0.0.1",
        target: tuple[str, int] | None = None,
        *,
        listen_port: int = 0,
        delay: float = 0.0,
        drop_connections_rate: float = 0.0,
        seed: int | None = None,
        connect_timeout: float = 2.0,
        name: str = "",
    ) -> None:
        _require_loopback(listen_host, "listen_host")
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._target: tuple[str, int] | None = None
        self.target = target
        self._name = name or "proxy"
        self._connect_timeout = connect_timeout
        self._random = random.Random(seed)
        self._delay = 0.0
        self._drop_rate = 0.0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._chaos_task: asyncio.Task[None] | None = None
        self._cut = False
        self._hold = False
        self._restored = asyncio.Event()
        self._restored.set()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_accepted = 0
        self.connections_refused = 0
        self.connections_dropped = 0
        self.delay = delay
        self.drop_connections_rate = drop_connections_rate

    # -- knobs and state ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """A label for logs and reprs."""
        return self._name

    @property
    def target(self) -> tuple[str, int] | None:
        """Where connections are forwarded to; while None, they are refused. Settable, so a
        proxy can listen before its target exists."""
        return self._target

    @target.setter
    def target(self, value: tuple[str, int] | None) -> None:
        if value is not None:
            host, port = value
            _require_loopback(host, "target host")
            if not 0 < port <= 65535:
                raise ValueError(f"target port must be within 1..65535, got {port!r}")
        self._target = value

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the proxy listens on. Known once started."""
        if self._listen_port == 0:
            raise RuntimeError(f"{self._name} has not started yet: its port is not chosen")
        return self._listen_host, self._listen_port

    @property
    def url(self) -> str:
        """``nats://host:port`` of the listening side (for a route or a client)."""
        host, port = self.address
        return f"nats://{host}:{port}"

    @property
    def delay(self) -> float:
        """Seconds every chunk is held back, in each direction."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"delay must be >= 0, got {value!r}")
        self._delay = value

    @property
    def drop_connections_rate(self) -> float:
        """Mean random resets per second of each live connection (0 = none)."""
        return self._drop_rate

    @drop_connections_rate.setter
    def drop_connections_rate(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"drop_connections_rate must be >= 0, got {value!r}")
        self._drop_rate = value
        self._ensure_chaos_task()

    @property
    def is_cut(self) -> bool:
        """Whether the proxy is cut."""
        return self._cut

    @property
    def running(self) -> bool:
        """Whether the proxy is listening."""
        return self._server is not None

    @property
    def active_connections(self) -> int:
        """Connections being forwarded right now."""
        return len(self._links)

    # -- faults -----------------------------------------------------------------------------

    def cut(self, *, hold: bool = False) -> None:
        """Abort every live connection and refuse new ones (``hold``: keep them waiting)
        until ``restore()``. Takes effect before returning. (Holding does not make
        nats-server's routes come back sooner; it models a link that accepts but is silent.)"""
        self._cut = True
        self._hold = hold
        self._restored.clear()
        self.drop_all()

    def restore(self) -> None:
        """Forward connections again (held ones included). Idempotent."""
        self._cut = False
        self._hold = False
        self._restored.set()

    def drop_all(self) -> int:
        """Abort every live connection once (the link stays usable); return how many."""
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self.connections_dropped += 1
            link.abort()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (on ``listen_port``, or a free port). Idempotent."""
        if self._server is not None:
            return
        server = await asyncio.start_server(self._accept, self._listen_host, self._listen_port)
        self._server = server
        self._listen_port = server.sockets[0].getsockname()[1]
        self._ensure_chaos_task()

    async def stop(self) -> None:
        """Stop listening and abort every connection, held ones included. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        chaos, self._chaos_task = self._chaos_task, None
        tasks = [*self._handlers, *([chaos] if chaos is not None else [])]
        for link in list(self._links):
            self._links.discard(link)
            link.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        """Start and return the proxy."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the proxy."""
        await self.stop()

    # -- forwarding -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels this task, which asyncio's stream server owns; ending
            # normally keeps the server from logging the cancellation as an error.
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut and self._hold:
            await self._restored.wait()
        target = self._target
        if self._cut or self._server is None or target is None:
            self.connections_refused += 1
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(self._connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(*target)
        except (OSError, TimeoutError):
            self.connections_refused += 1  # target down: the dialler sees a closed connection
            writer.transport.abort()
            return
        if self._cut or self._server is None:  # cut while we were dialling
            self.connections_refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.connections_accepted += 1
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, up=True)),
            asyncio.create_task(self._pump(up_reader, writer, up=False)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copy ``reader`` to ``writer`` until EOF or an error, each chunk ``delay`` late."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)

        async def feed() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    await queue.put((loop.time() + self._delay, data))
            except OSError:
                pass
            await queue.put(None)

        feeder = asyncio.create_task(feed())
        try:
            while (item := await queue.get()) is not None:
                release, data = item
                if (wait := release - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if writer.is_closing():  # dropped or cut meanwhile: the bytes die with the link
                    return
                writer.write(data)
                await writer.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    def _ensure_chaos_task(self) -> None:
        if self._drop_rate > 0 and self._server is not None and self._chaos_task is None:
            self._chaos_task = asyncio.get_running_loop().create_task(self._chaos())

    async def _chaos(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while self._drop_rate > 0:
                await asyncio.sleep(_CHAOS_TICK)
                now = loop.time()
                # Each connection survives an interval of dt with probability exp(-rate * dt).
                p_drop = 1.0 - math.exp(-self._drop_rate * (now - last))
                last = now
                for link in list(self._links):
                    if self._random.random() < p_drop:
                        self._drop(link)
        finally:
            if self._chaos_task is asyncio.current_task():
                self._chaos_task = None

    def __repr__(self) -> str:
        where = f"{self._listen_host}:{self._listen_port}" if self._listen_port else "(not started)"
        to = "(no target)" if self._target is None else f"{self._target[0]}:{self._target[1]}"
        state = "cut" if self._cut else "open"
        return f"<TcpProxy {self._name} {where} -> {to} {state}>"


def _fetch_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class NatsCluster:
    """``size`` clustered nats-servers, each route through its own ``TcpProxy``.

    Server ``i`` keeps its state in ``tmp_path / f"n{i}"`` and is named ``f"{name}-{i}"``.
    Use ``partition()``/``heal()`` to split and join the network, ``kill()``/``restart()`` to
    crash and revive a server, and ``wait_routes()`` to know when the routes are back.
    ``advertise_closed=False`` turns off the closed advertised port (only to show the trap it
    avoids: servers then also route to each other directly). By default servers do not tell
    clients about their peers (``--no_advertise``), so a client given server ``i``'s URL stays
    on server ``i`` even when it dies, and a test knows which side of a partition each client
    is on; ``client_discovery=True`` lets clients fail over to peers. ``server_options`` go to
    every ``EmbeddedNatsServer`` (``tls``, ``tls_verify``, ``cluster_tls`` included).
    ``client_tls`` is the context the harness's own client connections (``wait_flow``) use;
    by default, with a ``tls`` server option, one that trusts ``tls.ca_file`` (give one with
    a client certificate when ``tls_verify`` is on). Use as ``async with``; ``start``/``stop``
    are idempotent.
    """

    def __init__(
        self,
        tmp_path: Path | str,
        size: int = 3,
        *,
        jetstream: bool = True,
        name: str = "chaos",
        advertise_closed: bool = True,
        client_discovery: bool = False,
        server_options: dict[str, Any] | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        if size < 2:
            raise ValueError(f"a cluster needs at least 2 servers, got {size!r}")
        self._root = Path(tmp_path)
        self._size = size
        self._jetstream = jetstream
        self._name = name
        self._advertise_closed = advertise_closed
        self._client_discovery = client_discovery
        self._server_options = dict(server_options or {})
        server_tls = self._server_options.get("tls")
        if client_tls is None and server_tls is not None:
            client_tls = client_ssl_context(server_tls.ca_file)
        self._client_tls = client_tls
        self._servers: list[EmbeddedNatsServer] = []
        self._proxies: dict[tuple[int, int], TcpProxy] = {}
        self._closed_ports: list[socket.socket] = []
        self._advertised: list[str | None] = []
        self._cut_pairs: set[frozenset[int]] = set()
        self._started = False

    # -- where things are -----------------------------------------------------------------

    @property
    def size(self) -> int:
        """How many servers."""
        return self._size

    @property
    def servers(self) -> list[EmbeddedNatsServer]:
        """The servers, by index."""
        return list(self._servers)

    @property
    def urls(self) -> list[str]:
        """Client URL of each server, by index."""
        return [server.url for server in self._servers]

    @property
    def monitor_urls(self) -> list[str]:
        """Monitoring URL of each server, by index."""
        urls = [server.monitor_url for server in self._servers]
        assert all(url is not None for url in urls)
        return [url for url in urls if url is not None]

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        """The TLS context for client connections to the servers, or None (plaintext)."""
        return self._client_tls

    @property
    def cut_pairs(self) -> set[frozenset[int]]:
        """The pairs of servers whose link is cut now."""
        return set(self._cut_pairs)

    def server_name(self, i: int) -> str:
        """The ``server_name`` of server ``i`` (as ``/routez`` reports it)."""
        return f"{self._name}-{i}"

    def proxy(self, i: int, j: int) -> TcpProxy:
        """The proxy through which server ``i`` dials server ``j``."""
        self._check_index(i)
        self._check_index(j)
        if i == j:
            raise ValueError(f"no proxy between server {i} and itself")
        return self._proxies[i, j]

    def link(self, i: int, j: int) -> tuple[TcpProxy, TcpProxy]:
        """Both proxies between servers ``i`` and ``j``: ``(i dials j, j dials i)``."""
        return self.proxy(i, j), self.proxy(j, i)

    @property
    def proxies(self) -> dict[tuple[int, int], TcpProxy]:
        """Every proxy, keyed by ``(dialler, target)``."""
        return dict(self._proxies)

    def advertised(self, i: int) -> str | None:
        """The cluster address server ``i`` gossips (``host:port`` of a closed port), or None
        with ``advertise_closed=False``."""
        self._check_index(i)
        return self._advertised[i]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self._size:
            raise IndexError(f"server index {i!r} out of range 0..{self._size - 1}")

    # -- lifecycle --------------------------------------------------------------------------

    def _closed_port(self) -> str:
        """A loopback ``host:port`` that refuses connections while the cluster lives."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._closed_ports.append(sock)
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connecting gets RST
        return f"127.0.0.1:{sock.getsockname()[1]}"

    async def start(self) -> None:
        """Start every proxy (without a target yet), then the servers one by one; once server
        ``j`` listens, the proxies towards it get their target, so every later server routes
        to it at once (earlier dials were refused and are retried by nats-server). Returns
        when every server accepts clients; ``wait_routes()`` tells when the mesh is complete.
        On failure everything is stopped."""
        if self._started:
            return
        self._started = True
        self._servers, self._proxies, self._advertised = [], {}, []
        self._cut_pairs.clear()
        try:
            for i, j in itertools.permutations(range(self._size), 2):
                proxy = TcpProxy(name=f"route {i}->{j}")
                self._proxies[i, j] = proxy
                await proxy.start()
            for j in range(self._size):
                server = self._new_server(j)
                self._servers.append(server)
                await server.start()
                assert server.cluster_url is not None
                port = int(server.cluster_url.rsplit(":", 1)[1])
                for i in range(self._size):
                    if i != j:
                        self._proxies[i, j].target = ("127.0.0.1", port)
        except BaseException:
            await self.stop()
            raise

    def _new_server(self, i: int) -> EmbeddedNatsServer:
        routes = [self._proxies[i, j].url for j in range(self._size) if j != i]
        options: dict[str, Any] = {
            "jetstream": self._jetstream,
            "server_name": self.server_name(i),
            "cluster_name": self._name,
            "cluster_port": 0,
            "routes": routes,
            **self._server_options,
        }
        if not self._client_discovery:
            options["extra_args"] = ["--no_advertise", *options.get("extra_args", ())]
        if self._advertise_closed:
            options["cluster_advertise"] = self._closed_port()
        self._advertised.append(options.get("cluster_advertise"))
        return EmbeddedNatsServer(self._root / f"n{i}", **options)

    async def stop(self) -> None:
        """Stop every server and proxy and release the closed ports. Idempotent; when parts
        fail to stop, the rest are still stopped and the first error is raised at the end.
        ``servers`` and ``proxies`` stay inspectable until the next ``start()``. A caller
        cancelled meanwhile still waits for every server to stop (no orphaned process)."""
        await complete_despite_cancel(self._stop())

    async def _stop(self) -> None:
        self._started = False
        results = await asyncio.gather(
            *(server.stop() for server in self._servers), return_exceptions=True
        )
        results += await asyncio.gather(
            *(proxy.stop() for proxy in self._proxies.values()), return_exceptions=True
        )
        for sock in self._closed_ports:
            sock.close()
        self._closed_ports.clear()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def __aenter__(self) -> Self:
        """Start and return the cluster."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the cluster."""
        await self.stop()

    # -- faults -----------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[int]], *, hold: bool = False) -> None:
        """Split the network: servers in different groups lose their routes at once; servers in
        the same group are linked again. Servers named in no group are cut off from everyone.
        This replaces any earlier partition. ``hold`` is passed to ``TcpProxy.cut``."""
        sets = [frozenset(group) for group in groups]
        where: dict[int, int] = {}
        for n, group in enumerate(sets):
            for i in group:
                self._check_index(i)
                if i in where:
                    raise ValueError(f"server {i} is in more than one group: {sets!r}")
                where[i] = n
        for i in range(self._size):
            where.setdefault(i, -1 - i)  # alone
        for i, j in itertools.combinations(range(self._size), 2):
            if where[i] == where[j]:
                self.restore_link(i, j)
            else:
                self.cut_link(i, j, hold=hold)

    def heal(self) -> None:
        """Restore every link. Routes come back once nats-server redials (``wait_routes``)."""
        for i, j in itertools.combinations(range(self._size), 2):
            self.restore_link(i, j)

    def cut_link(self, i: int, j: int, *, hold: bool = False) -> None:
        """Cut the link between servers ``i`` and ``j`` (both proxies) at once, leaving every
        other link as it is: for partitions that are not transitive."""
        for proxy in self.link(i, j):
            proxy.cut(hold=hold)
        self._cut_pairs.add(frozenset((i, j)))

    def restore_link(self, i: int, j: int) -> None:
        """Restore the link between servers ``i`` and ``j``. Idempotent."""
        for proxy in self.link(i, j):
            proxy.restore()
        self._cut_pairs.discard(frozenset((i, j)))

    async def kill(self, i: int) -> None:
        """Kill server ``i`` with SIGKILL, as a crash would."""
        self._check_index(i)
        await self._servers[i].kill()

    async def restart(self, i: int) -> None:
        """Start server ``i`` again (after ``kill``) on the same ports with the same state;
        a running server is stopped gracefully first."""
        self._check_index(i)
        server = self._servers[i]
        if server.running:
            await server.restart()
        else:
            await server.start()

    # -- observing --------------------------------------------------------------------------

    async def routez(self, i: int, *, timeout: float = 2.0) -> dict[str, Any]:
        """Server ``i``'s ``/routez`` monitoring document."""
        self._check_index(i)
        url = f"{self.monitor_urls[i]}/routez"
        doc: dict[str, Any] = await asyncio.to_thread(_fetch_json, url, timeout)
        return doc

    async def peers(self, i: int) -> set[str]:
        """Names of the servers that server ``i`` has at least one route to."""
        doc = await self.routez(i)
        return {route.get("remote_name") or route["remote_id"] for route in doc.get("routes") or []}

    def refused_implicit_routes(self, i: int) -> int:
        """How many times server ``i`` tried to open an implicit route to a peer's advertised
        (closed) address and was refused, as its log tells (the log spans restarts)."""
        self._check_index(i)
        closed = [a for j, a in enumerate(self._advertised) if j != i and a is not None]
        try:
            lines = self._servers[i].log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0
        return sum(
            1
            for line in lines
            if "Error trying to connect to route" in line
            and "refused" in line
            and any(f"{address}:" in line for address in closed)
        )

    def expected_peers(self, i: int) -> set[str]:
        """Names of the running servers whose link with server ``i`` is not cut."""
        return {
            self.server_name(j)
            for j in range(self._size)
            if j != i and self._servers[j].running and frozenset((i, j)) not in self._cut_pairs
        }

    async def wait_routes(self, expected: int | None = None, *, timeout: float = 15.0) -> None:
        """Wait until every running server routes to exactly the peers it should: with
        ``expected``, that many distinct peers each; by default, exactly the running servers
        not cut off from it (``expected_peers``). Raises ``TimeoutError`` with what was seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            running = [i for i, server in enumerate(self._servers) if server.running]
            seen: dict[int, set[str] | str] = {}
            for i in running:
                try:
                    seen[i] = await self.peers(i)
                except OSError as exc:
                    seen[i] = f"unreachable: {exc}"
            ok = all(
                isinstance(peers, set)
                and (
                    len(peers) == expected
                    if expected is not None
                    else peers == self.expected_peers(i)
                )
                for i, peers in seen.items()
            )
            if ok:
                return
            if loop.time() > deadline:
                want = (
                    expected
                    if expected is not None
                    else {i: sorted(self.expected_peers(i)) for i in running}
                )
                raise TimeoutError(
                    f"routes not as expected within {timeout} s: want {want}, "
                    f"saw { {i: sorted(p) if isinstance(p, set) else p for i, p in seen.items()} }"
                )
            await asyncio.sleep(_POLL)

    async def wait_flow(self, src: int, dst: int, *, timeout: float = 10.0) -> float:
        """Publish probes on server ``src`` until one reaches a subscriber on server ``dst``;
        return the seconds it took. Raises ``TimeoutError``. Uses its own connections."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        subject = f"chaos.probe.{uuid.uuid4().hex}"
        arrived = asyncio.Event()

        async def got(_msg: Any) -> None:
            arrived.set()

        async def quiet(_exc: Exception) -> None:
            pass  # a probe connection may see its server go away; that is not news here

        options: dict[str, Any] = {
            "connect_timeout": 2,
            "allow_reconnect": False,
            "error_cb": quiet,
        }
        if self._client_tls is not None:
            options["tls"] = self._client_tls
        sub_nc = await nats.connect(self.urls[dst], **options)
        try:
            pub_nc = await nats.connect(self.urls[src], **options)
            try:
                await sub_nc.subscribe(subject, cb=got)
                await sub_nc.flush()
                async with asyncio.timeout(timeout):
                    for n in itertools.count():
                        await pub_nc.publish(subject, str(n).encode())
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_POLL):
                                await arrived.wait()
                        if arrived.is_set():
                            return loop.time() - started
            finally:
                await pub_nc.close()
        finally:
            await sub_nc.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        cut = sorted(tuple(sorted(pair)) for pair in self._cut_pairs)
        return f"<NatsCluster {self._name} size={self._size} cut={cut}>"
