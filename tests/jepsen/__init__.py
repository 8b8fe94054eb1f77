"""Jepsen-style tests of STRONG consistency on real nats-servers (see README.md here)."""
