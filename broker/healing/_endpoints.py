"""The replica side of healing: a node's Merkle endpoints (``HealEndpoints``).

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
    apply   SignedEnvelope     -> ApplyStatesReply (a voucher: another replica's fetch reply,
                                  forwarded unchanged; the repair it vouches for joined and
                                  logged)

Requests and replies are Cap'n Proto from ``schemas/healer.capnp``; documents travel in signed
envelopes, so the healer only moves states a replica signed.

Vouched repairs (issue 17). A healer never signs state: a healer key could otherwise claim a
writer's next million dots (silencing it), a context covering everything (a wipe) or entries
under a writer's dots. It forwards, as the body of ``apply``, source replica X's own fetch
reply, unchanged (the request itself stays signed by the healer: only healers may call). The
replica refuses it unless it is sealed by a roster *node* X other than itself, for
``merkle_subject(ns, subject, X, "fetch")``, stamped within the clock-drift rule and at most
``VOUCHER_MAX_AGE_S`` ago (``expired``); a repair sealed by a healer or a writer-only key is
refused as Byzantine (``unvouched_repair``, counted against its signer). It then computes,
against its own state, the repair of the reply's keys (``broker.repair.repair_for``: a fetch
reply names every key asked, one its source lacks as ``Whole(None)``), keeps what X vouches for
(``broker.replication._gate.relayed``: X's own dots and claims, other writers' dots seen
here), and joins that; other writers' dots unseen here are dropped and each writer is owed a
catch-up (its own signed state brings them). A voucher X cannot vouch for (``dot_range``,
``clock_range``) is refused whole as ``VoucherRefusedError`` (``PERMISSION_DENIED``), and the
healer names X as a replica that served unbacked state.

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
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

from broker.codec import (
    AUTH_HEADER,
    CURRENT_VERSION,
    RateLimiter,
    Signer,
    TrustRoster,
    WireCodec,
    decoding,
    parse_auth,
)
from broker.crdt import ORMap
from broker.errors import (
    BadSignatureError,
    ClockSkewError,
    CodecError,
    ExpiredRequestError,
    InvalidArgumentError,
    MalformedMessageError,
    ReplayedRequestError,
    ResourceExhaustedError,
    StatusCode,
    WorknodeError,
)
from broker.healing._tree import ReplicaTree
from broker.healing._wire import (
    MAX_FETCH_KEYS,
    MAX_LEAVES_PER_REQUEST,
    MAX_NODE_VALUES,
    MAX_PREFIXES,
    MAX_ROOT_VALUES,
    REPLICA_SERVICE,
    VERBS,
    _index_bytes,
    _prefix_bytes,
    _prefix_tuple,
    _width,
    pack_leaf_items,
    unpack_indices,
    unpack_prefixes,
)
from broker.merkle import TREE_SCHEME, node_answer
from broker.repair import subset
from broker.replica import REJECT_REASONS, Replica, reject_reason
from broker.transport import (
    Endpoint,
    Msg,
    RequestSigner,
    ServiceHandle,
    Signers,
    Transport,
    merkle_subject,
)

__all__ = [
    "DEFAULT_HEALERS",
    "HEAL_BURST",
    "HEAL_RATE",
    "HEAL_REFUSALS",
    "SLICE_ITEMS",
    "VOUCHER_MAX_AGE_S",
    "HealEndpoints",
    "VoucherRefusedError",
]

log = logging.getLogger(__name__)

_VERSION = "1.0.0"
_T = TypeVar("_T")

DEFAULT_HEALERS: Final = ("healer",)
"""Who may call the endpoints unless told otherwise: the healer's default id
(``HealerSettings.node_id``)."""
VOUCHER_MAX_AGE_S: Final = 600.0
"""Oldest voucher (a source's fetch reply, by its envelope's hybrid time) a replica joins: a
healer forwards fresh ones; an old one replayed (a stolen healer key) is refused."""
HEAL_RATE: Final = 200.0
"""Default requests per second one healer identity may make (a heal of 100,000 differing keys
takes a few hundred calls; the healer throttles its bytes besides)."""
HEAL_BURST: Final = 2_000.0
"""Default burst of requests one healer identity may make at once."""
SLICE_ITEMS: Final = 4_096
"""Leaf items (or digests) a leaves request reads before it yields to the event loop, so no
request holds the loop for more than a few milliseconds whatever the tree's size."""
HEAL_REFUSALS: Final = (
    *REJECT_REASONS, "not_healer", "replayed", "expired", "rate_limited", "too_costly",
)
"""Every reason a healer request is refused for (``HealEndpoints.rejected``): an envelope's
``REJECT_REASONS``, a signer that is not a healer, a replayed or expired request, a caller
over its rate limit, a request naming more work than one request may do."""


@contextlib.contextmanager
def _refused(what: str) -> Iterator[None]:
    """A tree's refusal of the prefixes a request named (digits out of range, mixed
    levels) is the request's fault: a ``MalformedMessageError``, counted as malformed."""
    try:
        yield
    except InvalidArgumentError as exc:
        raise MalformedMessageError(f"{what}: {exc}") from exc


def _leaf_index(fanout: int, depth: int, prefix: Sequence[int]) -> int:
    """The index of leaf ``prefix`` (``depth`` digits below ``fanout``), else malformed."""
    if len(prefix) != depth or any(d >= fanout for d in prefix):
        raise MalformedMessageError(f"leaves are asked by {depth}-digit leaf prefixes")
    index = 0
    for digit in prefix:
        index = index * fanout + digit
    return index


async def _sliced(leaves: Sequence[int], read: Callable[[int], list[_T]]) -> list[list[_T]]:
    """``read(leaf)`` for each leaf, yielding to the event loop every ``SLICE_ITEMS`` items
    read (the tree may take a background refresh in between: a heal's later rounds and root
    checks catch whatever moved, as they do for writes landing between two requests)."""
    out: list[list[_T]] = []
    done = 0
    for leaf in leaves:
        items = read(leaf)
        out.append(items)
        done += len(items) + 1
        if done >= SLICE_ITEMS:
            done = 0
            await asyncio.sleep(0)
    return out


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
        healers: Signers = DEFAULT_HEALERS,
        limiter: RateLimiter | None = None,
        requests: RequestSigner | None = None,
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
        self.trees = {s: ReplicaTree(r, secret) for s, r in replicas.items()}
        self.healers: Signers = healers
        """Who may call (ids, or a callable giving them now: a roster that reloads)."""
        self.limiter = limiter if limiter is not None else RateLimiter(HEAL_RATE, HEAL_BURST)
        """Requests per healer identity (one bucket per signer, shared by every endpoint)."""
        self.requests = requests if requests is not None else RequestSigner(signer, roster)
        """Verifies requests (one replay guard for every endpoint) and signs replies."""
        self.rejected: Counter[tuple[str, str, str]] = Counter()
        """Requests refused as malformed, oversized, unsigned, ..., by ``(subject, verb,
        reason)``; ``reason`` is one of ``HEAL_REFUSALS`` (a bounded label set:
        ``services/worknode/_metrics.py`` exports these counts)."""
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
                        auth=self.requests.endpoint_auth(
                            self.healers, limiter=self.limiter,
                            on_refused=self._refused_by_auth(subject, verb),
                        ),
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
            try:
                reply: bytes = await getattr(self, f"_{verb}")(subject, msg.data)
            except CodecError as exc:  # the caller still gets the error reply
                self.rejected[(subject, verb, reject_reason(exc))] += 1
                raise
            except ResourceExhaustedError:
                self.rejected[(subject, verb, "too_costly")] += 1
                raise
            except VoucherRefusedError as exc:  # a Byzantine repair (see "Vouched repairs")
                self.rejected[(subject, verb, exc.reason)] += 1
                raise
            except ClockSkewError:  # a voucher stamped ahead of this replica's clock
                self.rejected[(subject, verb, "clock_skew")] += 1
                raise
            return reply

        return handle

    def _refused_by_auth(self, subject: str, verb: str) -> Callable[[Msg, BaseException], None]:
        """Counts a request refused before its handler (see ``_refusal_reason``)."""

        def refused(msg: Msg, exc: BaseException) -> None:
            self.rejected[(subject, verb, self._refusal_reason(msg, exc))] += 1

        return refused

    def _refusal_reason(self, msg: Msg, exc: BaseException) -> str:
        """The ``HEAL_REFUSALS`` label of a refused request's error."""
        if isinstance(exc, ReplayedRequestError):
            return "replayed"
        if isinstance(exc, ExpiredRequestError):
            return "expired"
        if isinstance(exc, ResourceExhaustedError):
            return "rate_limited"  # over its rate, or the replay guard full of live requests
        if isinstance(exc, BadSignatureError):
            with contextlib.suppress(CodecError):
                healers = self.healers() if callable(self.healers) else self.healers
                signer = parse_auth((msg.headers or {}).get(AUTH_HEADER)).signer
                if healers is not None and signer not in healers:
                    return "not_healer"
        return reject_reason(exc)

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
        self, subject: str, data: bytes, *, leaf_indices: bool = False, limit: int = MAX_PREFIXES
    ) -> tuple[list[tuple[int, ...]], int, bool, list[int] | None]:
        """``(prefixes, hashBytes, digestsOnly, leaf indices)`` of a node or leaf request;
        with ``leaf_indices``, a packed request for leaves answers with their indices (and no
        prefixes: the cheap form of a large leaf request). More than ``limit`` prefixes is
        more work than one request may ask: ``ResourceExhaustedError``, before any is read."""
        req = self.proto.read(self.proto.schema.healer.NodeHashesRequest, data, "node request")
        with decoding("node request"):
            if len(req.prefixes) > MAX_PREFIXES:
                raise MalformedMessageError(f"more than {MAX_PREFIXES} prefixes in one request")
            level, raw = int(req.prefixLevel), bytes(req.packedPrefixes)
            width, digests_only = int(req.hashBytes), bool(req.digestsOnly)
            tree = self.trees[subject].tree
            bits = tree.fanout.bit_length() - 1
            if level and len(raw) > MAX_PREFIXES * _index_bytes(level, bits):
                raise MalformedMessageError(f"more than {MAX_PREFIXES} prefixes")
            count = len(raw) // _index_bytes(level, bits) if level else len(req.prefixes)
        if count > limit:  # (outside ``decoding``: it would call this malformed)
            raise ResourceExhaustedError(f"more than {limit} prefixes in one request")
        with decoding("node request"):
            if level:
                if leaf_indices and level == tree.depth:
                    return [], width, digests_only, unpack_indices(level, raw, bits, tree.depth)
                prefixes = unpack_prefixes(level, raw, bits, tree.depth)
            else:
                prefixes = [_prefix_tuple(bytes(p)) for p in req.prefixes]
            return prefixes, width, digests_only, None

    async def _nodes(self, subject: str, data: bytes) -> bytes:
        tree = self.trees[subject].current()
        prefixes, packed, _, _ = self._prefixes(
            subject, data, limit=MAX_NODE_VALUES // tree.fanout
        )
        reply = self.proto.schema.healer.NodeHashesReply.new_message()
        reply.subject = subject
        with _refused("node request"):
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
        prefixes, packed, digests_only, indices = self._prefixes(
            subject, data, leaf_indices=True, limit=MAX_LEAVES_PER_REQUEST
        )
        if indices is None:
            # Leaves are asked at leaf level: a shorter prefix would list a whole subtree
            # (16 empty prefixes once cost 8 s of CPU for a 70-byte request).
            indices = [_leaf_index(tree.fanout, tree.depth, p) for p in prefixes]
        if indices and max(indices) >= tree.leaf_count:
            raise MalformedMessageError("a leaf index lies outside the tree")
        reply = self.proto.schema.healer.LeafItemsReply.new_message()
        reply.subject = subject
        if digests_only:
            w = _width(packed)
            parts: list[bytes] = []
            for digests in await _sliced(indices, tree.leaf_digests):
                parts.append(len(digests).to_bytes(4, "big"))
                parts.extend([d[-w:] for d in digests])
            reply.packedItems = b"".join(parts)
            return reply.to_bytes_packed()  # type: ignore[no-any-return]
        found = await _sliced(indices, lambda leaf: tree.leaf_range_items(leaf, leaf + 1))
        if packed:
            reply.packedItems = pack_leaf_items(found, _width(packed))
            return reply.to_bytes_packed()  # type: ignore[no-any-return]
        items = sorted({item for leaf in found for item in leaf})
        out = reply.init("items", len(items))
        for i, (key, digest) in enumerate(items):
            out[i].key = key
            out[i].digest = digest
        return reply.to_bytes_packed()  # type: ignore[no-any-return]

    async def _fetch(self, subject: str, data: bytes) -> bytes:
        req = self.proto.read(self.proto.schema.healer.FetchStatesRequest, data, "fetch")
        with decoding("fetch request"):
            width = _width(int(req.hashBytes))
            count = len(req.keys) + len(req.items) // (4 + width)
        if count > MAX_FETCH_KEYS:
            raise ResourceExhaustedError(f"more than {MAX_FETCH_KEYS} keys in one fetch")
        with decoding("fetch request"):
            keys = [str(k) for k in req.keys]
            raw = bytes(req.items)
        if raw:
            keys += self._resolve(subject, raw, width)
        replica = self.replicas[subject]
        return self.codec.seal(
            self.signer,
            subject=merkle_subject(self.namespace, subject, self.signer.node_id, "fetch"),
            hlc=replica.hlc(),
            sequence=0,
            # Self-describing: a key asked and absent here is named (``Whole(None)``), so a
            # replica handed this reply as a voucher knows which keys this context speaks for.
            document=subset(replica.state, keys, absent=True),
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
        # A voucher: a source replica's own fetch reply, forwarded unchanged by the healer
        # (see "Vouched repairs" in the module doc). Its subject names its source, so it is
        # opened without one and checked against its signer's.
        env = self.codec.open(data, self.roster)
        source = env.writer
        replica = self.replicas[subject]
        healers = self.healers() if callable(self.healers) else self.healers
        if (healers is not None and source in healers) or self.roster.role_of(source) != "node":
            # A healer (or a writer-only key) sealing state itself: the old form of repair,
            # which a stolen healer key would use to silence or wipe writers.
            replica.observer.rejected(subject, "unvouched_repair", source)
            log.warning("repair of %s sealed by %s, not vouched by a replica: refused",
                        subject, source)
            raise VoucherRefusedError("unvouched_repair", source)
        if source == self.signer.node_id:
            raise MalformedMessageError("a repair vouched by this very replica")
        expected = merkle_subject(self.namespace, subject, source, "fetch")
        if env.subject != expected:
            # Another envelope of that node (a delta, a probe, a fetch for another subject)
            # replayed as a voucher.
            replica.observer.rejected(subject, "wrong_subject", source)
            raise BadSignatureError(
                f"envelope sealed for {env.subject!r} replayed as a voucher for {expected!r}"
            )
        document = env.document
        if not isinstance(document, ORMap) or not document.is_delta:
            raise MalformedMessageError("a voucher is an OR-map fetch reply")
        reason = await replica.apply_voucher(
            document, source, env.hlc, max_age_s=VOUCHER_MAX_AGE_S
        )
        if reason == "clock_skew":
            raise ClockSkewError(f"{source}'s voucher is stamped ahead of this clock")
        if reason == "expired":
            raise ExpiredRequestError(
                f"{source}'s voucher is older than {VOUCHER_MAX_AGE_S:.0f} s: fetch again")
        if reason is not None:
            raise VoucherRefusedError(reason, source)
        tree = self.trees[subject].current()
        reply = self.proto.schema.healer.ApplyStatesReply.new_message()
        reply.subject = subject
        reply.root = tree.root()
        reply.applied = len(document.store or {})
        return reply.to_bytes_packed()  # type: ignore[no-any-return]


class VoucherRefusedError(WorknodeError):
    """A repair refused as Byzantine: sealed by a healer (``unvouched_repair``: a healer
    never vouches for state), or its source replica's voucher holds what that replica
    cannot vouch for (a ``BYZANTINE_REASONS`` member of ``relayed``). Travels as
    ``PERMISSION_DENIED``: the healer names the source (``reason``, ``source``) as suspect;
    retrying the same voucher fails again."""

    code = StatusCode.PERMISSION_DENIED

    def __init__(self, reason: str, source: str) -> None:
        super().__init__(f"repair refused ({reason}): {source} does not vouch for it")
        self.reason = reason
        self.source = source
