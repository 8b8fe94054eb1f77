"""Integration tests: real processes, real files, a real nats-server."""
