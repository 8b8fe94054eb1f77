"""RPC benchmark: worknode RPC (with token verification) beside raw nats-py request/reply.

    python -m bench.rpc_bench [--quick] [--rounds N] [--secure] [--out FILE]

One embedded nats-server and one *server* process that hosts both sides: a worknode service
serving the user method ``echo`` (token verified on every call: signature check cached,
revocation set checked, authorizer decision cached until the token's expiry), and a raw
nats-py responder answering on ``raw.echo`` with a reply of the same size as worknode's. The
client (this process) sends raw requests of the same size as worknode's request bodies
(token included), so both sides move the same bytes.

``--secure`` runs it all over TLS with one nkey user per process and its role's permissions
(``bench/_secure.py``): the server process is a node, the client a caller, raw nats-py and
worknode alike; it writes ``rpc-secure.md``.

Each round runs both sides back to back, in alternating order:

- *latency*: sequential calls, p50 and p99;
- *throughput*: 64 calls in flight, calls/s.

The summary gives, per figure, the median of the per-round ratios worknode / raw and their
spread, because these CPUs change speed by about 2x every few seconds; absolute figures are
noise, the interleaved ratio is what counts. Last, the cost of one token verification,
uncached (signature + authorizer) and cached, measured in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/results/rpc.md")
SECURE_OUT = Path("bench/results/rpc-secure.md")
NS = "bench"
SUBJECT = "items"
WORKNODE = "w1"
RAW_SUBJECT = f"wn.{NS}.rpc.raw.echo"  # an RPC subject: the same permission checks
USERS = {"server": ("node", NS, ()), "client": ("caller", NS, (SUBJECT, "raw"))}
IN_FLIGHT = 64
PAYLOAD = b"x" * 32


def _emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def _root() -> Any:
    from broker.rpc import RootKey

    return RootKey(1, b"\x42" * 32)


def _identity(name: str) -> Any:
    """The fixed signer of benchmark identity ``name`` (its NATS user's key too)."""
    from bench._secure import bench_seed
    from broker.codec import Signer

    return Signer(name, bench_seed(name))


def _token() -> bytes:
    """A token held by the client (its calls are signed with the client's key)."""
    from broker.rpc import Grant, mint

    return mint(_root(), [Grant(NS, SUBJECT, "root", ("echo",))], expires_at=time.time() + 3600,
                holder=_identity("client").public_key)


# ------------------------------------------------------------------------------------------
# the server process: worknode service + raw responder


async def _server(url: str, state: Path, reply_size: int) -> None:
    import nats

    from bench._secure import raw_options, write_seed
    from broker.rpc import CallContext, MethodRegistry
    from services.worknode import WorknodeService, WorknodeSettings

    write_seed(state / "server" / "server.key", "server")  # its key is its NATS user
    keyring = state / "keyring.json"
    keyring.write_text(json.dumps({"1": _root().public_key.hex()}))
    reg = MethodRegistry()

    if os.environ.get("WN_BENCH_ASYNC_HANDLER"):

        @reg.method("echo")
        async def echo_async(ctx: CallContext) -> dict[str, Any]:
            return {"v": ctx.arguments.get("v")}

    else:

        @reg.method("echo")
        def echo(ctx: CallContext) -> dict[str, Any]:  # never waits: runs inline
            return {"v": ctx.arguments.get("v")}

    settings = WorknodeSettings(
        node_id="server", namespace=NS, subjects=[SUBJECT], nats_urls=[url],
        state_dir=state / "server", metrics_port=None, store_sync="normal",
        rpc_keyring_file=keyring, rpc_max_in_flight=4 * IN_FLIGHT,
        # One holder makes every call here: measure the cost per call, not the rate limit.
        rpc_rate_per_s=1e9, rpc_burst=1_000_000_000,
    )
    nc = await nats.connect(url, **raw_options("server"))
    reply = b"y" * reply_size

    async def raw(msg: Any) -> None:
        await msg.respond(reply)

    await nc.subscribe(RAW_SUBJECT, queue="q", cb=raw)  # as micro endpoints do
    async with WorknodeService(settings, rpc_methods=reg) as svc:
        await svc.replica(SUBJECT).create(WORKNODE)
        await nc.flush()
        _emit(ready=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await nc.close()


# ------------------------------------------------------------------------------------------
# the client: rounds of raw and worknode


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def _latency(call: Any, n: int) -> tuple[float, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t0)
    return _pct(lat, 0.5), _pct(lat, 0.99)


async def _throughput(call: Any, n: int) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return n / (time.perf_counter() - t0)


def _cpu(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _client(
    url: str, rounds: int, n_lat: int, n_tput: int, server_pid: int
) -> dict[str, Any]:
    import nats
    import psutil

    from bench._secure import connect_options, raw_options
    from broker.codec import TrustRoster
    from broker.rpc import RpcClient
    from broker.transport import RequestSigner

    token = _token()
    nc = await nats.connect(url, **raw_options("client"))
    transport = connect_options("client", url).transport(name="bench-client")
    await transport.start()
    # Every call signed by the client (the token's holder); every reply checked as signed by
    # the server node and bound to its request.
    server_key = TrustRoster({"server": _identity("server").public_key})
    client = RpcClient(transport, namespace=NS,
                       signer=RequestSigner(_identity("client"), server_key))
    args = {"v": PAYLOAD}

    from broker.rpc import Request, Response, StatusCode, encode_request, encode_response

    req_size = len(encode_request(client.codec, Request(WORKNODE, "echo", args, token, 5000, 0,
                                                        os.urandom(16))))
    resp_size = len(encode_response(client.codec, Response(StatusCode.OK, result=args,
                                                           trace_id=os.urandom(16))))
    raw_payload = b"x" * req_size

    async def raw() -> None:
        await nc.request(RAW_SUBJECT, raw_payload, timeout=5)

    async def wn() -> None:
        await client.call(SUBJECT, WORKNODE, "echo", args, token=token, timeout_ms=5000)

    for _ in range(200):  # warm both paths (and the token caches)
        await raw()
        await wn()
    out: dict[str, list[float]] = {k: [] for k in (
        "raw_p50", "raw_p99", "wn_p50", "wn_p99", "raw_tput", "wn_tput",
        "raw_cpu_client", "wn_cpu_client", "raw_cpu_server", "wn_cpu_server")}
    me, server = psutil.Process(), psutil.Process(server_pid)
    for rnd in range(rounds):
        order = (("raw", raw), ("wn", wn)) if rnd % 2 == 0 else (("wn", wn), ("raw", raw))
        for side, fn in order:
            p50, p99 = await _latency(fn, n_lat)
            out[f"{side}_p50"].append(p50)
            out[f"{side}_p99"].append(p99)
        for side, fn in order:
            c0, s0 = _cpu(me), _cpu(server)
            out[f"{side}_tput"].append(await _throughput(fn, n_tput))
            out[f"{side}_cpu_client"].append((_cpu(me) - c0) / n_tput)
            out[f"{side}_cpu_server"].append((_cpu(server) - s0) / n_tput)
    await transport.stop()
    await nc.close()
    return {"series": out, "req_size": req_size, "resp_size": resp_size}


def _verify_cost(n: int) -> tuple[float, float]:
    """Microseconds per verification: uncached (parse + signatures + authorizer), cached."""
    from broker.rpc import TokenVerifier

    token = _token()
    ring = {1: _root().public_key}
    kw: dict[str, Any] = {"namespace": NS, "subject": SUBJECT, "path": [WORKNODE, "root"],
                          "method": "echo"}
    t0 = time.perf_counter()
    for _ in range(n):
        TokenVerifier(ring).verify(token, now=time.time(), **kw)
    uncached = (time.perf_counter() - t0) / n * 1e6
    v = TokenVerifier(ring)
    revoked = frozenset({"00" * 64})
    v.verify(token, now=time.time(), **kw)
    t0 = time.perf_counter()
    for _ in range(n * 20):
        v.verify(token, now=time.time(), revoked=revoked, **kw)
    cached = (time.perf_counter() - t0) / (n * 20) * 1e6
    return uncached, cached


def _codec_cost(n: int) -> dict[str, float]:
    """Microseconds per call of each body codec step, in-process (bodies as in the bench)."""
    from broker.codec import WireCodec
    from broker.rpc import (
        Request,
        Response,
        StatusCode,
        decode_request,
        decode_response,
        encode_request,
        encode_response,
    )

    codec = WireCodec()
    req = Request(WORKNODE, "echo", {"v": PAYLOAD}, _token(), 5000, 0, os.urandom(16))
    resp = Response(StatusCode.OK, result={"v": PAYLOAD}, trace_id=os.urandom(16))
    req_bytes, resp_bytes = encode_request(codec, req), encode_response(codec, resp)
    steps = {
        "client: encode RpcRequest": lambda: encode_request(codec, req),
        "server: decode RpcRequest": lambda: decode_request(codec, req_bytes),
        "server: encode RpcResponse": lambda: encode_response(codec, resp),
        "client: decode RpcResponse": lambda: decode_response(codec, resp_bytes),
    }
    out = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(5):  # best of 5: the CPUs change speed under us
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            best = min(best, time.perf_counter() - t0)
        out[name] = best / n * 1e6
    return out


def _signature_rows(rounds: int, size: int) -> list[str]:
    """The cost of issue 16's signed, bound request and reply, per call, step by step."""
    from bench._signature_cost import exchange_cost, table

    small = rounds < 5
    return [
        "## What the signatures cost, per call",
        "",
        "Every request is signed by its caller (the token's holder) and every response by the "
        "server, bound to the request (issue 16): two Ed25519 signatures and two verifications "
        f"per call, here in-process on {size}-byte bodies, interleaved rounds. They are part "
        "of the worknode figures above.",
        "",
        "| Step | Median | Min - max |",
        "|---|---:|---:|",
        *table(exchange_cost(size, 20 if small else 300, 3 if small else 7), "call",
               total=True),
        "",
    ]


def run(rounds: int, n_lat: int, n_tput: int, out: Path, argv: list[str],
        secure: bool = False) -> str:
    """One benchmark run (over TLS and nkey users with ``secure``); returns the summary."""
    from bench._secure import environment, run_options

    options, env = run_options(secure, USERS)
    with environment(env):  # this process and the children it starts
        return _run(rounds, n_lat, n_tput, out, argv, options, secure)


def _run(rounds: int, n_lat: int, n_tput: int, out: Path, argv: list[str],
         options: dict[str, Any], secure: bool) -> str:
    from broker.transport import EmbeddedNatsServer

    loop = asyncio.new_event_loop()
    server = EmbeddedNatsServer(Path(tempfile.mkdtemp(prefix="wn-nats-")), **options)
    loop.run_until_complete(server.start())
    state = Path(tempfile.mkdtemp(prefix="wn-rpc-bench-"))
    child = None
    try:
        # The reply size must match worknode's: compute it the way the client will.
        from broker.codec import WireCodec
        from broker.rpc import Response, StatusCode, encode_response

        resp_size = len(encode_response(WireCodec(), Response(
            StatusCode.OK, result={"v": PAYLOAD}, trace_id=os.urandom(16))))
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.rpc_bench", "--role", "server", server.url,
             str(state), str(resp_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited with {child.wait()}")
        res = loop.run_until_complete(_client(server.url, rounds, n_lat, n_tput, child.pid))
    finally:
        if child is not None:
            if child.stdin is not None:
                child.stdin.write("stop\n")
                child.stdin.flush()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
        loop.run_until_complete(server.stop())
        loop.close()
    uncached, cached = _verify_cost(50 if rounds < 5 else 300)
    codec_cost = _codec_cost(200 if rounds < 5 else 2000)
    handler = "a coroutine function" if os.environ.get("WN_BENCH_ASYNC_HANDLER") else (
        "a plain function (answered inline: no task, no timer)")
    s = res["series"]
    lat_ratio = [w / r for w, r in zip(s["wn_p50"], s["raw_p50"], strict=True)]
    p99_ratio = [w / r for w, r in zip(s["wn_p99"], s["raw_p99"], strict=True)]
    tput_ratio = [w / r for w, r in zip(s["wn_tput"], s["raw_tput"], strict=True)]
    med_raw_p50 = statistics.median(s["raw_p50"]) * 1e6

    def us(key: str) -> str:
        xs = [x * 1e6 for x in s[key]]
        return f"{statistics.median(xs):,.0f} | {min(xs):,.0f} - {max(xs):,.0f}"

    def rate(key: str) -> str:
        xs = s[key]
        return f"{statistics.median(xs):,.0f} | {min(xs):,.0f} - {max(xs):,.0f}"

    def ratio(xs: list[float]) -> str:
        return f"**{statistics.median(xs):.2f}x** | {min(xs):.2f}x - {max(xs):.2f}x"

    p50_ok = statistics.median(lat_ratio) <= 1.3
    tput_ok = statistics.median(tput_ratio) >= 0.7
    lines = [
        "# worknode RPC benchmark",
        "",
        "Command: `" + " ".join(["python -m bench.rpc_bench", *argv]) + "`",
        "",
        f"- Python {platform.python_version()} on {platform.platform()}; embedded nats-server; "
        f"{os.cpu_count()} CPUs (shared with other work: absolute figures are noisy)",
        f"- {rounds} rounds, raw and worknode interleaved (order alternated); per round "
        f"{n_lat:,} sequential calls and {n_tput:,} calls at {IN_FLIGHT} in flight per side",
        f"- request {res['req_size']} B (capability token included), reply {res['resp_size']} "
        "B, on both sides; worknode verifies the token on every call",
        f"- the worknode method `echo` is {handler}; `WN_BENCH_ASYNC_HANDLER=1` runs it as "
        "the other kind",
        "- " + ("**auth and TLS on**: TLS client connections, the server process a node and "
                "the client a caller (nkey users with their roles' permissions), raw nats-py "
                "and worknode alike" if secure else
                "open bus (no auth, no TLS); `--secure` for the same run over TLS and nkeys"),
        "",
        "| Figure | Median | Min - max |",
        "|---|---:|---:|",
        f"| raw nats-py request/reply p50 (us) | {us('raw_p50')} |",
        f"| worknode RPC p50 (us) | {us('wn_p50')} |",
        f"| **p50 ratio worknode / raw (per round)** | {ratio(lat_ratio)} |",
        f"| raw p99 (us) | {us('raw_p99')} |",
        f"| worknode RPC p99 (us) | {us('wn_p99')} |",
        f"| p99 ratio worknode / raw | {ratio(p99_ratio)} |",
        f"| raw throughput, {IN_FLIGHT} in flight (calls/s) | {rate('raw_tput')} |",
        f"| worknode throughput, {IN_FLIGHT} in flight (calls/s) | {rate('wn_tput')} |",
        f"| **throughput ratio worknode / raw (per round)** | {ratio(tput_ratio)} |",
        f"| CPU per call at {IN_FLIGHT} in flight, client process: raw (us) | "
        f"{us('raw_cpu_client')} |",
        f"| CPU per call at {IN_FLIGHT} in flight, client process: worknode (us) | "
        f"{us('wn_cpu_client')} |",
        f"| CPU per call at {IN_FLIGHT} in flight, server process: raw (us) | "
        f"{us('raw_cpu_server')} |",
        f"| CPU per call at {IN_FLIGHT} in flight, server process: worknode (us) | "
        f"{us('wn_cpu_server')} |",
        f"| token verification, uncached (us per call) | {uncached:,.0f} | "
        f"{uncached / med_raw_p50 * 100:.0f}% of a raw p50 |",
        f"| token verification, cached (us per call) | {cached:,.1f} | "
        f"{cached / med_raw_p50 * 100:.1f}% of a raw p50 |",
        *(f"| {name} (us, in-process, best of 5) | {us_:,.1f} | |"
          for name, us_ in codec_cost.items()),
        "",
        f"Targets (issue 6): p50 ratio <= 1.3x: {'met' if p50_ok else 'NOT met'}; "
        f"throughput ratio >= 0.7x: {'met' if tput_ok else 'NOT met'}.",
        "",
        "Where the time goes: both sides are CPU-bound in Python (the CPU rows; the 2 CPUs "
        "also run nats-server, so throughput follows the CPU per call of both processes "
        "together). Per call the client encodes an `RpcRequest` and decodes an `RpcResponse` "
        "and the server decodes the request and encodes the reply (the codec rows: pycapnp "
        "costs about 0.2-0.3 us per field, list item or union read or write, and a call "
        "touches about 25; the four steps are about 40k instructions each, most of what "
        "separates worknode from raw), admits the request (in-flight bound, depth, deadline, "
        "token: cached) and counts it for its metrics; raw nats-py does none of this. "
        "Already cut: fields read and written by resolved field object (pycapnp's reader "
        "`__getattr__` costs 4x more), the packed pre-check decided from the first byte for "
        "single-segment bodies, admission and the token check run synchronously on the "
        "receive path and a plain-function handler is answered inline (a coroutine handler "
        "still costs a task and a timer), counter-based trace ids, metrics counted into "
        "plain ints under one lock and turned into series at scrape time (was three "
        "prometheus-client updates, ~26k instructions per call), the frozen Request, "
        "Response, Deadline and Msg records built by their slot setters, ancestry paths "
        "remembered until the tree changes.",
        "",
        "Verification is cached per token: the signature check once, and the authorizer's "
        "allow decision per (token, subject, worknode path, method) only until the earliest "
        "expiry the token states (tokens with any other time check are never cached); the "
        "revocation set is checked on every call. Without the cache every call would pay "
        "the uncached figure above.",
        "",
        *_signature_rows(rounds, res["req_size"]),
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--secure", action="store_true",
                    help="TLS and one nkey user per process (raw nats-py too)")
    ap.add_argument("--role", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = SECURE_OUT if args.secure else DEFAULT_OUT
    if args.role:
        role, *rest = args.role
        if role == "server":
            asyncio.run(_server(rest[0], Path(rest[1]), int(rest[2])))
            return 0
        raise SystemExit(f"unknown role {role}")
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        text = run(2, 50, 200, args.out, argv, secure=args.secure)
    else:
        text = run(args.rounds, 1000, 4000, args.out, argv, secure=args.secure)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
