"""NATS identities (broker/transport/_auth.py): the nkey encoding is the signing key, the
permissions of each role exactly as the contract says (a widening fails here), and the
rendered accounts block is accepted by a real nats-server (``nats-server -t``)."""

from __future__ import annotations

import hashlib
import subprocess

import nkeys
import pytest
from nacl.signing import VerifyKey

from broker.codec import Signer
from broker.errors import InvalidArgumentError
from broker.healing._wire import REPLICA_SERVICE
from broker.rpc._server import RPC_SERVICE
from broker.transport import (
    NatsIdentity,
    Permissions,
    Role,
    dump_identities,
    find_nats_server,
    inbox_prefix,
    load_identities,
    nkey_public,
    nkey_seed,
    permissions,
    public_of_nkey,
    render_accounts,
    validate_token,
)
from broker.transport._auth import (
    EVIDENCE_REPLIES,
    MICRO_SERVICES,
    QUEUE_GROUP,
    strong_stream_name,
)
from broker.transport._micro import QUEUE_GROUP as MICRO_QUEUE_GROUP

SEED = bytes(range(32))


def identity(name: str, role: str, *subjects: str, ns: str = "ns") -> NatsIdentity:
    seed = hashlib.sha256(name.encode()).digest()  # one key per name
    return NatsIdentity(name, Role(role), Signer(name, seed).public_key, ns, subjects)


# -- nkeys: the NATS user is the signing key --------------------------------------------------


def test_the_nkey_user_is_the_signing_key() -> None:
    signer = Signer("n1", SEED)
    seed_text = nkey_seed(SEED)
    assert seed_text.startswith("SU")
    user = nkey_public(signer.public_key)
    assert user.startswith("U")
    assert len(user) == 56
    # nkeys (the library nats-py signs the server's nonce with) derives the same user.
    assert nkeys.from_seed(seed_text.encode()).public_key.decode() == user
    assert public_of_nkey(user) == signer.public_key


def test_a_signature_made_with_the_nkey_verifies_with_the_roster_key() -> None:
    signer = Signer("n1", SEED)
    signature = nkeys.from_seed(nkey_seed(SEED).encode()).sign(b"nonce")
    VerifyKey(signer.public_key).verify(b"nonce", signature)


@pytest.mark.parametrize("seed", [b"", b"x" * 31, b"x" * 33])
def test_a_seed_of_the_wrong_size_is_refused(seed: bytes) -> None:
    with pytest.raises(InvalidArgumentError):
        nkey_seed(seed)
    with pytest.raises(InvalidArgumentError):
        nkey_public(seed)


def _bad_nkeys() -> list[tuple[str, str]]:
    user = nkey_public(Signer("n1", SEED).public_key)
    flipped = user[:10] + ("A" if user[10] != "A" else "B") + user[11:]
    account = nkeys.from_seed(nkeys.encode_seed(SEED, nkeys.PREFIX_BYTE_ACCOUNT)).public_key
    return [
        ("flipped", flipped),
        ("truncated", user[:-1]),
        ("longer", user + "A"),
        ("seed", nkey_seed(SEED)),
        ("account", account.decode()),
        ("lowercase", user.lower()),
        ("not base32", "U" + "1" * 55),
        ("empty", ""),
    ]


@pytest.mark.parametrize(("what", "text"), _bad_nkeys(), ids=[w for w, _ in _bad_nkeys()])
def test_a_bad_nkey_is_refused_without_echoing_it(what: str, text: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        public_of_nkey(text)
    if text:
        assert text not in str(info.value)


def test_inbox_prefix_is_the_public_nkey() -> None:
    key = identity("n1", "node").public_key
    assert inbox_prefix(key) == f"_INBOX.{nkey_public(key)}"
    assert identity("n1", "node").inbox == inbox_prefix(key)
    validate_token(inbox_prefix(key).split(".")[1])  # one subject token
    assert inbox_prefix(key) != identity("n2", "node").inbox
    for bad in (b"", b"x" * 31, "n1"):
        with pytest.raises(InvalidArgumentError):
            inbox_prefix(bad)  # type: ignore[arg-type]


# -- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a.b"},
        {"name": ">"},
        {"namespace": "*"},
        {"role": "root"},
        {"public_key": b"x" * 31},
        {"subjects": ("a", "a")},
        {"subjects": ("a.>",)},
        {"role": "admin", "subjects": ("a",)},
    ],
)
def test_a_bad_identity_is_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "n1", "role": "node", "public_key": b"k" * 32,
                                 "namespace": "ns", "subjects": ()}
    fields.update(kwargs)
    with pytest.raises(InvalidArgumentError):
        NatsIdentity(**fields)  # type: ignore[arg-type]


def test_identities_round_trip_through_their_file_format() -> None:
    ids = [identity("n1", "node"), identity("r", "reader", "b", "a", ns="other")]
    text = dump_identities(ids)
    assert load_identities(text) == {i.name: i for i in ids}
    assert load_identities(text)["r"].subjects == ("a", "b")


@pytest.mark.parametrize(
    "text",
    ["[]", "not json", '{"n1": {"role": "node"}}',
     '{"n1": {"role": "boss", "namespace": "ns", "public_key": "' + "00" * 32 + '"}}',
     '{"n1": {"role": "node", "namespace": "ns", "public_key": "zz"}}',
     '{"n1": 3}'],
)
def test_a_bad_identities_file_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        load_identities(text)


# -- permissions per role: exact, so a widening fails ----------------------------------------


MICRO = [
    "$SRV.PING", "$SRV.INFO", "$SRV.STATS",
    "$SRV.PING.worknode-replica", "$SRV.PING.worknode-replica.*",
    "$SRV.INFO.worknode-replica", "$SRV.INFO.worknode-replica.*",
    "$SRV.STATS.worknode-replica", "$SRV.STATS.worknode-replica.*",
    "$SRV.PING.worknode-rpc", "$SRV.PING.worknode-rpc.*",
    "$SRV.INFO.worknode-rpc", "$SRV.INFO.worknode-rpc.*",
    "$SRV.STATS.worknode-rpc", "$SRV.STATS.worknode-rpc.*",
]

N1_INBOX = identity("n1", "node").inbox


def strong_log(*subjects: str) -> tuple[str, ...]:
    """A STRONG log writer's publish permissions for ``subjects`` (none: a wildcard grant,
    every stream's API): its entries and the API of its streams, exactly."""
    streams = [strong_stream_name("ns", s) for s in subjects] or ["*"]
    out = [f"wn.ns.strong.{s}.>" for s in subjects or ("*",)]
    for st in streams:
        out += [f"$JS.API.STREAM.INFO.{st}", f"$JS.API.STREAM.CREATE.{st}",
                f"$JS.API.STREAM.UPDATE.{st}", f"$JS.API.STREAM.MSG.GET.{st}",
                f"$JS.API.CONSUMER.CREATE.{st}", f"$JS.API.CONSUMER.CREATE.{st}.>",
                f"$JS.API.CONSUMER.DELETE.{st}.*", f"$JS.API.CONSUMER.INFO.{st}.*",
                f"$JS.FC.{st}.>"]
    return tuple(out)

EXPECTED = {
    ("node", ()): Permissions(
        publish_allow=("wn.ns.delta.*", "wn.ns.sync.*", "wn.ns.rpc.*.*", *strong_log()),
        subscribe_allow=("wn.ns.delta.*", "wn.ns.sync.*", "wn.ns.rpc.*.* q",
                         "wn.ns.merkle.*.n1.* q", *MICRO, f"{N1_INBOX}.>"),
        allow_responses=4 + EVIDENCE_REPLIES,
    ),
    ("node", ("a", "b")): Permissions(
        publish_allow=("wn.ns.delta.a", "wn.ns.delta.b", "wn.ns.sync.a", "wn.ns.sync.b",
                       "wn.ns.rpc.a.*", "wn.ns.rpc.b.*", *strong_log("a", "b")),
        subscribe_allow=("wn.ns.delta.a", "wn.ns.delta.b", "wn.ns.sync.a", "wn.ns.sync.b",
                         "wn.ns.rpc.a.* q", "wn.ns.rpc.b.* q",
                         "wn.ns.merkle.a.n1.* q", "wn.ns.merkle.b.n1.* q", *MICRO,
                         f"{N1_INBOX}.>"),
        allow_responses=4 + EVIDENCE_REPLIES,
    ),
    ("healer", ()): Permissions(
        publish_allow=("wn.ns.merkle.*.*.*", "$SRV.INFO.worknode-replica", "wn.ns.heal.*"),
        subscribe_allow=(f"{N1_INBOX}.>",),
    ),
    ("writer", ("a",)): Permissions(
        publish_allow=("wn.ns.delta.a", "wn.ns.sync.a", *strong_log("a")),
        subscribe_allow=("wn.ns.delta.a", "wn.ns.sync.a", f"{N1_INBOX}.>"),
        allow_responses=1,
    ),
    ("writer", ()): Permissions(
        publish_allow=("wn.ns.delta.*", "wn.ns.sync.*", *strong_log()),
        subscribe_allow=("wn.ns.delta.*", "wn.ns.sync.*", f"{N1_INBOX}.>"),
        allow_responses=1,
    ),
    ("reader", ("a",)): Permissions(
        publish_deny=(">",), subscribe_allow=("wn.ns.delta.a", "wn.ns.heal.a"),
    ),
    ("caller", ("a",)): Permissions(
        publish_allow=("wn.ns.rpc.a.*",), subscribe_allow=(f"{N1_INBOX}.>",),
    ),
    ("admin", ()): Permissions(publish_allow=(">",), subscribe_allow=(">",)),
}


@pytest.mark.parametrize(("role", "subjects"), list(EXPECTED), ids=str)
def test_the_permissions_of_each_role_are_exactly_the_contract(
    role: str, subjects: tuple[str, ...]
) -> None:
    assert permissions(identity("n1", role, *subjects)) == EXPECTED[role, subjects]


def test_every_role_has_its_permissions_checked() -> None:
    assert {role for role, _ in EXPECTED} == set(Role)


def test_only_nodes_serve_and_only_the_healer_repairs() -> None:
    """The invariants the tests against a real server check, here over every role."""
    for role in Role:
        if role is Role.ADMIN:
            continue
        p = permissions(identity("x", role))
        subs = " ".join(p.subscribe_allow)
        if role is not Role.NODE:
            assert ".merkle." not in subs
            assert ".rpc." not in subs
            assert "$SRV" not in subs
            if role is not Role.WRITER:
                assert ".sync." not in subs
        if role is not Role.HEALER:
            assert not any(".merkle." in s for s in p.publish_allow)
        assert not any(s.startswith("_INBOX") for s in p.publish_allow)
        assert all(s.startswith(f"{identity('x', role).inbox}.") for s in p.subscribe_allow
                   if "_INBOX" in s)
        # every non-admin role either lists what it may publish or may publish nothing
        assert p.publish_allow or p.publish_deny == (">",)


def test_the_service_names_and_queue_group_are_the_ones_the_code_uses() -> None:
    assert set(MICRO_SERVICES) == {REPLICA_SERVICE, RPC_SERVICE}
    assert QUEUE_GROUP == MICRO_QUEUE_GROUP


# -- the accounts block ----------------------------------------------------------------------


def every_role() -> list[NatsIdentity]:
    return [identity("n1", "node"), identity("n2", "node", "a", ns="other"),
            identity("h", "healer"), identity("w", "writer", "a"),
            identity("rd", "reader", "a", "b"), identity("cl", "caller"),
            identity("adm", "admin")]


def server_accepts(tmp_path, text: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "test.conf"
    conf.write_text(f"port: -1\njetstream {{ store_dir: {str(tmp_path / 'js')!r} }}\n{text}")
    return subprocess.run([str(find_nats_server()), "-c", str(conf), "-t"],
                          capture_output=True, text=True, timeout=30, check=False)


def test_nats_server_accepts_the_rendered_accounts(tmp_path) -> None:
    ids = every_role()
    text = render_accounts(ids, account="WN")
    result = server_accepts(tmp_path, text)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in ids:
        assert text.count(f"nkey: \"{i.nkey}\"") == 1  # (its inbox names it too)
    assert "WN: {" in text
    assert "jetstream: enabled" in text
    assert "jetstream" not in render_accounts(ids, jetstream=False)


def test_the_config_check_can_fail(tmp_path) -> None:
    """The check above means something: a broken block is refused."""
    text = render_accounts(every_role()).replace("allow_responses: true", "allow_responses: [")
    assert "allow_responses: [" in text
    assert server_accepts(tmp_path, text).returncode != 0


@pytest.mark.parametrize(
    ("ids", "account"),
    [
        ([], "WORKNODE"),
        ([identity("n1", "node"), identity("n1", "reader", ns="b")], "WORKNODE"),
        ([identity("n1", "node"),
          NatsIdentity("n2", Role.NODE, identity("n1", "node").public_key, "ns")], "WORKNODE"),
        ([identity("n1", "node")], "A B"),
    ],
    ids=["empty", "same name", "same key", "bad account"],
)
def test_render_refuses_what_would_open_or_break_the_server(
    ids: list[NatsIdentity], account: str
) -> None:
    with pytest.raises(InvalidArgumentError):
        render_accounts(ids, account=account)
