"""The wire codec: signed envelopes and CRDT documents as packed Cap'n Proto, with limits.

Invariants:

- every decode failure is a ``CodecError`` subclass; pycapnp's exceptions (``KjException``,
  ``ValueError``, ``UnicodeDecodeError`` for bad UTF-8 read lazily) never escape, and no input
  reaches a path that aborts the interpreter (only shipped schema files are loaded in-process);
- limits come from the NATS max payload: a message longer than it is refused before parsing;
  the Cap'n Proto traversal limit is ``max_payload`` words (8x the bytes, room for packing)
  and bounds memory as well as time; the nesting limit and ``MAX_NESTING_DEPTH`` bound depth;
- pycapnp aborts the interpreter on a multi-segment packed stream shorter than its segment
  table (``_packed``), and when ``as_builder()``/``total_size`` meet an out-of-bounds
  pointer: every packed input passes ``check_segments`` first; a received message is
  copied only by field assignment (``_document``, ``_checked_copy``, the fast path's holder
  in ``fast_decode``), which raises instead, and ``total_size`` and ``as_builder()`` run only
  on builders this process wrote or on such checked copies;
- the fast codec (``_fast``, ``_fast_write``; ``fast=True``) reads and writes exactly what
  pycapnp does: whatever its reader refuses is decoded by pycapnp (whose answer and error
  are authoritative), and its writer's words are pycapnp's (tests/unit/test_fast_codec.py);
- a signature is verified before the body is decoded, and the body's writer must be the
  signer;
- a reader reads every wire version from ``OLDEST_VERSION`` up: newer messages with what it
  knows (unknown kinds kept opaque, see ``_document``), older ones with schema defaults.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import capnp

from broker.codec import _layouts
from broker.codec._document import FIRST_SEGMENT_WORDS, decode_document, encode_document
from broker.codec._fast import read_holder
from broker.codec._fast_write import FAST_LIMIT, write_document
from broker.codec._packed import check_segments, segment_words
from broker.codec._schema import CURRENT_VERSION, OLDEST_VERSION, WireSchema, load_schema
from broker.codec._signing import Signer, TrustRoster
from broker.crdt import INT64_MAX, MAX_NESTING_DEPTH, Causal
from broker.errors import (
    BadSignatureError,
    CodecError,
    InvalidArgumentError,
    MalformedMessageError,
    MessageTooDeepError,
    MessageTooLargeError,
    UnsupportedContentError,
    UnsupportedVersionError,
    WorknodeError,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "NESTING_LIMIT",
    "Envelope",
    "WireCodec",
    "decoding",
]

DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
"""NATS's default max_payload; pass the server's actual value (from its INFO) when known."""

NESTING_LIMIT: Final = 2 * MAX_NESTING_DEPTH + 16
"""Cap'n Proto pointer nesting allowed: room for MAX_NESTING_DEPTH maps and their leaves."""

COMPRESS_MIN_BYTES: Final = 512
_TABLE: Final = struct.Struct("<II")  # an unpacked message's table: segments - 1, words
_FLAT_TABLE: Final = functools.partial(_TABLE.pack, 0)
_MAX_STORED_WORDS: Final = 64 * 1024 * 1024  # 512 MiB: far above any store's record limit
"""Batches smaller than this are sent uncompressed even when compression is allowed."""

_MAX_HLC: Final = (1 << 63) - 1
_ENVELOPE_WORDS: Final = 512
"""Room for an envelope's own fields (writer, subject, trace id) next to its document."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope."""

    version: int
    """The writer's wire version."""
    writer: str
    subject: str
    hlc: int
    sequence: int
    document: Causal
    """A delta batch, or a full state when ``is_state``."""
    is_state: bool = False
    trace_id: bytes = b""
    """16 bytes when the writer set one (wire v2+); empty otherwise."""
    verified: bool = True
    """False only when opened without a roster (``open(data, None)``: inspection tools)."""
    packed_document: bytes = b""
    """``document`` as packed Cap'n Proto bytes (what ``encode_document`` gives), only when
    opened with ``keep_packed=True``: a receiver that logs the document stores these bytes
    instead of encoding the decoded document again."""


@contextlib.contextmanager
def decoding(what: str) -> Iterator[None]:
    """Map every failure while reading wire bytes to a ``CodecError`` subclass (use it around
    every field access of a reader over untrusted bytes)."""
    try:
        yield
    except CodecError:
        raise
    except capnp.KjException as exc:
        text = str(exc)
        if "traversalLimit" in text or "too large" in text:
            raise MessageTooLargeError(f"{what}: over the traversal limit") from exc
        if "nestingLimit" in text or "deeply-nested" in text:
            raise MessageTooDeepError(f"{what}: over the nesting limit") from exc
        raise MalformedMessageError(f"{what}: not valid Cap'n Proto: {_first_line(text)}") from exc
    except WorknodeError as exc:  # validation of content (keys, values, ids)
        raise MalformedMessageError(f"{what}: {exc}") from exc
    except (ValueError, TypeError, UnicodeError, OverflowError, IndexError) as exc:
        raise MalformedMessageError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _first_line(text: str) -> str:
    line = text.split("\n", 1)[0]
    # KjException text starts with "file.c++:123: failed: "; keep the reason.
    return line.split("failed: ", 1)[-1][:200]


class WireCodec:
    """Encode and decode worknode messages as one wire version.

    ``version`` selects the schema files (``schemas/releases/v<version>`` for old releases) and
    is written into every envelope. ``peer_version`` is the oldest wire version among the
    nodes that read this node's messages; features older readers cannot keep (compressed
    batches, wire v2) are used only when ``peer_version`` allows them. During a rolling
    upgrade leave it at the old version; raise it when every node runs the new release.
    ``fast``: decode documents with the fast pure-Python reader and write sealed documents with
    the fast writer (current wire version only), pycapnp as the fallback; False: pycapnp only
    (the oracle of the differential tests and the benchmark's baseline).
    """

    __slots__ = ("compress", "fast", "max_payload", "peer_version", "schema", "version")

    def __init__(
        self,
        version: int = CURRENT_VERSION,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        peer_version: int = OLDEST_VERSION,
        compress: bool = True,
        fast: bool = True,
    ) -> None:
        if max_payload < 1024:
            raise InvalidArgumentError(f"max_payload must be >= 1024 bytes, got {max_payload}")
        if not OLDEST_VERSION <= peer_version <= version:
            raise InvalidArgumentError(
                f"peer_version must be in [{OLDEST_VERSION}, {version}], got {peer_version}"
            )
        self.schema: WireSchema = load_schema(version)
        self.version = version
        self.max_payload = max_payload
        self.peer_version = peer_version
        self.compress = compress
        # The fast reader (``_fast``) knows the layouts of the current version's schemas.
        self.fast = fast and version == _layouts.WIRE_VERSION

    @property
    def traversal_limit_words(self) -> int:
        """Cap'n Proto traversal limit: ``max_payload`` words (8 bytes each)."""
        return self.max_payload

    # -- documents -----------------------------------------------------------------------

    def encode_document(self, state: Causal) -> bytes:
        """Packed Cap'n Proto bytes of a state or delta."""
        return encode_document(self.schema, state).to_bytes_packed()  # type: ignore[no-any-return]

    def encode_record(self, state: Causal) -> bytes:
        """``state`` as a store record: where the fast writer applies, its one segment (of
        any size) unpacked, in Cap'n Proto's standard framing (a one-segment table, then the
        words; its first byte is 0, which no packed document starts with), else
        ``encode_document``'s packed bytes.
        Both are read by ``decode_record`` and taken by ``seal(packed=...)``; a record never
        goes on the wire as it is (``seal`` copies its content, or packs it with pycapnp)."""
        segment = self._fast_segment(state, limit=None)
        if segment is None:
            return self.encode_document(state)
        return _FLAT_TABLE(len(segment) // 8) + segment

    def decode_record(
        self,
        data: bytes,
        expect: type[Causal] | None = None,
        *,
        bad_keys: list[tuple[str, str]] | None = None,
    ) -> Causal:
        """A stored record or snapshot (``encode_record``, ``encode_document``); as
        ``decode_document``, but not bounded by ``max_payload``: that is the wire's limit,
        and a store's state outgrows it (the store bounded the record when it was written,
        ``max_record_bytes``). Traversal is bounded by the record's own declared size."""
        with decoding("record"):
            if data[:1] == b"\x00":
                doc = self._flat(data)
                words = len(data) // 8 - 1
            else:
                check_segments(data)
                words = segment_words(data)
                doc = self.schema.crdt.Document.from_bytes_packed(
                    data,
                    traversal_limit_in_words=self._stored_limit(words),
                    nesting_limit=NESTING_LIMIT,
                )
            if bad_keys is not None:
                return decode_document(self.schema, doc, expect, bad_keys)
            return self._decode(doc, expect, words)

    def _stored_limit(self, words: int) -> int:
        """The traversal limit for a stored message of ``words`` words: the wire's, or the
        same room over its own size (8x: readers visit some words more than once) when that
        is larger (capped: a damaged store cannot ask for unbounded work)."""
        return max(self.traversal_limit_words, min(8 * words, _MAX_STORED_WORDS))

    def _flat(self, data: bytes) -> Any:
        """A ``Document`` reader over a one-segment unpacked record (``encode_record``)."""
        if len(data) < 16 or len(data) % 8:
            raise MalformedMessageError("record: not a whole number of words")
        count, words = _TABLE.unpack_from(data)
        if count != 0 or 8 + 8 * words != len(data):
            raise MalformedMessageError("record: segment table does not match its length")
        return self.schema.crdt.Document.from_segments(
            [data[8:]],
            traversal_limit_in_words=self._stored_limit(words),
            nesting_limit=NESTING_LIMIT,
        )

    def decode_document(
        self,
        data: bytes,
        expect: type[Causal] | None = None,
        *,
        bad_keys: list[tuple[str, str]] | None = None,
    ) -> Causal:
        """The state or delta in packed ``data``; raises a ``CodecError`` subclass naming the
        key at fault. With ``bad_keys``, a top-level key whose content is invalid is skipped
        and reported there as ``(key, reason)`` instead (see ``decode_document``)."""
        self._check_size(data, "document")
        with decoding("document"):
            doc = self._parse(self.schema.crdt.Document, data, NESTING_LIMIT)
            if bad_keys is not None:
                return decode_document(self.schema, doc, expect, bad_keys)
            return self._decode(doc, expect, segment_words(data))

    # -- envelopes -----------------------------------------------------------------------

    def seal(
        self,
        signer: Signer,
        *,
        subject: str,
        hlc: int,
        sequence: int,
        document: Causal,
        is_state: bool = False,
        trace_id: bytes = b"",
        packed: bytes | None = None,
    ) -> bytes:
        """A signed envelope carrying ``document``, ready to publish.

        ``packed``: ``document`` as ``encode_document`` or ``encode_record`` of this codec
        gave it (a durable record, say), used instead of encoding it again.
        Raises MessageTooLargeError if the result exceeds ``max_payload`` (split the batch).
        """
        if not subject:
            raise InvalidArgumentError("an envelope needs a subject")
        if not 0 <= hlc <= _MAX_HLC or sequence < 0:
            raise InvalidArgumentError("hlc and sequence are non-negative 64-bit ints")
        if trace_id and self.version < 2:
            raise UnsupportedContentError("trace ids need wire version 2")
        doc: Any = None
        doc_words = 0
        packed_doc = None
        compressing = self.compress and self.version >= 2 and self.peer_version >= 2
        if packed is not None and packed[:1] == b"\x00":  # an unpacked record
            if not compressing:  # (else pycapnp's packed bytes go on the wire: encode them)
                with decoding("record"):
                    doc = self._flat(packed)
                doc_words = len(packed) // 8 - 1
            packed = None
        if doc is None and compressing:
            if packed is None:
                doc = encode_document(self.schema, document)
                packed = doc.to_bytes_packed()
            packed_doc = packed
        if doc is None and (packed_doc is None or len(packed_doc) < COMPRESS_MIN_BYTES):
            segment = self._fast_segment(document, limit=None) if packed is None else None
            if segment is not None:
                # The fast writer's words, read by pycapnp (its copy into the envelope below
                # is content-for-content: the same bytes as copying pycapnp's own builder, one
                # segment or several: so also past pycapnp's first segment).
                doc = self.schema.crdt.Document.from_segments([segment])
                doc_words = len(segment) // 8
            elif packed is None:
                doc = encode_document(self.schema, document)
            else:
                # A reader over stored bytes: never ``total_size`` (it aborts on a bad
                # pointer, see ``_checked_copy``); its segment table gives the size.
                with decoding("packed document"):
                    doc = self._parse(self.schema.crdt.Document, packed, NESTING_LIMIT)
                doc_words = min(segment_words(packed), self.traversal_limit_words)
        # One segment for the whole body when the document is copied in: a reader then
        # skips the segment pre-check (``check_segments``), a pass over every byte.
        words = FIRST_SEGMENT_WORDS
        if doc is not None:
            if not doc_words:
                doc_words = doc.total_size.word_count  # a builder this codec wrote
            words = max(words, doc_words + _ENVELOPE_WORDS)
        env = self.schema.envelope.Envelope.new_message(num_first_segment_words=words)
        env.version = self.version
        env.writer = signer.node_id
        env.subject = subject
        env.hlc = hlc
        env.sequence = sequence
        if packed_doc is not None and len(packed_doc) >= COMPRESS_MIN_BYTES:
            z = zlib.compress(packed_doc, 6)
            if is_state:
                env.stateZlib = z
            else:
                env.deltaBatchZlib = z
        else:
            with decoding("packed document"):  # a copy: raises on a bad stored pointer
                if is_state:
                    env.state = doc
                else:
                    env.deltaBatch = doc
        if trace_id:
            env.traceId = trace_id
        body = env.to_bytes_packed()
        outer = self.schema.envelope.SignedEnvelope.new_message(
            num_first_segment_words=len(body) // 8 + 64
        )
        outer.signer = signer.node_id
        outer.signature = signer.sign(body)
        outer.body = body
        out: bytes = outer.to_bytes_packed()
        if len(out) > self.max_payload:
            raise MessageTooLargeError(
                f"envelope is {len(out)} bytes, over max_payload={self.max_payload}; "
                "flush smaller batches"
            )
        return out

    def open(
        self,
        data: bytes,
        roster: TrustRoster | None,
        *,
        subject: str | None = None,
        keep_packed: bool = False,
    ) -> Envelope:
        """Verify and decode an envelope; raises a ``CodecError`` subclass on any problem.

        Order: size, outer struct, signature (before the body is parsed), body, document.
        ``subject``: the subject the envelope must have been sealed for. Subjects name the
        purpose (deltas, catch-up, repairs, fetches), so a signed envelope captured in one
        place cannot be replayed as another kind of message (``BadSignatureError``).
        ``roster=None`` skips verification (``verified=False``): only for inspection tools
        such as ``worknode tail``; a replica always verifies.
        ``keep_packed``: also return the document's packed bytes (``packed_document``), copied
        from the envelope, not encoded again.
        """
        self._check_size(data, "envelope")
        with decoding("envelope"):
            outer = self._parse(self.schema.envelope.SignedEnvelope, data, 4)
            signer = outer.signer
            signature = bytes(outer.signature)
            body = bytes(outer.body)
        if roster is not None:
            roster.verify(signer, body, signature)
        with decoding("envelope body"):
            env = self._parse(self.schema.envelope.Envelope, body, NESTING_LIMIT)
            version = env.version
            if version < OLDEST_VERSION:
                raise UnsupportedVersionError(
                    f"wire version {version} is older than the oldest supported "
                    f"({OLDEST_VERSION}) or missing"
                )
            writer = env.writer
            if writer != signer:
                raise BadSignatureError(f"envelope written by {writer!r} but signed by {signer!r}")
            if subject is not None and env.subject != subject:
                raise BadSignatureError(
                    f"envelope sealed for {env.subject!r} replayed on {subject!r}"
                )
            try:
                which = env.which()
            except capnp.KjException as exc:
                if version > self.version:
                    raise UnsupportedContentError(
                        f"a wire v{version} payload this v{self.version} reader cannot read; "
                        "the writer's peer_version is set too high for a mixed cluster"
                    ) from exc
                raise
            if which in ("deltaBatchZlib", "stateZlib"):
                raw = self._inflate(bytes(getattr(env, which)))
                doc = self._parse(self.schema.crdt.Document, raw, NESTING_LIMIT)
                words = segment_words(raw)
            else:
                doc = getattr(env, which)
                words = segment_words(body)
            # Validate before anything copies: decode_document reads every known field
            # through pycapnp's checked getters (see the module doc for why a copy may not
            # come first); the copy below then covers unknown fields with its own checks.
            # The fast path's copy is a field assignment, which raises (``_decode``).
            document = self._decode(doc, None, words)
            is_state = which in ("state", "stateZlib")
            if document.is_delta and is_state:
                raise MalformedMessageError("a state transfer carries a delta document")
            packed = self._checked_copy(doc) if keep_packed else b""
            trace_id = bytes(env.traceId) if self.version >= 2 else b""
            hlc = env.hlc
            if hlc > INT64_MAX:  # the clocks' range (found by the delta fuzz target)
                raise MalformedMessageError("envelope hybrid timestamp above 2**63 - 1")
            return Envelope(
                version=version,
                writer=writer,
                subject=env.subject,
                hlc=hlc,
                sequence=env.sequence,
                document=document,
                is_state=is_state,
                trace_id=trace_id,
                verified=roster is not None,
                packed_document=packed,
            )

    # -- helpers -------------------------------------------------------------------------

    def _fast_segment(self, document: Causal, *, limit: int | None = FAST_LIMIT) -> bytes | None:
        """The segment pycapnp's encoder would build for ``document``, written by the fast
        writer (``_fast_write``); None when pycapnp must write it. ``limit=None``: also past
        pycapnp's first segment, in one segment (for a copy's source: not pycapnp's bytes)."""
        if not self.fast:
            return None
        try:
            return write_document(document, self.schema.kinds, limit=limit)
        except CodecError:
            return None

    def fast_decode(self, doc: Any, expect: type[Causal] | None, words: int) -> Causal | None:
        """The fast path of ``_decode``: the document, or None when pycapnp must decide."""
        try:
            holder = self.schema.envelope.Envelope.new_message(
                num_first_segment_words=min(words, self.traversal_limit_words) + _ENVELOPE_WORDS
            )
            holder.deltaBatch = doc  # the checked copy (raises on a bad pointer)
            segments = holder.to_segments()
            if len(segments) != 1:
                return None
            return read_holder(segments[0], self.schema.kinds, expect)
        except (CodecError, capnp.KjException, ValueError):  # any doubt: pycapnp decides
            return None

    def _decode(self, doc: Any, expect: type[Causal] | None, words: int) -> Causal:
        """``decode_document`` of the ``Document`` reader ``doc`` (of a message of ``words``
        words): by the fast reader when it can, else (and for any doubt) by pycapnp.

        The fast reader reads the words of pycapnp's checked copy of ``doc`` (a field
        assignment into a holder ``Envelope``: bounds-checked, raising on a bad pointer, far
        pointers resolved, bounded by the reader's traversal limit) instead of unpacking in
        Python, which would cost more than the whole decode. Whatever the fast reader refuses
        (``FastPathError``: invalid content, an opaque kind or value, a multi-segment copy)
        is decoded by pycapnp, whose answer (and error message) is authoritative.
        """
        if self.fast:
            found = self.fast_decode(doc, expect, words)
            if found is not None:
                return found
        return decode_document(self.schema, doc, expect)

    def packed_document(self, data: bytes) -> bytes:
        """The packed document of envelope ``data``, as ``open(..., keep_packed=True)``
        gives it, without verifying or decoding it again: for an envelope this codec opened
        and checked before (a replica logging what it joined)."""
        self._check_size(data, "envelope")
        with decoding("envelope"):
            outer = self._parse(self.schema.envelope.SignedEnvelope, data, 4)
            env = self._parse(self.schema.envelope.Envelope, bytes(outer.body), NESTING_LIMIT)
            which = env.which()
            if which in ("deltaBatchZlib", "stateZlib"):
                raw = self._inflate(bytes(getattr(env, which)))
                doc = self._parse(self.schema.crdt.Document, raw, NESTING_LIMIT)
            else:
                doc = getattr(env, which)
            return self._checked_copy(doc)

    def _checked_copy(self, doc: Any) -> bytes:
        """Packed bytes of the ``Document`` reader ``doc`` (unknown fields and members
        included), copied only through bounds-checked paths.

        pycapnp's ``as_builder()`` (``setRoot``) and ``total_size`` (``totalSize``) are not
        declared to raise: a kj exception inside them (an out-of-bounds pointer) aborts the
        interpreter. Assigning a struct field from a reader copies through a setter that
        does raise, so ``doc`` is first copied into a holder envelope that way; the holder's
        copy holds only in-bounds pointers, and is then re-rooted as a ``Document`` (the
        unchecked paths, now over bytes the checked copy wrote).
        """
        holder = self.schema.envelope.Envelope.new_message(
            num_first_segment_words=FIRST_SEGMENT_WORDS
        )
        holder.deltaBatch = doc  # raises KjException on a bad pointer: see ``decoding``
        clean = holder.deltaBatch.as_reader()
        copy = clean.as_builder(num_first_segment_words=clean.total_size.word_count + 1)
        return copy.to_bytes_packed()  # type: ignore[no-any-return]

    def read(self, struct: Any, data: bytes, what: str) -> Any:
        """A reader of ``struct`` over packed ``data``, with this codec's limits.

        Read its fields inside ``decoding(what)`` so every failure becomes a CodecError.
        """
        self._check_size(data, what)
        with decoding(what):
            return self._parse(struct, data, NESTING_LIMIT)

    def _parse(self, struct: Any, data: bytes, nesting_limit: int) -> Any:
        """A reader over packed ``data`` (checked first: see module doc)."""
        check_segments(data)
        return struct.from_bytes_packed(
            data,
            traversal_limit_in_words=self.traversal_limit_words,
            nesting_limit=nesting_limit,
        )

    def _check_size(self, data: Any, what: str) -> None:
        if len(data) > self.max_payload:
            raise MessageTooLargeError(
                f"{what} is {len(data)} bytes, over max_payload={self.max_payload}"
            )

    def _inflate(self, data: bytes) -> bytes:
        limit = 8 * self.max_payload
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, limit)
        except zlib.error as exc:
            raise MalformedMessageError(f"compressed batch does not inflate: {exc}") from exc
        if d.unconsumed_tail:
            raise MessageTooLargeError(f"compressed batch inflates past {limit} bytes")
        if not d.eof:
            raise MalformedMessageError("compressed batch is truncated")
        return out
