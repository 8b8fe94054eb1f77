"""A pre-check of Cap'n Proto packed streams that keeps pycapnp away from its abort path.

pycapnp reads the first segment of a packed message eagerly and the others lazily. When a
multi-segment stream ends before the segments its table declares, the lazy read fails, and
the reader's destructor later tries to skip the missing bytes and throws from a destructor:
the interpreter aborts. ``check_segments`` refuses such streams before pycapnp sees them, by
comparing the declared size with the words the stream really holds.

Invariant: ``check_segments`` accepts every well-formed stream and costs one pass over the
tags only for multi-segment messages (single-segment ones are read eagerly and fail cleanly).
A single-segment stream is recognized from its first tag byte alone: in the packed encoding,
bit ``i`` of a word's tag is set exactly when byte ``i`` of that word is non-zero, and bytes 0-3
of the first word hold the segment count minus one, so a tag with its low four bits clear
*is* a one-segment table (the same answer the full parse gives, at the cost of one byte read:
RPC bodies and most deltas take this path).

Pure: bytes in, an error or nothing out.
"""

from __future__ import annotations

import struct
from typing import Final

from broker.errors import MalformedMessageError

__all__ = ["check_segments", "segment_words", "unpacked_words"]

_POPCOUNT: Final = bytes(bin(i).count("1") for i in range(256))
_MAX_SEGMENTS: Final = 512  # capnp refuses more itself, cleanly


def _unpack_prefix(data: bytes, nwords: int) -> bytes | None:
    """The first ``nwords`` unpacked words of ``data``, or None if the stream is shorter."""
    out = bytearray()
    i, n = 0, len(data)
    while len(out) < 8 * nwords:
        if i >= n:
            return None
        tag = data[i]
        i += 1
        if tag == 0:
            if i >= n:
                return None
            out += bytes(8 * (1 + data[i]))
            i += 1
            continue
        word = bytearray(8)
        for bit in range(8):
            if tag & (1 << bit):
                if i >= n:
                    return None
                word[bit] = data[i]
                i += 1
        out += word
        if tag == 0xFF:
            if i >= n:
                return None
            raw = 8 * data[i]
            i += 1
            if i + raw > n:
                return None
            out += data[i : i + raw]
            i += raw
    return bytes(out[: 8 * nwords])


def unpacked_words(data: bytes) -> int:
    """Words the packed stream ``data`` unpacks to; -1 if it ends in the middle of a word."""
    pop = _POPCOUNT
    i, n, words = 0, len(data), 0
    while i < n:
        tag = data[i]
        i += 1
        if tag == 0:
            if i >= n:
                return -1
            words += 1 + data[i]
            i += 1
        elif tag == 0xFF:
            i += 8
            if i >= n:
                return -1
            words += 1 + data[i]
            i += 1 + 8 * data[i]
        else:
            i += pop[tag]
            words += 1
    return words if i == n else -1


def check_segments(data: bytes) -> None:
    """Raise MalformedMessageError if a multi-segment packed stream is shorter than its table
    says (see module doc); other malformations are left to pycapnp, which raises cleanly."""
    if not data or not data[0] & 0x0F:
        return  # empty, or segment count - 1 == 0: a single segment (see module doc)
    _check_table(data)


def _check_table(data: bytes) -> None:
    """The full check behind ``check_segments``' one-byte fast path."""
    first = _unpack_prefix(data, 1)
    if first is None:
        return  # too short for a segment table: pycapnp fails in the constructor, cleanly
    count = struct.unpack_from("<I", first)[0] + 1
    if count == 1 or count > _MAX_SEGMENTS:
        return
    table_words = count // 2 + 1
    table = _unpack_prefix(data, table_words)
    if table is None:
        raise MalformedMessageError("packed message ends inside its segment table")
    declared = table_words + sum(struct.unpack_from(f"<{count}I", table, 4))
    actual = unpacked_words(data)
    if actual < declared:
        raise MalformedMessageError(
            f"packed message holds {max(actual, 0)} words but its segment table declares "
            f"{declared}"
        )


def segment_words(data: bytes) -> int:
    """Words the segment table of packed ``data`` declares (its segments' sizes summed; 0 if
    the stream is too short for its table): the size of a message without traversing it."""
    if data and not data[0] & 0x0F and data[0] != 0:
        # One segment (see module doc): the tag's high bits say which of the first word's
        # bytes 4-7 (the segment's size) follow it, in order; the others are zero.
        tag, size, i = data[0], 0, 1
        for shift in (0, 8, 16, 24):
            if tag & 0x10:
                if i >= len(data):
                    return 0
                size |= data[i] << shift
                i += 1
            tag >>= 1
        return size
    return _segment_words(data)


def _segment_words(data: bytes) -> int:
    """``segment_words`` by unpacking the table (any segment count)."""
    first = _unpack_prefix(data, 1)
    if first is None:
        return 0
    count = struct.unpack_from("<I", first)[0] + 1
    if count > _MAX_SEGMENTS:
        return 0
    table = _unpack_prefix(data, count // 2 + 1)
    if table is None:
        return 0
    return sum(struct.unpack_from(f"<{count}I", table, 4))
