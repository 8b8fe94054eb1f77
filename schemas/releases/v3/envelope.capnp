# worknode wire contract: what travels on a subject.
#
# A `SignedEnvelope` carries the bytes of an `Envelope` exactly as its writer produced them,
# and the writer's Ed25519 signature over those bytes (with a domain prefix). Readers verify
# the signature with the writer's public key from their trust roster *before* decoding the
# body, so unauthenticated bytes never reach the Cap'n Proto decoder beyond this small struct.
#
# Added in v1 unless a comment says otherwise.

@0xd69155675b8f8fc3;

using Crdt = import "crdt.capnp";

struct SignedEnvelope @0xc0a78eff05c3711e {
  signer @0 :Text;         # node id of the writer; selects the public key
  signature @1 :Data;      # Ed25519 over "worknode-envelope\x00" ++ body bytes (64 bytes)
  body @2 :Data;           # packed Cap'n Proto `Envelope`
}

struct Envelope @0x8bc669ccd882f137 {
  version @0 :UInt16;      # the writer's wire version (1 or 2)
  writer @1 :Text;         # writer node id; equals SignedEnvelope.signer
  subject @2 :Text;        # NATS subject the envelope was published on
  hlc @3 :UInt64;          # writer's hybrid clock when it sealed the envelope
  sequence @4 :UInt64;     # per-writer, per-subject publish sequence, from 1
  union {
    deltaBatch @5 :Crdt.Document;    # joined deltas of one flush window
    state @6 :Crdt.Document;         # full state transfer (catch-up, healing)
    deltaBatchZlib @8 :Data;         # v2: zlib of a packed Document (a delta batch); only
                                     # written when every reader runs v2 or later
    stateZlib @9 :Data;              # v2: zlib of a packed Document (a full state); same rule
  }
  traceId @7 :Data;        # v2: 16-byte trace id of the request that caused this write
}
