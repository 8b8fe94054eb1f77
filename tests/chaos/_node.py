"""One worknode in its own process, driven by a chaos test over its stdin/stdout.

``python -m tests.chaos._node SETTINGS_JSON ROSTER_JSON`` starts a ``WorknodeService`` with
those settings and that roster (``{node: public key hex}``), prints ``{"ready": true}`` and then
answers one JSON request per stdin line with one JSON line on stdout (logs go to stderr):

    {"op": "write", "prefix": P, "n": N}  -> {"keys": N}   N registers P-00000.. = their key,
                                                          acknowledged (durable) on return
    {"op": "size"}                        -> {"size": number of top-level keys}
    {"op": "root"}                        -> {"root": Merkle root hex (tree refreshed first)}
    {"op": "digests"}                     -> {"digests": {key: entry digest hex}}
    {"op": "missing", "keys": [...]}      -> {"missing": keys whose register is not the key}
    {"op": "has", "key": K}               -> {"has": bool}
    {"op": "rejected"}                    -> {"rejected": {reason: count}}
    {"op": "enable", "key": K, "local": B} -> {"enabled": K}  the enable-wins flag K.on, on
                                                          (with local, never published:
                                                          a write lost on the way)
    {"op": "values", "keys": [...]}       -> {"values": {key: value() of the key, as JSON}}
    {"op": "stop"}                        -> {"stopped": true}, then exit

``WORKNODE_CHAOS_MUTATION=version-dependent-digests`` reintroduces issue 13's bug 3 in the
node (Merkle digests of an entry as this node's wire version reads it), for the tests that
show it is caught.

So the replicas of a scenario spread over the machine's CPUs like deployed nodes, instead of
sharing one test process (and its one CPU) with each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import broker.repair
from broker.codec import TrustRoster
from broker.repair import key_digests
from broker.replica import Consistency
from services.worknode import WorknodeService, WorknodeSettings

SUBJECT = "orders"
REASONS = ("unknown_signer", "bad_signature", "malformed", "wrong_subject")


async def _write(svc: WorknodeService, prefix: str, n: int) -> int:
    r = svc.replica(SUBJECT)
    keys = [f"{prefix}-{i:05d}" for i in range(n)]
    for i in range(0, n, 100):
        await r.write_many([
            lambda t, rid, ts, k=k: t.state.assign(rid, (k, "v"), k, ts)
            for k in keys[i : i + 100]
        ])
    await r.flush()
    return n


async def _answer(svc: WorknodeService, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    replica = svc.replica(SUBJECT)
    if op == "write":
        return {"keys": await _write(svc, str(req["prefix"]), int(req["n"]))}
    if op == "size":
        return {"size": len(replica.state)}
    if op == "root":
        assert svc.heal_endpoints is not None
        return {"root": svc.heal_endpoints.trees[SUBJECT].current().root().hex()}
    if op == "digests":
        return {"digests": {k: d.hex() for k, d in key_digests(replica.state).items()}}
    if op == "missing":
        state = replica.state.value()
        return {"missing": [k for k in req["keys"] if state.get(k, {}).get("v") != k]}
    if op == "has":
        return {"has": req["key"] in replica.state}
    if op == "enable":
        key = str(req["key"])
        level = Consistency.LOCAL if req.get("local") else Consistency.EVENTUAL
        await replica.write(lambda t, rid, ts: t.state.enable(rid, (key, "on")), level)
        await replica.flush()
        return {"enabled": key}
    if op == "values":
        value = replica.state.value()
        return {"values": {k: value.get(k) for k in req["keys"]}}
    if op == "rejected":
        counter = svc.metrics.rejected_envelopes
        return {"rejected": {r: counter.labels(SUBJECT, r)._value.get() for r in REASONS}}
    raise ValueError(f"unknown op {op!r}")


async def main(settings: WorknodeSettings, roster: TrustRoster) -> None:
    loop = asyncio.get_running_loop()
    async with WorknodeService(settings, roster=roster) as svc:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # the test went away
            req = json.loads(line)
            if req["op"] == "stop":
                break
            try:
                reply = await _answer(svc, req)
            except Exception as exc:  # the test sees it; the node stays up
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if os.environ.get("WORKNODE_CHAOS_MUTATION") == "version-dependent-digests":
        broker.repair.DIGEST_AS_NEWEST = False
    keys = json.loads(Path(sys.argv[2]).read_text())
    asyncio.run(main(
        WorknodeSettings.model_validate_json(Path(sys.argv[1]).read_text()),
        TrustRoster({n: bytes.fromhex(k) for n, k in keys.items()}),
    ))
