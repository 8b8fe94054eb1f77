"""Healing: replicas' Merkle endpoints, the healer's client, and the pure heal planner.

Pure core: ``_wire`` (packed prefixes and leaf items, bounds, ``RootView``) and ``_planner``
(which replicas to compare, the hub, rounds, when a heal has converged or must escalate;
events in, actions out, like ``broker.merkle.Reconciliation``). Adapters: ``_tree`` (a
replica's Merkle tree kept current in the background), ``_endpoints`` (the replica's NATS
micro endpoints) and ``_client`` (the healer's calls to them). ``services/healer`` drives the
planner with the client.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from broker.healing._client import HealClient, Refusal, Voucher
    from broker.healing._endpoints import HealEndpoints, VoucherRefusedError
    from broker.healing._report import (
        VerifiedReport,
        healer_identities,
        seal_heal_report,
        verify_heal_report,
    )
    from broker.healing._tree import BUILD_CHUNK, REFRESH_CHUNK, ReplicaTree

# The adapters (asyncio, NATS, the replica and its SQLite store) load on first use, so that
# importing the pure planner and wire forms (a simulator does) loads none of them.
_ADAPTERS = {
    "HealClient": "broker.healing._client",
    "HealEndpoints": "broker.healing._endpoints",
    "Refusal": "broker.healing._client",
    "Voucher": "broker.healing._client",
    "VoucherRefusedError": "broker.healing._endpoints",
    "BUILD_CHUNK": "broker.healing._tree",
    "REFRESH_CHUNK": "broker.healing._tree",
    "ReplicaTree": "broker.healing._tree",
    # Heal reports read the envelope codec (Cap'n Proto schemas): loaded on first use too.
    "VerifiedReport": "broker.healing._report",
    "healer_identities": "broker.healing._report",
    "seal_heal_report": "broker.healing._report",
    "verify_heal_report": "broker.healing._report",
}


def __getattr__(name: str) -> Any:
    module = _ADAPTERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)


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
    "Refusal",
    "RepairPair",
    "ReplicaTree",
    "RootView",
    "SchemeMismatch",
    "StopReason",
    "VerifiedReport",
    "Voucher",
    "VoucherRefusedError",
    "healer_identities",
    "pack_leaf_items",
    "pack_prefixes",
    "pass_status",
    "seal_heal_report",
    "subjects_to_heal",
    "unpack_indices",
    "unpack_leaf_items",
    "unpack_prefixes",
    "verify_heal_report",
]
