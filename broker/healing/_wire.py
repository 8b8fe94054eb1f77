"""Healer protocol wire forms: limits, packed prefixes and leaf items, and ``RootView``.

The requests and replies are Cap'n Proto structs of ``schemas/healer.capnp``; this module
holds the compact byte forms they carry and the bounds a replica enforces on them.

Invariants: ``unpack_prefixes(*pack_prefixes(p, bits), bits, depth) == p`` for prefixes of one
level; ``unpack_leaf_items(pack_leaf_items(x, w), len(x), w)`` gives ``x`` with digests cut to
their low ``w`` bytes; every unpack raises ``MalformedMessageError`` on bytes that do not fit
(never an IndexError or a silent truncation).

Pure: bytes in, values out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.errors import InvalidArgumentError, MalformedMessageError
from broker.merkle import HASH_SIZE

__all__ = [
    "LEAVES_PER_CALL",
    "MAX_FETCH_KEYS",
    "MAX_LEAVES_PER_REQUEST",
    "MAX_NODE_VALUES",
    "MAX_PREFIXES",
    "MAX_ROOT_VALUES",
    "PACKED_REPLY_BYTES",
    "PREFIXES_PER_CALL",
    "REPLICA_SERVICE",
    "VERBS",
    "RootView",
    "pack_leaf_items",
    "pack_prefixes",
    "unpack_indices",
    "unpack_leaf_items",
    "unpack_prefixes",
]

REPLICA_SERVICE: Final = "worknode-replica"
PREFIXES_PER_CALL: Final = 256
"""Prefixes per nodes/leaves call in the unpacked form: a reply stays near 256 x 16 children
x ~50 B = 200 KB, well under the NATS max payload; more prefixes go out as parallel calls."""
PACKED_REPLY_BYTES: Final = 256 * 1024
"""Target size of a packed nodes reply; the prefixes per call follow from fan-out and width
(2,048 prefixes at fan-out 16 and 8-byte values). Leaves go ``LEAVES_PER_CALL`` at a time."""
LEAVES_PER_CALL: Final = 1024
"""Leaves per packed leaves call: ~15 items each at 1M keys, ~25 B an item with its key
(~400 KB), ~4 B without."""
MAX_PREFIXES: Final = 65_536
"""Prefixes one nodes/leaves request may name (a bigger request is refused)."""
MAX_LEAVES_PER_REQUEST: Final = LEAVES_PER_CALL
"""Leaves one leaves request may name (the healer sends at most ``LEAVES_PER_CALL``, or
``PREFIXES_PER_CALL`` unpacked): a request's work is bounded by that many leaves' items,
served in slices that yield to the event loop. More is refused (``ResourceExhaustedError``)."""
MAX_NODE_VALUES: Final = 65_536
"""Child values one nodes request may ask for (prefixes x fan-out; the healer's packed calls
ask at most ``PACKED_REPLY_BYTES`` / 4-byte values). More is refused."""
MAX_FETCH_KEYS: Final = 2_000
"""Keys and items one fetch may name (the healer's ``fetch_batch`` is bounded by it): sealing
a fetched entry costs ~17 us, so a fetch costs at most a few tens of milliseconds (one of
20,000 keys cost 0.34 s). A fetch cannot be split across requests (entries and context must
come from one moment), so the bound is on the batch."""
MAX_ROOT_VALUES: Final = 4096
"""Node values a root reply may carry: the top levels are sent only while they fit."""
VERBS: Final = ("root", "nodes", "leaves", "fetch", "apply")
_VERSION: Final = "1.0.0"


def _prefix_bytes(prefix: tuple[int, ...]) -> bytes:
    return bytes(prefix)


def _prefix_tuple(raw: bytes) -> tuple[int, ...]:
    return tuple(raw)


def _index_bytes(level: int, bits: int) -> int:
    return max(1, (level * bits + 7) // 8)


_INDEX_FORMATS: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}


def pack_prefixes(prefixes: Sequence[tuple[int, ...]], bits: int) -> tuple[int, bytes]:
    """``(level, node indices packed)`` for prefixes of one level (the compact request)."""
    if not prefixes:
        return 0, b""
    level = len(prefixes[0])
    size = _index_bytes(level, bits)
    indices = []
    for p in prefixes:
        if len(p) != level:
            raise InvalidArgumentError("packed prefixes are all of one level")
        index = 0
        for digit in p:
            index = (index << bits) | digit
        indices.append(index)
    fmt = _INDEX_FORMATS.get(size)
    if fmt is not None:
        return level, struct.pack(f">{len(indices)}{fmt}", *indices)
    return level, b"".join([i.to_bytes(size, "big") for i in indices])


def unpack_indices(level: int, raw: bytes, bits: int, depth: int) -> list[int]:
    """The node indices of ``pack_prefixes`` (digits read as one number); MalformedMessageError
    if they do not fit the tree."""
    if not 1 <= level <= depth:
        raise MalformedMessageError(f"prefix level {level} is outside the tree")
    size = _index_bytes(level, bits)
    if len(raw) % size:
        raise MalformedMessageError("packed prefixes are not whole")
    fmt = _INDEX_FORMATS.get(size)
    if fmt is not None:
        indices = list(struct.unpack(f">{len(raw) // size}{fmt}", raw))
    else:
        indices = [int.from_bytes(raw[at : at + size], "big") for at in range(0, len(raw), size)]
    limit = 1 << (bits * level)
    if indices and max(indices) >= limit:
        raise MalformedMessageError(f"node index {max(indices)} is outside level {level}")
    return indices


def unpack_prefixes(level: int, raw: bytes, bits: int, depth: int) -> list[tuple[int, ...]]:
    """The prefixes of ``pack_prefixes``; MalformedMessageError if they do not fit the tree."""
    return _indices_to_prefixes(unpack_indices(level, raw, bits, depth), bits, level)


def _indices_to_prefixes(indices: list[int], bits: int, level: int) -> list[tuple[int, ...]]:
    mask = (1 << bits) - 1
    shifts = [bits * (level - 1 - i) for i in range(level)]
    return [tuple([(index >> s) & mask for s in shifts]) for index in indices]


def _width(raw: int) -> int:
    if not 0 <= raw <= HASH_SIZE:
        raise MalformedMessageError(f"hashBytes lies in [0, {HASH_SIZE}], got {raw}")
    return raw or HASH_SIZE


def pack_leaf_items(leaves: Sequence[Sequence[tuple[str, bytes]]], width: int) -> bytes:
    """The packed leaf form: per leaf a 4-byte item count, per item a 2-byte key length, the
    UTF-8 key and the digest's low ``width`` bytes."""
    out: list[bytes] = []
    for items in leaves:
        out.append(len(items).to_bytes(4, "big"))
        for key, digest in items:
            kb = key.encode()
            out.append(len(kb).to_bytes(2, "big"))
            out.append(kb)
            out.append(digest[-width:])
    return b"".join(out)


def unpack_leaf_items(
    raw: bytes, leaves: int, width: int
) -> list[list[tuple[str, bytes]]]:
    """Read ``leaves`` leaves of the packed form (MalformedMessageError if it does not fit)."""
    out: list[list[tuple[str, bytes]]] = []
    at, end = 0, len(raw)
    try:
        for _ in range(leaves):
            if at + 4 > end:
                raise MalformedMessageError("packed leaf items end early")
            count = int.from_bytes(raw[at : at + 4], "big")
            at += 4
            if count * (2 + width) > end - at:
                raise MalformedMessageError("packed leaf items end early")
            items: list[tuple[str, bytes]] = []
            for _ in range(count):
                n = int.from_bytes(raw[at : at + 2], "big")
                key = raw[at + 2 : at + 2 + n].decode()
                at += 2 + n
                digest = raw[at : at + width]
                at += width
                if len(digest) != width:
                    raise MalformedMessageError("packed leaf items end early")
                items.append((key, digest))
            out.append(items)
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("a packed leaf key is not UTF-8") from exc
    if at != end:
        raise MalformedMessageError("packed leaf items carry trailing bytes")
    return out



@dataclass(frozen=True, slots=True)
class RootView:
    """One replica's answer to ``root``."""

    node: str
    root: bytes
    count: int
    versions: dict[str, int]
    scheme: int = 1
    fanout: int = 16
    depth: int = 4
    levels: tuple[bytes, ...] = ()
    width: int = HASH_SIZE

