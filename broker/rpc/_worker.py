"""Token authorization in worker processes, under a hard budget.

biscuit-python 0.4 holds the GIL while it evaluates Datalog and checks its own time limit only
between iterations (a token attenuated offline with a few hundred facts and a 3-way join ran
0.9-8.6 s), so neither a thread nor the library's limit bounds it. ``AuthorizerPool`` runs
``broker.rpc._capability.authorize`` in child processes (``serve``, one JSON line per job
each way); a job not answered within ``budget_ms`` has its worker
killed (and replaced) and is refused with ``TokenLimitError``. The event loop only writes and
reads a line, so concurrent calls keep their latency whatever a token costs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

from broker.errors import (
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcInternalError,
    TokenLimitError,
    UnauthenticatedError,
    UnavailableError,
)
from broker.rpc._capability import AuthorizeJob, authorize

__all__ = ["DEFAULT_AUTHORIZE_BUDGET_MS", "DEFAULT_AUTHORIZE_WORKERS", "AuthorizerPool", "serve"]

DEFAULT_AUTHORIZE_BUDGET_MS: Final = 100
"""Wall time one authorization may take in its worker (a normal token needs well under a
millisecond: the rest is room for a loaded host)."""
DEFAULT_AUTHORIZE_WORKERS: Final = 1
_READY: Final = b"ready\n"
_ERRORS: Final = {
    "permission_denied": PermissionDeniedError,
    "token_limit": TokenLimitError,
    "unauthenticated": UnauthenticatedError,
}
_MAX_LINE: Final = 64 * 1024
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])
"""The directory ``broker`` is imported from: the workers import it from there too."""


def _encode_job(job: AuthorizeJob) -> bytes:
    doc = {
        "token": base64.b64encode(job.token).decode(),
        "keyring": [[kid, key.hex()] for kid, key in job.keyring],
        "namespace": job.namespace,
        "subject": job.subject,
        "path": list(job.path),
        "method": job.method,
        "now": job.now,
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _decode_job(line: bytes) -> AuthorizeJob:
    doc = json.loads(line)
    return AuthorizeJob(
        base64.b64decode(doc["token"]),
        tuple((int(k), bytes.fromhex(v)) for k, v in doc["keyring"]),
        str(doc["namespace"]), str(doc["subject"]), tuple(str(p) for p in doc["path"]),
        str(doc["method"]), float(doc["now"]),
    )


def serve() -> None:  # pragma: no cover - runs in the worker process
    """The worker process's loop: ``ready``, then one answer line per job line."""
    out = sys.stdout.buffer
    out.write(_READY)
    out.flush()
    for line in sys.stdin.buffer:
        try:
            authorize(_decode_job(line))
            answer: dict[str, Any] = {"ok": True}
        except TokenLimitError as exc:
            answer = {"error": "token_limit", "message": str(exc)}
        except PermissionDeniedError as exc:
            answer = {"error": "permission_denied", "message": str(exc)}
        except UnauthenticatedError as exc:
            answer = {"error": "unauthenticated", "message": str(exc)}
        except Exception as exc:  # a bad job line: say so, keep serving
            answer = {"error": "internal", "message": type(exc).__name__}
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


class _Worker:
    __slots__ = ("proc",)

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


class AuthorizerPool:
    """``workers`` authorization processes, each running one job at a time under
    ``budget_ms`` (see module doc). ``start``/``stop`` own the processes."""

    def __init__(
        self,
        *,
        workers: int = DEFAULT_AUTHORIZE_WORKERS,
        budget_ms: float = DEFAULT_AUTHORIZE_BUDGET_MS,
    ) -> None:
        if workers < 1 or not budget_ms > 0:
            raise ValueError("an authorizer pool needs workers >= 1 and budget_ms > 0")
        self.workers = workers
        self.budget_ms = budget_ms
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._stopped = True
        self.killed = 0
        """Workers killed for running over the budget."""

    async def start(self) -> None:
        """Start the workers (they become usable once they report ready). Idempotent."""
        if not self._stopped:
            return
        self._stopped = False
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._start_one())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        root = _PACKAGE_ROOT
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from broker.rpc._worker import serve; serve()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            limit=_MAX_LINE,
        )
        worker = _Worker(proc)
        self._all.add(worker)
        try:
            assert proc.stdout is not None
            ready = await proc.stdout.readline()
        except BaseException:
            await self._retire(worker)
            raise
        if ready != _READY or self._stopped:
            await self._retire(worker)
            return
        self._idle.put_nowait(worker)

    async def _retire(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.kill()

    async def stop(self) -> None:
        """Kill every worker. Idempotent."""
        self._stopped = True
        for task in list(self._starting):
            task.cancel()
        for task in list(self._starting):
            with contextlib.suppress(BaseException):
                await task
        workers, self._all = list(self._all), set()
        while not self._idle.empty():
            self._idle.get_nowait()
        for worker in workers:
            await worker.kill()

    async def authorize(self, job: AuthorizeJob, *, wait_ms: float) -> None:
        """Run ``job`` in a worker: returns if it allows; raises ``PermissionDeniedError``,
        ``UnauthenticatedError``, ``TokenLimitError`` (over the budget: its worker is killed
        and replaced), ``ResourceExhaustedError`` (no worker free within ``wait_ms``) or
        ``UnavailableError`` (stopped)."""
        if self._stopped:
            raise UnavailableError("the authorizer is stopped")
        try:
            async with asyncio.timeout(max(wait_ms, 0.0) / 1000.0):
                worker = await self._idle.get()
        except TimeoutError:
            raise ResourceExhaustedError("no token authorizer free; retry later") from None
        proc = worker.proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(_encode_job(job))
            async with asyncio.timeout(self.budget_ms / 1000.0):
                line = await proc.stdout.readline()
        except TimeoutError:
            self.killed += 1
            await self._retire(worker)
            if not self._stopped:
                self._spawn()
            raise TokenLimitError(
                f"token authorization ran over its budget of {self.budget_ms:g} ms"
            ) from None
        except BaseException:
            await self._retire(worker)
            if not self._stopped:
                self._spawn()
            raise
        if not line:  # the worker died
            await self._retire(worker)
            if not self._stopped:
                self._spawn()
            raise RpcInternalError("token authorizer exited")
        self._idle.put_nowait(worker)
        answer = json.loads(line)
        if answer.get("ok"):
            return
        cls = _ERRORS.get(str(answer.get("error")), RpcInternalError)
        raise cls(str(answer.get("message", "")))

