"""Healing: replicas' Merkle endpoints, the healer's client, and the pure heal planner.

Pure core: ``_wire`` (packed prefixes and leaf items, bounds, ``RootView``) and ``_planner``
(which replicas to compare, the hub, rounds, when a heal has converged or must escalate;
events in, actions out, like ``broker.merkle.Reconciliation``). Adapters: ``_tree`` (a
replica's Merkle tree kept current in the background), ``_endpoints`` (the replica's NATS
micro endpoints) and ``_client`` (the healer's calls to them). ``services/healer`` drives the
planner with the client.
"""

from broker.healing._client import HealClient
from broker.healing._endpoints import HealEndpoints
from broker.healing._planner import (
    ROOT_LEVELS,
    AskRoots,
    HealAction,
    HealPlanner,
    HealPolicy,
    HealResult,
    PairResult,
    RepairPair,
    SchemeMismatch,
    StopReason,
    pass_status,
    subjects_to_heal,
)
from broker.healing._tree import BUILD_CHUNK, REFRESH_CHUNK, ReplicaTree
from broker.healing._wire import (
    LEAVES_PER_CALL,
    MAX_PREFIXES,
    MAX_ROOT_VALUES,
    PACKED_REPLY_BYTES,
    PREFIXES_PER_CALL,
    REPLICA_SERVICE,
    VERBS,
    RootView,
    pack_leaf_items,
    pack_prefixes,
    unpack_indices,
    unpack_leaf_items,
    unpack_prefixes,
)

__all__ = [
    "BUILD_CHUNK",
    "LEAVES_PER_CALL",
    "MAX_PREFIXES",
    "MAX_ROOT_VALUES",
    "PACKED_REPLY_BYTES",
    "PREFIXES_PER_CALL",
    "REFRESH_CHUNK",
    "REPLICA_SERVICE",
    "ROOT_LEVELS",
    "VERBS",
    "AskRoots",
    "HealAction",
    "HealClient",
    "HealEndpoints",
    "HealPlanner",
    "HealPolicy",
    "HealResult",
    "PairResult",
    "RepairPair",
    "ReplicaTree",
    "RootView",
    "SchemeMismatch",
    "StopReason",
    "pack_leaf_items",
    "pack_prefixes",
    "pass_status",
    "subjects_to_heal",
    "unpack_indices",
    "unpack_leaf_items",
    "unpack_prefixes",
]
