# worknode wire contract: CRDT content (values, dots, causal contexts, nested stores).
#
# Every replicated state and every delta is a `Document`: a table of replica ids, a causal
# context, and one root `Entry` holding the store. A store is self-describing: its `kind` says
# which CRDT it is, and its content is one of three shapes:
#
#   * `items`    a dot function: (dot -> payload) items, sorted by dot. Registers and counters,
#                and every kind added later, use this shape, so a reader that does not know a
#                kind can still join it by the dot rule and pass its payloads on unchanged;
#   * `elements` an add-wins set: element -> the dots that support it;
#   * `entries`  an OR-map: (key, kind) -> store, recursive up to MAX_NESTING_DEPTH = 8 levels.
#
# Evolution rules (checked by `worknode schema check`): never renumber, never retype, never
# move a field into or out of a union; new CRDT kinds are new `Payload` union members with a
# new `kind` number; `Item` and `Dot` are frozen (old readers copy payloads by pointer, which
# keeps fields they do not know).
#
# Added in v1 unless a comment says otherwise.

@0x910d7bb9102df3e4;

struct Value @0xb7475cf08e0785ca {
  # A scalar a register holds or a set contains.
  union {
    null @0 :Void;
    bool @1 :Bool;
    int @2 :Int64;
    float @3 :Float64;     # finite only
    text @4 :Text;         # UTF-8, at most 256 KiB
    data @5 :Data;         # at most 256 KiB
  }
}

struct Dot @0x9683ee0cc86303c4 {
  # One write: the `counter`-th event of replica `replica`. Frozen.
  replica @0 :UInt32;      # index into Document.replicas
  counter @1 :UInt64;      # >= 1
}

struct Context @0xc2b78efa0406729f {
  # What a state or delta has seen: every dot (r, n) with n <= versions[r], plus `cloud`.
  versions @0 :List(Dot);  # per replica, the highest counter seen contiguously from 1
  cloud @1 :List(Dot);     # dots seen out of order, above the version vector; sorted
}

struct Payload @0xae1158c0a4dd688d {
  # What one dot of a dot-function store carries. The union member is the kind's payload.
  union {
    lww :group {
      # Last-writer-wins register write (kind 1).
      hlc @0 :UInt64;      # hybrid logical clock: milliseconds << 16 | logical counter
      value @1 :Value;
    }
    mv @2 :Value;          # multi-value register write (kind 2)
    counter :group {
      # PN-counter: the writer's cumulative contribution (kind 3).
      increments @3 :UInt64;
      decrements @4 :UInt64;
    }
    flag @5 :Void;         # v2: enable-wins flag, one enabling write (kind 6)
  }
}

struct Item @0xb9cf401c11916738 {
  # One (dot -> payload) pair of a dot-function store. Frozen: payloads travel by pointer
  # so a reader that does not know a payload member keeps it whole.
  replica @0 :UInt32;      # index into Document.replicas
  counter @1 :UInt64;
  payload @2 :Payload;
}

struct SetElement @0xc8cc41a9c1db0c1c {
  # One element of an add-wins set and the dots that support it. In a delta, an element
  # with no dots says "this element was removed as far as the delta's context saw".
  value @0 :Value;         # text, int or data only
  dots @1 :List(Dot);      # sorted
}

struct Entry @0xdf4f8360903a2f38 {
  # One store: a document's root, or the (key, kind) child of a map. A map key holding
  # several kinds (created concurrently with different kinds) appears once per kind.
  key @0 :Text;            # map key (<= 256 UTF-8 bytes); empty for a document's root
  kind @1 :UInt16;         # 1 LWW, 2 MV, 3 COUNTER, 4 SET, 5 MAP; 0 with `absent`;
                           # v2: 6 FLAG
  whole @2 :Bool;          # delta marker: join this subtree in full (a removed key, a
                           # cleared set); never set in full states
  union {
    items @3 :List(Item);          # kinds 1, 2, 3, 6 (v2) and later dot-function kinds
    elements @4 :List(SetElement); # kind 4; sorted by canonical element bytes
    entries @5 :List(Entry);       # kind 5; sorted by (key, kind)
    absent @6 :Void;               # with `whole`: the subtree is gone
  }
}

struct Document @0xa59a13c7b0678d26 {
  # A full state or a delta (batch) of one CRDT.
  replicas @0 :List(Text); # replica ids referenced by index from dots and items
  context @1 :Context;
  root @2 :Entry;
  delta @3 :Bool;          # true: a delta (may carry markers); false: a full state
}
