"""Pure nested delta-CRDTs: dots, causal contexts, hybrid clocks, registers, counters, sets,
maps of any kind nested to ``MAX_NESTING_DEPTH``, and the worknode tree.

No asyncio, no nats, no clock reads: time and identity come in as arguments.
"""

from broker.crdt._atoms import (
    INT64_MAX,
    INT64_MIN,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    Atom,
    Element,
    OpaqueAtom,
    validate_atom,
    validate_element,
    validate_key,
)
from broker.crdt._causal import (
    Batch,
    Causal,
    EWFlag,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    Path,
    PNCounter,
)
from broker.crdt._context import MAX_REPLICA_ID_LENGTH, CausalContext, Dot, validate_replica_id
from broker.crdt._hlc import DEFAULT_MAX_DRIFT_MS, HybridClock, hlc_logical, hlc_physical
from broker.crdt._ops import Add, Assign, Create, Increment, Move, TreeOp, coalesce
from broker.crdt._stores import MAX_KIND, MAX_NESTING_DEPTH, Kind, KindConflict, OpaqueValue
from broker.crdt._tree import MAX_FIELD_DEPTH, MAX_NODE_ID_LENGTH, ROOT_ID, Tree, validate_node_id

__all__ = [
    "DEFAULT_MAX_DRIFT_MS",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_FIELD_DEPTH",
    "MAX_KEY_BYTES",
    "MAX_KIND",
    "MAX_NESTING_DEPTH",
    "MAX_NODE_ID_LENGTH",
    "MAX_REPLICA_ID_LENGTH",
    "MAX_VALUE_BYTES",
    "ROOT_ID",
    "Add",
    "Assign",
    "Atom",
    "Batch",
    "Causal",
    "CausalContext",
    "Create",
    "Dot",
    "EWFlag",
    "Element",
    "HybridClock",
    "Increment",
    "Kind",
    "KindConflict",
    "LWWRegister",
    "MVRegister",
    "Move",
    "ORMap",
    "ORSet",
    "OpaqueAtom",
    "OpaqueValue",
    "PNCounter",
    "Path",
    "Tree",
    "TreeOp",
    "coalesce",
    "hlc_logical",
    "hlc_physical",
    "validate_atom",
    "validate_element",
    "validate_key",
    "validate_node_id",
    "validate_replica_id",
]
