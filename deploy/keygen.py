"""One-shot key setup for docker-compose.yml: a signing seed per identity, the roster of
their public keys, and the cluster secret the replicas and the healer key Merkle trees with.

Idempotent and additive: existing seeds and the secret are kept (restarting the stack keeps
identities), and the ids given are merged into an existing roster.json: every entry already
in it stays (a roster rebuilt from only the ids of one run would make every node refuse the
others' writes). An id whose seed here has a new key gets that key (the seed is the
identity). Usage: ``python keygen.py DIR ID[:ROLE] [ID[:ROLE] ...]`` (ROLE: node, the
default, healer or writer: what the roster trusts the identity as). Every file is written
with mode 0600 except the roster (public keys only). In production, give each host only its
own seed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from broker.codec import RosterEntry
from services.worknode import load_or_create_signer
from services.worknode._keys import merge_roster


def main(argv: list[str]) -> int:
    """Create what is missing under ``argv[1]`` for the ids ``argv[2:]``."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    keys = Path(argv[1])
    keys.mkdir(parents=True, exist_ok=True)
    roles = dict((a.partition(":")[0], a.partition(":")[2] or "node") for a in argv[2:])
    ours = {
        i: RosterEntry(load_or_create_signer(i, keys / f"{i}.key").public_key, role)
        for i, role in roles.items()
    }
    roster, changes = merge_roster(keys / "roster.json", ours, replace=True)
    for line in changes:
        print(f"roster: {line}")
    secret = keys / "cluster.secret"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    print(f"keys for {', '.join(sorted(ours))} in {keys}; roster trusts "
          f"{', '.join(sorted(roster))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
