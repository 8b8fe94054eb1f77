"""The healer's side of the healer protocol: ``HealClient`` calls one replica's endpoints
(``broker.healing._endpoints``) and decodes their replies, and drives a ``Reconciliation``
between two replicas with one wave of parallel calls per round.

Invariants: every request is signed (``broker.transport.RequestSigner``: the healer's identity,
bound to its subject, body, inbox and moment) and every reply is verified before it is read:
signed by the very replica asked and bound to that request, so a reply relayed from another
replica, or replayed from another request, is a ``SignatureError`` (``on_unverified`` hears
each, by subject, node and verb); every reply is read through the codec's limits and every
failure to read it is a ``CodecError``; a fetched state is verified (signed by the replica
asked, for the subject and verb asked); leaf items are checked to lie in the leaf they were
asked for.

An adapter: asyncio and the transport; what it decides lives in ``Reconciliation`` and in
``broker.healing._planner``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.codec import Signer, TrustRoster, WireCodec, decoding
from broker.crdt import ORMap
from broker.errors import (
    InvalidArgumentError,
    MalformedMessageError,
    SignatureError,
    StatusCode,
)
from broker.healing._wire import (
    LEAVES_PER_CALL,
    PACKED_REPLY_BYTES,
    PREFIXES_PER_CALL,
    RootView,
    _prefix_bytes,
    _prefix_tuple,
    pack_prefixes,
    unpack_leaf_items,
)
from broker.merkle import (
    HASH_SIZE,
    Diff,
    LeafRequest,
    MerkleTree,
    Reconciliation,
    Request,
    RootInfo,
    Side,
)
from broker.transport import RequestSigner, ServiceCallError, Transport, call, merkle_subject

__all__ = ["HealClient", "Refusal", "Voucher"]


class HealClient:
    """The healer's side: calls one replica's endpoints and decodes the replies."""

    def __init__(
        self,
        transport: Transport,
        *,
        namespace: str,
        codec: WireCodec,
        signer: Signer,
        roster: TrustRoster,
        timeout: float = 5.0,
        requests: RequestSigner | None = None,
        on_unverified: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.transport = transport
        self.namespace = namespace
        self.codec = codec
        self.signer = signer
        self.roster = roster
        self.requests = requests if requests is not None else RequestSigner(signer, roster)
        """Signs each request and verifies each reply (against ``roster``)."""
        self.on_unverified = on_unverified
        """Hears ``(subject, node, verb)`` of each reply that failed verification."""
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.prefix_bits = 4  # log2(fanout) of the trees asked (set from root views)

    async def _call(self, subject: str, node: str, verb: str, body: bytes) -> bytes:
        self.calls += 1
        self.bytes_sent += len(body)
        try:
            reply = await call(
                self.transport,
                merkle_subject(self.namespace, subject, node, verb),
                body,
                timeout=self.timeout,
                signer=self.requests,
                signers=(node,),  # the replica asked, and no other: a relay is detected
            )
        except SignatureError:
            if self.on_unverified is not None:
                self.on_unverified(subject, node, verb)
            raise
        self.bytes_received += len(reply)
        return reply

    async def root(
        self, subject: str, node: str, *, levels: int = 0, width: int = HASH_SIZE,
        unless: bytes = b"",
    ) -> RootView:
        """The replica's root, item count, version vector and tree scheme and shape; with
        ``levels``, also its top levels' values (``width`` bytes each) unless its root is
        ``unless``."""
        req = self.codec.schema.healer.RootRequest.new_message()
        req.subject = subject
        req.levels = levels
        req.hashBytes = width % HASH_SIZE
        req.levelsUnless = unless
        data = await self._call(subject, node, "root", req.to_bytes_packed())
        r = self.codec.read(self.codec.schema.healer.RootReply, data, "root reply")
        with decoding("root reply"):
            names = list(r.versions.replicas)
            counters = list(r.versions.counters)
            if len(names) != len(counters):
                raise MalformedMessageError("version vector lists differ in length")
            vv = dict(zip(names, counters, strict=True))
            fanout, depth = int(r.fanout) or 16, int(r.depth) or 4
            raw, count = bytes(r.levels), int(r.levelCount)
            top: list[bytes] = []
            at = 0
            for level in range(1, count + 1):
                size = width * fanout**level
                top.append(raw[at : at + size])
                at += size
            if at != len(raw) or any(len(t) != width * fanout ** (i + 1) for i, t in
                                     enumerate(top)):
                raise MalformedMessageError("root reply levels do not match their count")
            return RootView(
                node, bytes(r.root), int(r.itemCount), vv, int(r.scheme) or 1, fanout, depth,
                tuple(top), width,
            )

    def _prefix_request(
        self, subject: str, prefixes: Sequence[tuple[int, ...]], width: int = 0
    ) -> bytes:
        req = self.codec.schema.healer.NodeHashesRequest.new_message()
        req.subject = subject
        req.hashBytes = width % HASH_SIZE if width else 0
        if width == HASH_SIZE:
            req.hashBytes = 0  # whole values: the unpacked form old replicas answer too
        if width and width < HASH_SIZE and prefixes and prefixes[0]:
            # v3 replicas: node indices packed (2 bytes a prefix at fan-out 16, depth 4)
            req.prefixLevel, req.packedPrefixes = pack_prefixes(prefixes, self.prefix_bits)
            return req.to_bytes_packed()  # type: ignore[no-any-return]
        lst = req.init("prefixes", len(prefixes))
        for i, p in enumerate(prefixes):
            lst[i] = _prefix_bytes(p)
        return req.to_bytes_packed()  # type: ignore[no-any-return]

    @staticmethod
    def _chunks(
        prefixes: Sequence[tuple[int, ...]], size: int = PREFIXES_PER_CALL
    ) -> list[Sequence[tuple[int, ...]]]:
        return [prefixes[i : i + size] for i in range(0, len(prefixes), size)]

    async def nodes(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]]
    ) -> dict[tuple[int, ...], bytes]:
        """Child values of each prefix (asked in parallel chunks that keep replies small)."""
        parts = await asyncio.gather(
            *(self._nodes(subject, node, chunk) for chunk in self._chunks(prefixes))
        )
        return {k: v for part in parts for k, v in part.items()}

    async def _nodes(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]]
    ) -> dict[tuple[int, ...], bytes]:
        data = await self._call(subject, node, "nodes", self._prefix_request(subject, prefixes))
        r = self.codec.read(self.codec.schema.healer.NodeHashesReply, data, "nodes reply")
        with decoding("nodes reply"):
            return {_prefix_tuple(bytes(n.prefix)): bytes(n.hash) for n in r.nodes}

    async def packed_nodes(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], width: int,
        fanout: int = 16,
    ) -> bytes:
        """Child values of each prefix, packed in order, ``width`` low bytes each (the
        answer ``Reconciliation.receive_nodes`` takes); parallel calls of bounded size."""
        if width >= HASH_SIZE:
            values = await self.nodes(subject, node, prefixes)
            return b"".join(
                values[(*p, d)] for p in prefixes for d in range(fanout)
            )
        size = max(1, PACKED_REPLY_BYTES // (fanout * width))
        parts = await asyncio.gather(
            *(self._packed_nodes(subject, node, c, width, fanout)
              for c in self._chunks(prefixes, size))
        )
        return b"".join(parts)

    async def _packed_nodes(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], width: int,
        fanout: int,
    ) -> bytes:
        body = self._prefix_request(subject, prefixes, width)
        data = await self._call(subject, node, "nodes", body)
        r = self.codec.read(self.codec.schema.healer.NodeHashesReply, data, "nodes reply")
        with decoding("nodes reply"):
            packed = bytes(r.hashes)
        if len(packed) != len(prefixes) * fanout * width:
            raise MalformedMessageError(f"replica {node} answered the wrong number of values")
        return packed

    async def leaves(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], tree: MerkleTree,
        width: int = HASH_SIZE,
    ) -> dict[tuple[int, ...], list[tuple[str, bytes]]]:
        """Items of each leaf prefix (checked with ``tree.path``: same secret and shape);
        with ``width`` below 32, packed and with digests cut to their low ``width`` bytes."""
        if width >= HASH_SIZE:
            parts = await asyncio.gather(
                *(self._leaves(subject, node, chunk, tree) for chunk in self._chunks(prefixes))
            )
        else:
            parts = await asyncio.gather(
                *(
                    self._packed_leaves(subject, node, chunk, tree, width)
                    for chunk in self._chunks(prefixes, LEAVES_PER_CALL)
                )
            )
        return {k: v for part in parts for k, v in part.items()}

    async def _packed_leaves(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], tree: MerkleTree,
        width: int,
    ) -> dict[tuple[int, ...], list[tuple[str, bytes]]]:
        body = self._prefix_request(subject, prefixes, width)
        data = await self._call(subject, node, "leaves", body)
        r = self.codec.read(self.codec.schema.healer.LeafItemsReply, data, "leaves reply")
        with decoding("leaves reply"):
            raw = bytes(r.packedItems)
        out: dict[tuple[int, ...], list[tuple[str, bytes]]] = {}
        for prefix, items in zip(prefixes, unpack_leaf_items(raw, len(prefixes), width),
                                 strict=True):
            for key, _ in items:
                if tree.path(key) != prefix:
                    raise InvalidArgumentError(f"replica {node} sent key {key!r} from another leaf")
            out[prefix] = items
        return out

    async def leaf_digests(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], width: int
    ) -> dict[tuple[int, ...], list[bytes]]:
        """The item digests (low ``width`` bytes, no keys) of each leaf prefix."""
        parts = await asyncio.gather(
            *(
                self._leaf_digests(subject, node, chunk, width)
                for chunk in self._chunks(prefixes, LEAVES_PER_CALL)
            )
        )
        return {k: v for part in parts for k, v in part.items()}

    async def _leaf_digests(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], width: int
    ) -> dict[tuple[int, ...], list[bytes]]:
        req = self.codec.schema.healer.NodeHashesRequest.new_message()
        req.subject = subject
        req.hashBytes = width % HASH_SIZE
        req.digestsOnly = True
        req.prefixLevel, req.packedPrefixes = pack_prefixes(prefixes, self.prefix_bits)
        data = await self._call(subject, node, "leaves", req.to_bytes_packed())
        r = self.codec.read(self.codec.schema.healer.LeafItemsReply, data, "leaves reply")
        with decoding("leaves reply"):
            raw = bytes(r.packedItems)
        out: dict[tuple[int, ...], list[bytes]] = {}
        at = 0
        for prefix in prefixes:
            if at + 4 > len(raw):
                raise MalformedMessageError("packed leaf digests end early")
            count = int.from_bytes(raw[at : at + 4], "big")
            at += 4
            end = at + count * width
            if end > len(raw):
                raise MalformedMessageError("packed leaf digests end early")
            out[prefix] = [raw[i : i + width] for i in range(at, end, width)]
            at = end
        if at != len(raw):
            raise MalformedMessageError("packed leaf digests carry trailing bytes")
        return out

    async def _leaves(
        self, subject: str, node: str, prefixes: Sequence[tuple[int, ...]], tree: MerkleTree
    ) -> dict[tuple[int, ...], list[tuple[str, bytes]]]:
        data = await self._call(subject, node, "leaves", self._prefix_request(subject, prefixes))
        r = self.codec.read(self.codec.schema.healer.LeafItemsReply, data, "leaves reply")
        out: dict[tuple[int, ...], list[tuple[str, bytes]]] = {p: [] for p in prefixes}
        with decoding("leaves reply"):
            for item in r.items:
                key = str(item.key)
                path = tree.path(key)
                if path not in out:
                    raise InvalidArgumentError(f"replica {node} sent key {key!r} from another leaf")
                out[path].append((key, bytes(item.digest)))
        return out

    async def identify(
        self, subject: str, left: RootView, right: RootView, secret: bytes,
        item_width: int = 0,
    ) -> Diff:
        """Name what differs between two replicas: drive a ``Reconciliation`` from their root
        views (top levels included), one wave of parallel calls per round. With
        ``item_width``, leaves come as item digests of that many low bytes and the result
        names unmatched items (``Diff.left_items``), else keys. ``Diff.round_trips`` counts
        the waves after the roots."""
        width = min(left.width, right.width)
        self.prefix_bits = left.fanout.bit_length() - 1
        rec = Reconciliation(
            RootInfo(left.root, left.count, left.fanout, left.depth, left.versions,
                     left.levels, width, left.scheme),
            RootInfo(right.root, right.count, right.fanout, right.depth, right.versions,
                     right.levels, width, right.scheme),
        )
        nodes = {Side.LEFT: left.node, Side.RIGHT: right.node}
        paths = MerkleTree(key=secret, fanout=left.fanout, depth=left.depth)

        async def ask(req: Request) -> None:
            node = nodes[req.side]
            if isinstance(req, LeafRequest) and item_width:
                digests = await self.leaf_digests(subject, node, req.prefixes, item_width)
                rec.receive_leaf_digests(req.side, digests)
            elif isinstance(req, LeafRequest):
                leaves = await self.leaves(subject, node, req.prefixes, paths, width)
                rec.receive_leaves(req.side, leaves)
            else:
                packed = await self.packed_nodes(subject, node, req.prefixes, width, left.fanout)
                rec.receive_nodes(req.side, packed)

        while not rec.done:
            await asyncio.gather(*(ask(req) for req in rec.next_requests()))
        return rec.result()

    async def fetch(
        self,
        subject: str,
        node: str,
        keys: Sequence[str],
        items: Sequence[tuple[int, bytes]] = (),
        width: int = HASH_SIZE,
    ) -> ORMap:
        """Those keys' entries (one ``node`` lacks as ``Whole(None)``, from replicas that
        name them), and those of the keys of ``items`` (``(leaf index, low digest bytes)`` as
        a digests-only leaf reply sent them), with the replica's context, verified (signed by
        ``node``). ``fetch_voucher`` also gives the signed reply itself."""
        return (await self.fetch_voucher(subject, node, keys, items, width)).document

    async def fetch_voucher(
        self,
        subject: str,
        node: str,
        keys: Sequence[str],
        items: Sequence[tuple[int, bytes]] = (),
        width: int = HASH_SIZE,
    ) -> Voucher:
        """``fetch``, with the reply's envelope as ``node`` sealed it: what ``push`` forwards
        to the other replicas (the healer never signs state itself)."""
        req = self.codec.schema.healer.FetchStatesRequest.new_message()
        req.subject = subject
        lst = req.init("keys", len(keys))
        for i, k in enumerate(keys):
            lst[i] = k
        if items:
            req.hashBytes = width % HASH_SIZE
            req.items = b"".join(leaf.to_bytes(4, "big") + d for leaf, d in items)
        data = await self._call(subject, node, "fetch", req.to_bytes_packed())
        env = self.codec.open(
            data, self.roster, subject=merkle_subject(self.namespace, subject, node, "fetch")
        )
        if env.writer != node or not isinstance(env.document, ORMap):
            raise MalformedMessageError(f"fetch reply from {node} is not its OR-map subset")
        return Voucher(node, env.document, data)

    async def push(self, subject: str, node: str, voucher: Voucher) -> bytes:
        """Hand ``node`` another replica's ``voucher`` (its fetch reply, unchanged): ``node``
        computes and joins the repair its source vouches for. Returns ``node``'s root
        afterwards; a voucher refused as Byzantine raises ``ServiceCallError`` with code
        ``PERMISSION_DENIED`` (its source served state it cannot vouch for)."""
        data = await self._call(subject, node, "apply", voucher.raw)
        r = self.codec.read(self.codec.schema.healer.ApplyStatesReply, data, "apply reply")
        with decoding("apply reply"):
            return bytes(r.root)

    async def push_all(
        self, subject: str, pushes: Sequence[tuple[str, Voucher]]
    ) -> list[Refusal]:
        """``push`` each ``(node, voucher)`` in parallel. Returns the pushes refused as
        Byzantine (``PERMISSION_DENIED``: the voucher's source is suspect); any other failure
        is raised (the first), after every push ended."""
        results = await asyncio.gather(
            *(self.push(subject, node, v) for node, v in pushes), return_exceptions=True
        )
        refused: list[Refusal] = []
        failure: BaseException | None = None
        for (node, voucher), result in zip(pushes, results, strict=True):
            if (isinstance(result, ServiceCallError)
                    and result.code is StatusCode.PERMISSION_DENIED):
                refused.append(Refusal(voucher.source, node, result.description))
            elif isinstance(result, BaseException) and failure is None:
                failure = result
        if failure is not None:
            raise failure
        return refused

    async def apply(
        self, subject: str, node: str, delta: ORMap, packed: bytes | None = None
    ) -> bytes:
        """Push a repair delta sealed by this healer (the form before vouched repairs:
        replicas of this release refuse it as ``unvouched_repair``; kept to prove that).
        ``packed``: ``delta`` as ``codec.encode_document`` gave it."""
        body = self.codec.seal(
            self.signer,
            subject=merkle_subject(self.namespace, subject, node, "apply"),
            hlc=0,
            sequence=0,
            document=delta,
            packed=packed,
        )
        data = await self._call(subject, node, "apply", body)
        r = self.codec.read(self.codec.schema.healer.ApplyStatesReply, data, "apply reply")
        with decoding("apply reply"):
            return bytes(r.root)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A replica's signed fetch reply: ``source`` sealed ``raw``, which holds ``document``."""

    source: str
    document: ORMap
    raw: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """A push refused as Byzantine: ``target`` would not join ``source``'s voucher
    (``description``: the replica's one-line reason)."""

    source: str
    target: str
    description: str
