# worknode wire contract: capability-checked RPC between worknodes (NATS request/reply).
#
# Added in v1 unless a comment says otherwise.

@0xb3dae134a8378f31;

using Crdt = import "crdt.capnp";

enum StatusCode @0x95c514bf5860c742 {
  # Modelled on gRPC status codes; each maps to a specific client-side exception.
  ok @0;
  deadlineExceeded @1;     # the deadline passed before a reply
  unavailable @2;          # no responders, or the server is stopping
  resourceExhausted @3;    # too many requests in flight, or a request too large
  unauthenticated @4;      # missing, malformed or forged capability token
  permissionDenied @5;     # the token does not grant this call
  failedPrecondition @6;   # unsupported wire version
  notFound @7;             # no such worknode or method
  invalidArgument @8;      # arguments failed validation
  internal @9;             # a bug or unexpected failure on the server
}

struct Argument @0xdd62cdba33ad5778 {
  name @0 :Text;
  value @1 :Crdt.Value;
}

struct RpcRequest @0xef16ad52852f6bf5 {
  version @0 :UInt16;      # caller's wire version
  worknode @1 :Text;       # target worknode id
  method @2 :Text;
  arguments @3 :List(Argument);
  token @4 :Data;          # capability token bytes (Biscuit)
  deadlineMs @5 :UInt32;   # time left for this call, relative, in milliseconds
  callDepth @6 :UInt8;     # 0 for a call from outside; +1 at each hop
  traceId @7 :Data;        # 16 bytes; propagated unchanged along a call chain
  delta @8 :Crdt.Document; # optional mutation to apply through the replica
}

struct RpcResponse @0xb53b7278936ae9ac {
  version @0 :UInt16;      # server's wire version
  status @1 :StatusCode;
  message @2 :Text;        # human-readable reason when status != ok
  result @3 :List(Argument);
  state @4 :Crdt.Document; # optional state returned by a read
  traceId @5 :Data;
}
