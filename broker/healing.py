"""Healing over NATS: a replica's Merkle endpoints, and the client the healer drives them with.

Replica side (``HealEndpoints``): one NATS micro (ADR-32) service per node, ``worknode-replica``,
with metadata ``node``, ``namespace`` and ``subjects`` so a healer discovers it with
``$SRV.INFO``. Per subject it serves five endpoints on
``wn.<ns>.merkle.<subject>.<node>.<verb>``:

    root    RootRequest        -> RootReply (root, item count, version vector, tree scheme and
                                  shape; on request the top levels' values, packed)
    nodes   NodeHashesRequest  -> NodeHashesReply (child values of each prefix; with hashBytes,
                                  packed and cut to their low hashBytes bytes)
    leaves  NodeHashesRequest  -> LeafItemsReply (items of each leaf prefix; with hashBytes,
                                  packed, digests cut likewise; with digestsOnly, digests
                                  without keys)
    fetch   FetchStatesRequest -> SignedEnvelope (delta document: the entries of those keys
                                  and of the keys of those items, and the replica's whole
                                  causal context; see ``broker.repair``)
    apply   SignedEnvelope     -> ApplyStatesReply (repair delta joined and logged)

Requests and replies are Cap'n Proto from ``schemas/healer.capnp``; documents travel in signed
envelopes, so a replica only applies repairs signed by a node in its roster, and the healer
only moves states a replica signed.

The Merkle tree follows the replica incrementally: every change marks the touched top-level
keys dirty; their digests are recomputed (O(depth) tree updates per key) in the background,
in chunks, starting ``refresh_delay`` after a change and spending at most ``refresh_budget``
of the event loop's time, and at the latest when the next healing request arrives. Writes never
wait for it, a key written many times between refreshes is digested once, and a heal after a
partition finds its trees warm. A tree is built whole at start and after a full state was
joined (a catch-up: any key may have changed), its digests taken in background chunks too;
otherwise it is never rebuilt.

Prefixes travel as bytes, one digit (0..fanout-1) per byte; the root is the empty prefix.

Why values may travel cut to a few bytes: every value is a sum of keyed digests that no one
without the cluster secret can compute or steer, so two different subtrees show equal low
``w`` bytes with probability ``2**(-8w)`` per comparison, and the low bytes of a sum are the
sum of the low bytes (a parent still equals its children's sum mod ``2**(8w)``). At the
healer's 6 bytes and the ~20,000 node comparisons of a heal of 1,000 keys among 1M, a missed
difference has probability ~7e-11 per heal; leaf items go as 4-byte digests, compared only
within one leaf (~15 items a side at 1M keys): ~5e-8 per differing leaf. A miss is never
silent and never lasting: the healer compares whole 32-byte roots afterwards, and a round
that found nothing while roots differ is followed by one with whole values and keys.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from broker.codec import CURRENT_VERSION, Signer, TrustRoster, WireCodec, decoding
from broker.crdt import ORMap
from broker.errors import InvalidArgumentError, MalformedMessageError
from broker.merkle import (
    HASH_SIZE,
    TREE_SCHEME,
    Diff,
    LeafRequest,
    MerkleTree,
    Reconciliation,
    Request,
    RootInfo,
    Side,
    node_answer,
)
from broker.repair import item_digest, subset
from broker.replica import Replica
from broker.transport import (
    Endpoint,
    Msg,
    ServiceHandle,
    Transport,
    call,
    merkle_subject,
)

log = logging.getLogger(__name__)

__all__ = [
    "LEAVES_PER_CALL",
    "MAX_PREFIXES",
    "MAX_ROOT_VALUES",
    "PACKED_REPLY_BYTES",
    "REPLICA_SERVICE",
    "VERBS",
    "HealClient",
    "HealEndpoints",
    "RootView",
    "pack_leaf_items",
    "pack_prefixes",
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


REFRESH_CHUNK: Final = 500  # dirty keys digested per background step (~5-15 ms of the loop)
BUILD_CHUNK: Final = 5_000  # entries digested per background step of a (re)build


class _ReplicaTree:
    """A Merkle tree that follows one replica: dirty keys, refreshed in the background once
    started (see module doc) and on demand.

    A (re)build in the background digests the entries in chunks first (keys changed meanwhile
    are noted and refreshed after), then builds the tree in one step (numpy: ~0.2 s at 100k
    keys), so a large replica never stalls its event loop for all its digests at once."""

    def __init__(
        self,
        replica: Replica,
        secret: bytes,
        *,
        refresh_delay: float = 0.05,
        refresh_budget: float = 0.1,
    ) -> None:
        self.replica = replica
        self.secret = secret
        self.tree = MerkleTree(key=secret)
        self._dirty: set[str] | None = None  # None: everything (first build, full joins)
        self._delay = refresh_delay
        self._budget = refresh_budget
        self._pause = refresh_delay  # before the next background step (budget-adjusted)
        self._handle: asyncio.TimerHandle | None = None
        self._running = False
        # a background (re)build in progress: keys still to digest, digests so far, and the
        # keys that changed since it started
        self._todo: list[str] | None = None
        self._digests: list[tuple[str, bytes]] = []
        self._changed: set[str] = set()
        self.background_keys = 0  # entries digested by background steps (tests, metrics)
        replica.add_change_listener(self._on_change)

    def start(self) -> None:
        """Refresh in the background from now on."""
        self._running = True
        self._schedule()

    def stop(self) -> None:
        """No more background refreshes (on-demand ones still work)."""
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_change(self, keys: Collection[str] | None) -> None:
        if keys is None:
            self._dirty = None
            self._todo = None  # a build in progress starts over
        elif self._dirty is not None:
            self._dirty.update(keys)
        elif self._todo is not None:
            self._changed.update(keys)
        self._schedule()

    def _schedule(self) -> None:
        if not self._running or self._handle is not None or self._dirty == set():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a change outside the loop: the next request refreshes
            return
        self._handle = loop.call_later(self._pause, self._step)

    def _step(self) -> None:
        self._handle = None
        t0 = time.perf_counter()
        failed = False
        try:
            if self._dirty is None:
                self._build_step()
            elif self._dirty:
                keys = [self._dirty.pop() for _ in range(min(REFRESH_CHUNK, len(self._dirty)))]
                try:
                    self._update(keys)
                except BaseException:
                    self._dirty.update(keys)  # not lost: refreshed by the next try
                    raise
                self.background_keys += len(keys)
            else:
                return
        except Exception:
            # Never silent, never a wrong tree: a full rebuild at the next step or request
            # (retried at most once a second).
            log.exception("background refresh of a Merkle tree failed; rebuilding it")
            self._dirty, self._todo = None, None
            failed = True
        spent = time.perf_counter() - t0
        # At most ``budget`` of the loop's time: a step of ``spent`` s is followed by a pause
        # of spent * (1 - budget) / budget (and never less than the delay); once caught up,
        # the next change waits only the delay.
        self._pause = max(self._delay, spent * (1 - self._budget) / self._budget)
        if failed:
            self._pause = max(self._pause, 1.0)
        elif self._dirty == set():
            self._pause = self._delay
        self._schedule()

    def _build_step(self) -> None:
        store = self.replica.state.store or {}
        if self._todo is None:
            self._todo, self._digests, self._changed = list(store), [], set()
        chunk = self._todo[-BUILD_CHUNK:]
        del self._todo[-BUILD_CHUNK:]
        secret = self.secret
        for key in chunk:
            entry = store.get(key)
            if entry is not None:  # removed since the build started: noted as changed
                self._digests.append((key, item_digest(key, entry, secret)))
        self.background_keys += len(chunk)
        if not self._todo:
            self.tree = MerkleTree.build(self._digests, key=secret)
            # Keys changed after their digest was taken (or added since) are refreshed the
            # usual way; every other digest matches the entry it was taken from.
            self._dirty, self._todo, self._digests = self._changed, None, []
            self._changed = set()

    def _update(self, keys: Collection[str]) -> None:
        store = self.replica.state.store or {}
        for key in keys:
            entry = store.get(key)
            if entry is None:
                self.tree.remove(key)
            else:
                self.tree.set(key, item_digest(key, entry, self.secret))

    def current(self) -> MerkleTree:
        if self._dirty is None:
            store = self.replica.state.store or {}
            secret = self.secret
            items = [(k, item_digest(k, v, secret)) for k, v in store.items()]
            self.tree = MerkleTree.build(items, key=secret)
            self._todo, self._digests, self._changed = None, [], set()
        else:
            self._update(self._dirty)
        self._dirty = set()
        return self.tree


class HealEndpoints:
    """Serves this node's replicas to healers (see module doc). ``start()``/``stop()``."""

    def __init__(
        self,
        *,
        transport: Transport,
        namespace: str,
        replicas: dict[str, Replica],
        signer: Signer,
        roster: TrustRoster,
        codec: WireCodec,
        secret: bytes,
    ) -> None:
        self.transport = transport
        self.namespace = namespace
        self.replicas = replicas
        self.signer = signer
        self.roster = roster
        self.codec = codec
        # The healer protocol is spoken only with healers, in the newest release this code
        # knows, whatever wire version the node is pinned to for its deltas (a pin protects
        # older delta readers; states still travel in envelopes of ``codec``'s version).
        self.proto = (
            codec if codec.version == CURRENT_VERSION
            else WireCodec(CURRENT_VERSION, max_payload=codec.max_payload)
        )
        self.trees = {s: _ReplicaTree(r, secret) for s, r in replicas.items()}
        self._service: ServiceHandle | None = None

    async def start(self) -> None:
        """Register the service and start refreshing trees in the background. Idempotent."""
        if self._service is not None:
            return
        for tree in self.trees.values():
            tree.start()
        node = self.signer.node_id
        endpoints = []
        for subject in self.replicas:
            for verb in VERBS:
                endpoints.append(
                    Endpoint(
                        f"{verb}-{subject}",
                        merkle_subject(self.namespace, subject, node, verb),
                        self._handler(subject, verb),
                    )
                )
        self._service = await self.transport.add_service(
            name=REPLICA_SERVICE,
            version=_VERSION,
            description="worknode replica: Merkle roots, nodes, leaves, state fetch and repair",
            endpoints=endpoints,
            metadata={
                "node": node,
                "namespace": self.namespace,
                "subjects": ",".join(sorted(self.replicas)),
            },
        )

    async def stop(self) -> None:
        """Unregister; no more background refreshes. Idempotent."""
        for tree in self.trees.values():
            tree.stop()
        if self._service is not None:
            service, self._service = self._service, None
            await service.stop()

    def _handler(self, subject: str, verb: str) -> Any:
        async def handle(msg: Msg) -> bytes:
            reply: bytes = await getattr(self, f"_{verb}")(subject, msg.data)
            return reply

        return handle

    # -- endpoints -------------------------------------------------------------------------

    async def _root(self, subject: str, data: bytes) -> bytes:
        req = self.proto.read(self.proto.schema.healer.RootRequest, data, "root request")
        with decoding("root request"):
            levels = int(req.levels)
            width = _width(int(req.hashBytes))
            unless = bytes(req.levelsUnless)
        tree = self.trees[subject].current()
        vv = self.replicas[subject].state.context.version_vector
        reply = self.proto.schema.healer.RootReply.new_message()
        reply.subject = subject
        root = tree.root()
        reply.root = root
        reply.itemCount = tree.count()
        reply.scheme = TREE_SCHEME
        reply.fanout = tree.fanout
        reply.depth = tree.depth
        versions = reply.init("versions")
        names = sorted(vv)
        versions.init("replicas", len(names))
        versions.init("counters", len(names))
        for i, r in enumerate(names):
            versions.replicas[i] = r
            versions.counters[i] = vv[r]
        if levels and root != unless:
            sent, values, parts = 0, 0, []
            while sent < min(levels, tree.depth - 1):
                size = tree.fanout ** (sent + 1)
                if values + size > MAX_ROOT_VALUES:
                    break
                sent += 1
                values += size
                parts.append(tree.level_values(sent, range(size), width))
            reply.levelCount = sent
            reply.levels = b"".join(parts)
        return reply.to_bytes_packed()  # type: ignore[no-any-return]

    def _prefixes(
        self, subject: str, data: bytes, *, leaf_indices: bool = False
    ) -> tuple[list[tuple[int, ...]], int, bool, list[int] | None]:
        """``(prefixes, hashBytes, digestsOnly, leaf indices)`` of a node or leaf request;
        with ``leaf_indices``, a packed request for leaves answers with their indices (and no
        prefixes: the cheap form of a large leaf request)."""
        req = self.proto.read(self.proto.schema.healer.NodeHashesRequest, data, "node request")
        with decoding("node request"):
            if len(req.prefixes) > MAX_PREFIXES:
                raise MalformedMessageError(f"more than {MAX_PREFIXES} prefixes in one request")
            level, raw = int(req.prefixLevel), bytes(req.packedPrefixes)
            width, digests_only = int(req.hashBytes), bool(req.digestsOnly)
            if level:
                tree = self.trees[subject].tree
                bits = tree.fanout.bit_length() - 1
                if len(raw) > MAX_PREFIXES * _index_bytes(level, bits):
                    raise MalformedMessageError(f"more than {MAX_PREFIXES} prefixes")
                if leaf_indices and level == tree.depth:
                    return [], width, digests_only, unpack_indices(level, raw, bits, tree.depth)
                prefixes = unpack_prefixes(level, raw, bits, tree.depth)
            else:
                prefixes = [_prefix_tuple(bytes(p)) for p in req.prefixes]
            return prefixes, width, digests_only, None

    async def _nodes(self, subject: str, data: bytes) -> bytes:
        tree = self.trees[subject].current()
        prefixes, packed, _, _ = self._prefixes(subject, data)
        reply = self.proto.schema.healer.NodeHashesReply.new_message()
        reply.subject = subject
        if packed:
            reply.hashes = node_answer(tree, prefixes, _width(packed))
            return reply.to_bytes_packed()  # type: ignore[no-any-return]
        values = tree.child_hashes(prefixes)
        nodes = reply.init("nodes", len(values))
        for i, (prefix, value) in enumerate(sorted(values.items())):
            nodes[i].prefix = _prefix_bytes(prefix)
            nodes[i].hash = value
        return reply.to_bytes_packed()  # type: ignore[no-any-return]

    async def _leaves(self, subject: str, data: bytes) -> bytes:
        tree = self.trees[subject].current()
        prefixes, packed, digests_only, indices = self._prefixes(subject, data, leaf_indices=True)
        reply = self.proto.schema.healer.LeafItemsReply.new_message()
        reply.subject = subject
        if digests_only:
            w = _width(packed)
            parts: list[bytes] = []
            if indices is not None:
                answers = [tree.leaf_digests(leaf) for leaf in indices]
            else:
                found = tree.leaves(prefixes)
                answers = [[d for _, d in found[p]] for p in prefixes]
            for digests in answers:
                parts.append(len(digests).to_bytes(4, "big"))
                parts.extend([d[-w:] for d in digests])
            reply.packedItems = b"".join(parts)
            return reply.to_bytes_packed()  # type: ignore[no-any-return]
        if indices is not None:
            prefixes = _indices_to_prefixes(indices, tree.fanout.bit_length() - 1, tree.depth)
        leaves = tree.leaves(prefixes)
        if packed:
            reply.packedItems = pack_leaf_items([leaves[p] for p in prefixes], _width(packed))
            return reply.to_bytes_packed()  # type: ignore[no-any-return]
        items = [item for prefix in sorted(leaves) for item in leaves[prefix]]
        out = reply.init("items", len(items))
        for i, (key, digest) in enumerate(items):
            out[i].key = key
            out[i].digest = digest
        return reply.to_bytes_packed()  # type: ignore[no-any-return]

    async def _fetch(self, subject: str, data: bytes) -> bytes:
        req = self.proto.read(self.proto.schema.healer.FetchStatesRequest, data, "fetch")
        with decoding("fetch request"):
            keys = [str(k) for k in req.keys]
            raw = bytes(req.items)
            width = _width(int(req.hashBytes))
        if raw:
            keys += self._resolve(subject, raw, width)
        replica = self.replicas[subject]
        return self.codec.seal(
            self.signer,
            subject=merkle_subject(self.namespace, subject, self.signer.node_id, "fetch"),
            hlc=replica.hlc(),
            sequence=0,
            document=subset(replica.state, keys),
        )

    def _resolve(self, subject: str, raw: bytes, width: int) -> list[str]:
        """The keys of the items named in a fetch: ``(leaf index, low digest bytes)`` each.
        An item that no longer matches (its entry changed since) names no key."""
        size = 4 + width
        if len(raw) % size or len(raw) // size > MAX_PREFIXES:
            raise MalformedMessageError("fetch items are 4-byte leaf indices with digests")
        tree = self.trees[subject].current()
        wanted: dict[int, set[bytes]] = {}
        for at in range(0, len(raw), size):
            leaf = int.from_bytes(raw[at : at + 4], "big")
            if leaf >= tree.leaf_count:
                raise MalformedMessageError(f"leaf index {leaf} is outside the tree")
            wanted.setdefault(leaf, set()).add(raw[at + 4 : at + size])
        return [
            key
            for leaf, digests in wanted.items()
            for key, digest in tree.leaf_range_items(leaf, leaf + 1)
            if digest[-width:] in digests
        ]

    async def _apply(self, subject: str, data: bytes) -> bytes:
        env = self.codec.open(
            data,
            self.roster,
            subject=merkle_subject(self.namespace, subject, self.signer.node_id, "apply"),
            keep_packed=True,
        )
        document = env.document
        if not isinstance(document, ORMap) or not document.is_delta:
            raise MalformedMessageError("a repair is an OR-map delta")
        replica = self.replicas[subject]
        await replica.apply_repair(document, env.packed_document)
        tree = self.trees[subject].current()
        reply = self.proto.schema.healer.ApplyStatesReply.new_message()
        reply.subject = subject
        reply.root = tree.root()
        reply.applied = len(document.store or {})
        return reply.to_bytes_packed()  # type: ignore[no-any-return]


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
    ) -> None:
        self.transport = transport
        self.namespace = namespace
        self.codec = codec
        self.signer = signer
        self.roster = roster
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.prefix_bits = 4  # log2(fanout) of the trees asked (set from root views)

    async def _call(self, subject: str, node: str, verb: str, body: bytes) -> bytes:
        self.calls += 1
        self.bytes_sent += len(body)
        reply = await call(
            self.transport,
            merkle_subject(self.namespace, subject, node, verb),
            body,
            timeout=self.timeout,
        )
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
        """Those keys' entries, and those of the keys of ``items`` (``(leaf index, low
        digest bytes)`` as a digests-only leaf reply sent them), with the replica's context,
        verified (signed by ``node``)."""
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
        return env.document

    async def apply(
        self, subject: str, node: str, delta: ORMap, packed: bytes | None = None
    ) -> bytes:
        """Push a repair delta; returns the replica's root afterwards. ``packed``: ``delta``
        as ``codec.encode_document`` gave it (see ``apply_all``)."""
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

    async def apply_all(self, subject: str, pushes: Sequence[tuple[str, ORMap]]) -> int:
        """Push ``(node, delta)`` repairs in parallel, each distinct delta encoded once (a
        delta goes to every member of a group; only the envelope differs per node). Returns
        the entries pushed."""
        packed: dict[int, bytes] = {}
        for _, delta in pushes:
            if id(delta) not in packed:
                packed[id(delta)] = self.codec.encode_document(delta)
        await asyncio.gather(
            *(self.apply(subject, node, d, packed[id(d)]) for node, d in pushes)
        )
        return sum(len(d.store or ()) for _, d in pushes)
