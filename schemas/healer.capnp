# worknode wire contract: the healer's reconciliation protocol (Merkle trees per subject).
#
# The healer asks each replica for its root, descends only where node hashes differ, compares
# leaf items (key, digest), fetches the differing states, and applies joined states back.
#
# Added in v1 unless a comment says otherwise.

@0xda3659635ce924dc;

using Crdt = import "crdt.capnp";

struct VersionVector @0xced022ad6ac45cb3 {
  replicas @0 :List(Text);
  counters @1 :List(UInt64);   # counters[i] belongs to replicas[i]
}

struct RootRequest @0xeff3f586f68f0ff6 {
  subject @0 :Text;
  # Added in v3:
  levels @1 :UInt8;            # also send every node of the top `levels` levels below the root
  hashBytes @2 :UInt8;         # width of those values: their low bytes (0 = 32, whole)
  levelsUnless @3 :Data;       # ... unless the root equals this one (the last agreed root)
}

struct RootReply @0x97f34ef5c05de2f3 {
  subject @0 :Text;
  root @1 :Data;               # Merkle root hash
  itemCount @2 :UInt64;        # keys in the tree
  versions @3 :VersionVector;
  # Added in v3:
  scheme @4 :UInt8;            # how item values are defined (0: scheme 1, before v3)
  levelCount @5 :UInt8;        # levels sent in `levels` (0: none)
  levels @6 :Data;             # level 1, then 2, ...: every node in index order, packed
  fanout @7 :UInt8;            # tree shape (0: unknown, before v3)
  depth @8 :UInt8;
}

struct NodeHashesRequest @0xa8f437bff06ce08b {
  subject @0 :Text;
  prefixes @1 :List(Data);     # tree positions, one nibble per byte, root = empty
  # Added in v3:
  hashBytes @2 :UInt8;         # > 0: answer packed (`hashes`, `packedItems`), values and leaf
                               # digests cut to their low `hashBytes` bytes
  digestsOnly @3 :Bool;        # leaves: item digests alone, no keys (see LeafItemsReply)
  prefixLevel @4 :UInt8;       # > 0: the prefixes are `packedPrefixes` instead, all of this
  packedPrefixes @5 :Data;     # level: node indices, ceil(level * log2(fanout) / 8) bytes each
}

struct NodeHash @0x8924e4060886104d {
  prefix @0 :Data;
  hash @1 :Data;
  count @2 :UInt64;
}

struct NodeHashesReply @0xcf553e4b45c53663 {
  subject @0 :Text;
  nodes @1 :List(NodeHash);
  # Added in v3:
  hashes @2 :Data;             # packed: the children of each prefix asked, in order
}

struct LeafItem @0xc930f9578c4fd2b1 {
  key @0 :Text;
  digest @1 :Data;
}

struct LeafItemsReply @0xab7bd07159ac8fe3 {
  subject @0 :Text;
  items @1 :List(LeafItem);    # for the requested prefixes (a NodeHashesRequest)
  # Added in v3:
  packedItems @2 :Data;        # packed: per prefix asked, in order, a 4-byte item count, then
                               # per item (sorted by key) a 2-byte key length, the UTF-8 key
                               # and the digest's low `hashBytes` bytes; with `digestsOnly`,
                               # per item only the digest's low `hashBytes` bytes
}

struct FetchStatesRequest @0xde119eff23a72d13 {
  subject @0 :Text;
  keys @1 :List(Text);
  # Added in v3:
  items @2 :Data;              # also the keys of these items: per item a 4-byte leaf index and
                               # the digest's low `hashBytes` bytes (as a digests-only leaf
                               # reply sent them)
  hashBytes @3 :UInt8;
}

struct StatesReply @0xca87b54ec6dea11e {
  subject @0 :Text;
  state @1 :Crdt.Document;     # the requested keys' states, as one OR-map state
}

struct ApplyStatesRequest @0xa63920554ce3f5cb {
  subject @0 :Text;
  state @1 :Crdt.Document;     # joined states to merge into the replica
}

struct ApplyStatesReply @0xc989adebfc5daf8a {
  subject @0 :Text;
  root @1 :Data;               # root after applying
  applied @2 :UInt32;          # keys whose state changed
}

struct HealReport @0xad63c69bd2e8260b {
  # Published, signed, after every heal of a subject.
  subject @0 :Text;
  replicas @1 :List(Text);
  rootsBefore @2 :List(Data);  # rootsBefore[i] belongs to replicas[i]
  rootsAfter @3 :List(Data);
  keysRepaired @4 :UInt64;
  bytesSent @5 :UInt64;
  roundTrips @6 :UInt32;
  durationMs @7 :UInt32;
  converged @8 :Bool;          # every root agreed at the end
}
