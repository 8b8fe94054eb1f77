"""Deterministic simulation of worknode replicas (the FoundationDB / VOPR idea, in Python).

One seed fixes everything: the schedule (writes, crashes, restarts, version changes,
partitions, fault episodes) and every network decision (drop, duplicate, delay). The
simulator drives the pure ``broker.replication.ReplicationMachine`` of each replica directly:
no asyncio, no sockets, no clock reads; every envelope crosses the simulated network as real
Cap'n Proto bytes sealed by the sender's pinned ``WireCodec`` and opened by the receiver's.

Modules: ``world`` (network, durable store, replicas, healer, run), ``model`` (the sequential
model of the acknowledged writes and the checker), ``shrink`` (delta debugging of a failing
schedule), ``__main__`` (CLI and campaign). Invariant: ``run(seed, ...)`` is a pure function
of its arguments (same trace hash on every replay).
"""
