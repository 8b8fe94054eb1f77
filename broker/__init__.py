"""worknode: replicated state on NATS.

``broker.crdt`` is the pure core; ``broker.errors`` is the error tree.
"""

from broker.errors import WorknodeError

__all__ = ["WorknodeError"]
