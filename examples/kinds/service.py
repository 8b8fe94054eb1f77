"""A microservice on a typed kind: run one on version 1 and one on version 2, side by side,
writing the same worknodes; each reads the other's writes in its own shape.

    python examples/kinds/service.py nats://127.0.0.1:4222 --version 1 --node-id svc-v1 \
        --state-dir a --roster roster.json
    python examples/kinds/service.py nats://127.0.0.1:4222 --version 2 --node-id svc-v2 \
        --state-dir b --roster roster.json

(``worknode keys roster roster.json svc-v1=@a/svc-v1.key svc-v2=@b/svc-v2.key`` makes the
roster, once each service has made its key.)

Each service replicates the ``people`` subject (and the ``kinds`` registry subject), makes
sure its kind version is registered (the compatibility gate runs first), writes a few
update a round to worknode ``ada`` through its version, and prints ``ada`` as its version
reads it (the other service's writes included, once replicated). The version 2 service also
runs the ``split-name`` migration on its replica each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from person_v1 import PersonV1
from person_v2 import SPLIT_NAME, PersonV2

from broker.kinds import KindSchema, Registry
from services.worknode import WorknodeService, WorknodeSettings

SUBJECT = "people"
REGISTRY = "kinds"


async def main() -> None:
    """Register, write, read (see the module doc)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("nats_url")
    ap.add_argument("--version", type=int, choices=(1, 2), required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--state-dir", default=".worknode/examples")
    ap.add_argument("--roster", type=Path, default=None,
                    help="JSON roster trusting both services (worknode keys roster).")
    ap.add_argument("--rounds", type=int, default=5, help="Writes to make, one a round.")
    ap.add_argument("--interval", type=float, default=1.0, help="Seconds between rounds.")
    args = ap.parse_args()
    model = PersonV1 if args.version == 1 else PersonV2
    settings = WorknodeSettings(node_id=args.node_id, subjects=[SUBJECT, REGISTRY],
                                nats_urls=[args.nats_url], state_dir=Path(args.state_dir),
                                metrics_port=None, roster_file=args.roster,
                                nats_insecure=True)  # a local demo bus: open, on purpose
    async with WorknodeService(settings) as svc:
        people, kinds = svc.replica(SUBJECT), svc.replica(REGISTRY)
        for m in (PersonV1, PersonV2)[: args.version]:  # the gate runs on every register
            ops = Registry.from_tree(kinds.tree).register_ops(KindSchema.of_model(m),
                                                              activate=False)
            if ops:
                await kinds.write_many(ops)
        registry = Registry.from_tree(kinds.tree)
        for line in registry.skipped:  # refused entries (junk, or past the gate): say so
            print(f"registry entry refused: {line}", file=sys.stderr, flush=True)
        view = registry.view_for(model)
        if "ada" not in people.tree:
            await people.write_many(view.create_ops("ada"))
        for i in range(args.rounds):
            if args.version == 1:
                await people.write_many(view.ops("ada", name="Ada Lovelace", total=1,
                                                 tags={f"v1-{i}"}))
            else:
                # The migration joins locally (durable, not published): every replica runs it.
                await people.apply_repair(SPLIT_NAME.delta(people.tree))
                await people.write_many(view.ops("ada", amount=1, tags={f"v2-{i}"}))
            await people.flush()
            await asyncio.sleep(args.interval)
            ada = view.read(people.tree, "ada").model_dump(mode="json")
            print(f"{view.info.ref} round {i}: {json.dumps(ada, sort_keys=True)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
