"""The ``worknode`` command line.

``worknode up`` is the main job: an embedded nats-server, three worknode services replicating
one subject, a writer, and a table proving every replica holds the same digest. ``worknode
demo`` runs the CRDT core alone over a simulated lossy network (no NATS). ``node``, ``tail``,
the write commands and ``schema check`` are documented in the README.
"""

from __future__ import annotations

import random
import time

import click

from broker.crdt import ROOT_ID, HybridClock, ORMap, Tree
from broker.errors import TreeError
from services._cli_errors import WorknodeGroup
from services.schemacheck import schema
from services.worknode._cli import register
from services.worknode._heal_cli import register_heal
from services.worknode._keys import register_keys
from services.worknode._kinds_cli import register_kinds
from services.worknode._logging import configure_logging
from services.worknode._rpc_cli import register_rpc
from services.worknode._tls_cli import register_tls


@click.group(cls=WorknodeGroup)
@click.version_option(package_name="worknode")
@click.pass_context
def main(ctx: click.Context) -> None:
    """worknode: replicated state on NATS.

    Logs go to stderr, one line per event, key=value (WORKNODE_LOG_FORMAT=json: one JSON
    object per line), at the level WORKNODE_LOG_LEVEL names: by default INFO for the
    services (`node`, `healer`: NATS disconnects and reconnects, rejected envelopes,
    catch-ups, heals, rate-limited) and WARNING for the other commands."""
    configure_logging("INFO" if ctx.invoked_subcommand in _SERVICES else "WARNING")


_SERVICES = ("node", "healer")


main.add_command(schema)
register(main)
register_rpc(main)
register_keys(main)
register_tls(main)
register_heal(main)
register_kinds(main)


class _SimReplica:
    def __init__(self, rid: str, seed_state: ORMap) -> None:
        self.rid = rid
        self.tree = Tree(seed_state.copy())
        self.clock = HybridClock()
        self.inbox: list[tuple[float, ORMap]] = []

    def ts(self) -> int:
        return self.clock.now(time.time_ns() // 1_000_000)


@main.command()
@click.option("--writes", default=3_000, show_default=True, type=click.IntRange(min=1),
              help="Writes per replica.")
@click.option("--loss", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of deltas dropped (0..1).")
@click.option("--seed", default=None, type=int, help="Seed for a reproducible run.")
def demo(writes: int, loss: float, seed: int | None) -> None:
    """Three replicas write concurrently over a lossy network and converge."""
    rnd = random.Random(seed)
    base = Tree()
    for i in range(4):
        base.merge(base.create("setup", f"team{i}", ROOT_ID, i + 1))
    reps = [_SimReplica(f"r{i}", base.state) for i in range(1, 4)]
    sent = dropped = duplicated = 0
    started = time.perf_counter()
    for step in range(writes * len(reps)):
        rep = reps[step % len(reps)]
        t = rep.tree
        node = f"team{rnd.randrange(4)}"
        choice = rnd.random()
        try:
            if choice < 0.4:
                d = t.assign(rep.rid, node, ("status",), rnd.choice(["todo", "doing", "done"]),
                             rep.ts())
            elif choice < 0.7:
                d = t.increment(rep.rid, node, ("stats", "events"), 1)
            elif choice < 0.9:
                d = t.add(rep.rid, node, ("tags",), rnd.choice(["red", "green", "blue"]))
            else:
                d = t.move(rep.rid, node, rnd.choice([ROOT_ID, *sorted(t.nodes() - {node})]),
                           rep.ts())
        except TreeError:
            continue  # a move refused locally because it would form a cycle
        t.merge(d)
        for other in reps:
            if other is rep:
                continue
            sent += 1
            if rnd.random() < loss:
                dropped += 1
                continue
            copies = 2 if rnd.random() < 0.05 else 1
            duplicated += copies - 1
            for _ in range(copies):
                other.inbox.append((step + rnd.expovariate(1 / 20), d))
        for other in reps:  # deliver what is due, in arrival order (reordered)
            other.inbox.sort(key=lambda x: x[0])
            while other.inbox and other.inbox[0][0] <= step:
                other.tree.merge(other.inbox.pop(0)[1])
        if step and step % (writes // 2 or 1) == 0:
            click.echo(f"  {step:>7} writes  digests {_short(reps)}")
    for rep in reps:
        for _, d in rep.inbox:
            rep.tree.merge(d)
        rep.inbox.clear()
    click.echo(f"after delivery: digests {_short(reps)}  ({dropped} of {sent} deltas dropped, "
               f"{duplicated} duplicated)")
    for a in reps:  # anti-entropy: full-state exchange repairs the drops
        for b in reps:
            if a is not b:
                b.tree.merge(a.tree.state)
    elapsed = time.perf_counter() - started
    click.echo(f"after repair:   digests {_short(reps)}")
    for depth, node in reps[0].tree.walk():
        click.echo(f"  {'  ' * depth}{node}: {reps[0].tree.fields(node)}")
    converged = len({r.tree.state.digest() for r in reps}) == 1
    click.echo(f"converged: {converged} in {elapsed:.2f}s")
    if not converged:
        raise SystemExit(1)


def _short(reps: list[_SimReplica]) -> str:
    return " ".join(r.tree.state.digest().hex()[:8] for r in reps)


if __name__ == "__main__":
    main()
