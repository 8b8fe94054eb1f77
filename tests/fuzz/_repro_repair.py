"""Reproduction of issue 14's abort: single-pointer corruptions of a validly signed repair.

Every pointer word of a repair envelope's body is corrupted, one at a time, in the ways an
out-of-bounds pointer arises (offset far out or negative, list count or struct size too
large, a far pointer to a missing segment); each body is re-signed by the healer's roster
key and opened as the healer's ``apply`` endpoint opens it (``keep_packed=True``). Run as
``python -m tests.fuzz._repro_repair``: prints ``at I`` before case I and ``done {json}``
at the end, so a test running it in a subprocess sees an abort, and where.
"""

from __future__ import annotations

import json
import struct
import sys

from broker.codec import CURRENT_VERSION, WireCodec
from broker.crdt import ORMap
from broker.errors import CodecError
from broker.transport import merkle_subject
from tests.fuzz._targets import NODE, NS, PEER_SIGNER, ROSTER, SUBJECT, T0, _ops, _resign
from tests.fuzz._words import pack, unpack

SUBJECT_APPLY = merkle_subject(NS, SUBJECT, NODE, "apply")


def _bad_pointers(word: int) -> list[int]:
    """Out-of-bounds variants of pointer ``word`` (struct or list pointer)."""
    lo, hi = word & 0xFFFFFFFF, word >> 32
    kind = lo & 3
    out = [
        (hi << 32) | kind | (((1 << 29) - 1) << 2),  # offset far past the segment
        (hi << 32) | kind | ((-(1 << 29) & 0x3FFFFFFF) << 2),  # far before it
        (((hi & 7) | (((1 << 29) - 1) << 3)) << 32) | lo if kind == 1  # a huge list
        else ((0xFFFF | (0xFFFF << 16)) << 32) | lo,  # a huge struct
        (0xFFFF << 32) | 2 | (12345 << 3),  # a far pointer into a missing segment
    ]
    return out


def corruptions(codec: WireCodec) -> list[bytes]:
    """Every single-pointer corruption of a signed repair, re-signed (see module doc)."""
    m = ORMap(_ops(ORMap(), "w9", 6, T0).store, is_delta=False)
    repair = _ops(m, "w2", 5, T0 + 50)
    sealed = codec.seal(PEER_SIGNER, subject=SUBJECT_APPLY, hlc=0, sequence=0,
                        document=repair)
    body = bytes(codec.schema.envelope.SignedEnvelope.from_bytes_packed(sealed).body)
    if codec.schema.envelope.Envelope.from_bytes_packed(body).which() != "deltaBatch":
        raise AssertionError("the repair must travel uncompressed (its body holds the document)")
    raw = unpack(body)
    assert raw is not None
    out = []
    for i in range(1, len(raw) // 8):  # word 0 is the segment table
        (w,) = struct.unpack_from("<Q", raw, 8 * i)
        if not w or w & 3 not in (0, 1):  # only struct and list pointers (and data words
            continue  # that look like them: corrupting those is harmless either way)
        for bad in _bad_pointers(w):
            b = bytearray(raw)
            struct.pack_into("<Q", b, 8 * i, bad)
            out.append(_resign(codec, pack(bytes(b))))
    return out


def main() -> None:
    """Open every corruption; report how many were refused (see module doc)."""
    codec = WireCodec(CURRENT_VERSION, compress=False)
    refused, opened = 0, 0
    cases = corruptions(codec)
    for i, data in enumerate(cases):
        sys.stdout.write(f"at {i}\n")
        sys.stdout.flush()
        try:
            codec.open(data, ROSTER, subject=SUBJECT_APPLY, keep_packed=True)
        except CodecError:
            refused += 1
        else:
            opened += 1
    sys.stdout.write("done " + json.dumps({"cases": len(cases), "refused": refused,
                                            "opened": opened}) + "\n")


if __name__ == "__main__":
    main()
