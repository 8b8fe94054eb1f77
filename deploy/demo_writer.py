"""The docker-compose.yml demo writer (profile ``demo``): traffic for the dashboards.

One long-lived writer node (settings from ``WORKNODE_*`` like ``worknode node``: node id,
seed, roster, NATS, namespace, subject) that first creates the worknodes it writes to, then
once a ``--period``: increments a counter of one of them (a signed, replicated write every
node applies) and reads it back over RPC with its token (``--token-file``, re-read each time
so a re-minted token is picked up), which feeds the RPC dashboard. With
``--caller-key-file`` the calls go over a second connection as that identity (a NATS
``caller``: the writer's own identity may publish deltas but no RPC request). Calls are
signed with that key (the writer's own without one): the token must be minted for it
(``worknode token mint --holder @KEY``), and replies must be signed by a node of the roster.

Creation is idempotent across restarts: the writer's replica is durable (its state volume)
and catches up from its peers, so only worknodes absent from its tree are created. Before the
first period it waits until a node answers an RPC ``get`` of each (it exits with an error
after 60 s without: compose restarts it). Failed writes and calls afterwards (a node
restarting, NATS away) are logged and retried next period.
Usage: ``python demo_writer.py --token-file F [--caller-key-file K] [--worknodes 20]
[--period 1] [--count N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import sys
from pathlib import Path

import nkeys

from broker.codec import Signer
from broker.errors import RpcNotFoundError, UnavailableError, WorknodeError
from broker.rpc import RpcClient
from broker.transport import RequestSigner, Transport, connect, read_nkey_seed
from services.worknode import WorknodeService, WorknodeSettings
from services.worknode._logging import configure_logging

log = logging.getLogger("worknode.demo_writer")

#: How long the writer waits for a node to serve (and hold) each worknode it created.
READY_TIMEOUT_S = 60.0


def _seed(path: Path) -> bytes:
    """The raw Ed25519 seed of a worknode key file or an nkey user seed file."""
    _, raw = nkeys.decode_seed(bytearray(read_nkey_seed(path).encode()))
    return bytes(raw)


def _token(path: Path) -> bytes:
    text = path.read_text().strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def run(token_file: Path, worknodes: int, period: float, count: int | None,
              caller_key_file: Path | None = None) -> int:
    """Create the worknodes, then write and call ``count`` times (forever when None);
    the number of failed writes or calls. RPC calls go as ``caller_key_file``'s identity
    when given (same servers and TLS settings), else over the writer's own connection."""
    settings = WorknodeSettings(metrics_port=None, rpc_keyring_file=None)
    subject = settings.subjects[0]
    names = [f"o{i}" for i in range(worknodes)]
    failures = 0
    async with WorknodeService(settings) as svc, contextlib.AsyncExitStack() as stack:
        replica = svc.replica(subject)
        missing = [n for n in names if n not in replica.tree]
        for name in missing:
            await replica.create(name)
        await replica.flush()
        assert svc.transport is not None
        assert svc.signer is not None
        transport: Transport = svc.transport
        caller = svc.signer
        if caller_key_file is not None:
            caller = Signer(f"{settings.node_id}-rpc", _seed(caller_key_file))
            options = settings.connect_options(f"{settings.node_id}-rpc",
                                               signing_key=caller_key_file)
            transport = await stack.enter_async_context(
                await connect(options, name=f"{settings.node_id}-rpc"))
        client = RpcClient(transport, namespace=settings.namespace,
                           signer=RequestSigner(caller, svc.roster))
        # Until a node serves RPC and holds every worknode, a call would only count as an
        # error on the RPC dashboard (unavailable, not_found): wait for that first.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        for name in names:
            while True:
                try:
                    await client.call(subject, name, "get", token=_token(token_file))
                    break
                except (UnavailableError, RpcNotFoundError):
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        log.info("event=demo_writer_ready subject=%s worknodes=%d created=%d",
                 subject, len(names), len(missing))
        i = 0
        while count is None or i < count:
            name = names[i % len(names)]
            i += 1
            try:
                await replica.increment(name, ("views",), 1)
                await replica.flush()
                await client.call(subject, name, "get", token=_token(token_file))
            except (WorknodeError, OSError, ValueError) as exc:
                failures += 1
                log.warning("event=demo_writer_failed worknode=%s error=%s: %s",
                            name, type(exc).__name__, exc)
            await asyncio.sleep(period)
    return failures


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; exit 1 when any write or call of a ``--count``
    run failed (a run without ``--count`` only stops on a signal)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--token-file", type=Path, required=True)
    p.add_argument("--caller-key-file", type=Path, default=None,
                   help="Seed of the NATS identity that makes the RPC calls (a caller).")
    p.add_argument("--worknodes", type=int, default=20)
    p.add_argument("--period", type=float, default=1.0)
    p.add_argument("--count", type=int, default=None)
    args = p.parse_args(argv)
    if args.caller_key_file is not None and not args.caller_key_file.is_file():
        # connect_options would fall back to no credential at all: say so instead.
        p.error(f"--caller-key-file: no such file {args.caller_key_file}")
    configure_logging()
    try:
        failures = asyncio.run(run(args.token_file, args.worknodes, args.period, args.count,
                                   args.caller_key_file))
    except (WorknodeError, OSError) as exc:  # no node ready in time, NATS away, no token
        log.error("event=demo_writer_stopped error=%s: %s", type(exc).__name__, exc)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
