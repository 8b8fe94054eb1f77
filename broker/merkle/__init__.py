"""Pure core of healing: Merkle trees over ``(key, digest)`` and the reconciliation state
machine that finds which keys differ between two replicas.

A root depends only on the set of ``(key, digest)`` items and the cluster secret. No asyncio,
no nats, no clock reads.
"""

from broker.merkle._reconcile import (
    Diff,
    LeafRequest,
    NodeRequest,
    Reconciliation,
    Request,
    RootInfo,
    Side,
    diff,
    digits,
    node_answer,
)
from broker.merkle._tree import (
    DEFAULT_DEPTH,
    DEFAULT_FANOUT,
    DIGEST_SIZE,
    HASH_SIZE,
    MAX_LEAF_BITS,
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    TREE_SCHEME,
    MerkleTree,
    Prefix,
    validate_shape,
)

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_FANOUT",
    "DIGEST_SIZE",
    "HASH_SIZE",
    "MAX_LEAF_BITS",
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "TREE_SCHEME",
    "Diff",
    "LeafRequest",
    "MerkleTree",
    "NodeRequest",
    "Prefix",
    "Reconciliation",
    "Request",
    "RootInfo",
    "Side",
    "diff",
    "digits",
    "node_answer",
    "validate_shape",
]
