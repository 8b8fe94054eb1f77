"""Cap'n Proto packing in plain Python, so a fuzzer can corrupt a message word by word.

``unpack`` turns a packed stream into its words (segment table first); ``pack`` packs words
again (a valid packed stream, not necessarily the one capnp would write: runs of non-zero
words are never merged, which every reader accepts).
"""

from __future__ import annotations

from broker.codec._packed import _unpack_prefix, unpacked_words


def unpack(data: bytes) -> bytes | None:
    """The unpacked bytes of ``data`` (a whole number of words), or None if it is cut."""
    n = unpacked_words(data)
    if n < 0:
        return None
    return _unpack_prefix(data, n)


def pack(raw: bytes) -> bytes:
    """``raw`` (a multiple of 8 bytes) in the packed encoding."""
    if len(raw) % 8:
        raise ValueError("packing needs whole words")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        word = raw[i : i + 8]
        i += 8
        tag = 0
        for bit in range(8):
            if word[bit]:
                tag |= 1 << bit
        out.append(tag)
        if tag == 0:
            run = 0
            while run < 255 and i < n and not any(raw[i : i + 8]):
                run += 1
                i += 8
            out.append(run)
        else:
            out += bytes(b for b in word if b)
            if tag == 0xFF:
                out.append(0)  # no raw words follow
    return bytes(out)
