"""The subject layout contract: builders, validation, wildcard matching."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidArgumentError, InvalidSubjectError
from broker.transport import (
    KINDS,
    MAX_SUBJECT_BYTES,
    MAX_TOKEN_LENGTH,
    SubjectParts,
    delta_subject,
    heal_subject,
    namespace_wildcard,
    parse_subject,
    rpc_subject,
    subject_matches,
    sync_subject,
    validate_pattern,
    validate_subject,
    validate_token,
    wildcard,
)

TOKEN_CHARS = "abcXYZ019_-"
ALLOWED = string.ascii_letters + string.digits + "_-"


@pytest.mark.parametrize("token", ["a", "Z", "0", "_", "-", "orders", "a-b_C9", "x" * 64])
def test_valid_tokens_are_returned_unchanged(token):
    assert validate_token(token) == token


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("", "empty"),
        ("x" * (MAX_TOKEN_LENGTH + 1), "at most 64"),
        ("*", "wildcard '*'"),
        (">", "wildcard '>'"),
        ("a*", "wildcard"),
        ("a.b", "separator"),
        (".", "separator"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\nb", "whitespace"),
        ("a\x00b", "control"),
        ("a\x7fb", "control"),
        ("é", "character 'é'"),
        ("$SYS", "character '$'"),
        ("a/b", "character '/'"),
    ],
)
def test_invalid_tokens_are_refused_saying_why(token, fragment):
    with pytest.raises(InvalidSubjectError, match="invalid namespace") as info:
        validate_token(token, "namespace")
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_non_text_tokens_are_refused(value):
    with pytest.raises(InvalidSubjectError, match="must be a str"):
        validate_token(value)


def test_invalid_subject_error_is_an_invalid_argument():
    with pytest.raises(InvalidArgumentError):
        validate_token("a.b")
    with pytest.raises(ValueError, match="invalid"):
        validate_subject("a..b")


def test_builders_put_namespace_first_and_ids_last():
    assert delta_subject("prod", "orders") == "wn.prod.delta.orders"
    assert sync_subject("prod", "orders") == "wn.prod.sync.orders"
    assert heal_subject("prod", "orders") == "wn.prod.heal.orders"
    assert rpc_subject("prod", "tree", "move") == "wn.prod.rpc.tree.move"
    assert wildcard("prod", "delta") == "wn.prod.delta.>"
    assert wildcard("prod", "sync", tail="*") == "wn.prod.sync.*"
    assert namespace_wildcard("prod") == "wn.prod.>"


@pytest.mark.parametrize(
    "build",
    [
        lambda bad: delta_subject(bad, "s"),
        lambda bad: delta_subject("ns", bad),
        lambda bad: sync_subject("ns", bad),
        lambda bad: heal_subject("ns", bad),
        lambda bad: rpc_subject("ns", bad, "m"),
        lambda bad: rpc_subject("ns", "svc", bad),
        lambda bad: wildcard(bad, "delta"),
        lambda bad: namespace_wildcard(bad),
    ],
)
@pytest.mark.parametrize("bad", ["", "*", ">", "a.b", "a b", "a\r\nPUB x 1"])
def test_builders_refuse_every_invalid_token(build, bad):
    with pytest.raises(InvalidSubjectError):
        build(bad)


def test_wildcard_refuses_unknown_kind_and_tail():
    with pytest.raises(InvalidSubjectError, match="kind"):
        wildcard("ns", "deltas")
    with pytest.raises(InvalidSubjectError, match="tail"):
        wildcard("ns", "delta", tail="x")  # type: ignore[arg-type]


def test_one_wildcard_covers_a_namespace_or_a_kind():
    subjects = [
        delta_subject("ns", "a"),
        sync_subject("ns", "a"),
        heal_subject("ns", "b"),
        rpc_subject("ns", "svc", "m"),
    ]
    assert all(subject_matches(namespace_wildcard("ns"), s) for s in subjects)
    assert not subject_matches(namespace_wildcard("ns"), delta_subject("other", "a"))
    deltas = [s for s in subjects if subject_matches(wildcard("ns", "delta"), s)]
    assert deltas == ["wn.ns.delta.a"]
    assert subject_matches(wildcard("ns", "rpc"), "wn.ns.rpc.svc.m")
    assert not subject_matches(wildcard("ns", "rpc", tail="*"), "wn.ns.rpc.svc.m")
    assert subject_matches("wn.*.heal.b", heal_subject("any", "b"))


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a.b", "a", False),
        ("a", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*.*.>", "a.b", False),
        ("*.*.>", "a.b.c", True),
    ],
)
def test_subject_matches_follows_nats_rules(pattern, subject, expected):
    assert subject_matches(pattern, subject) is expected


@pytest.mark.parametrize(
    "subject", ["a", "a.b.c", "$SRV.PING", "_INBOX.abc.def", "é.ü", "a-b_c", "x" * 256]
)
def test_valid_subjects(subject):
    assert validate_subject(subject) == subject
    assert validate_pattern(subject) == subject


@pytest.mark.parametrize(
    "subject",
    [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "a.*",
        "a.>",
        "*",
        ">",
        "a*.b",
        "a>",
        "a b",
        "a\tb",
        "a\r\nb",
        "a\x00",
        "a\u3000b",
        "x" * 257,
        "é" * 129,
        "\ud800",
    ],
)
def test_invalid_subjects_are_refused(subject):
    with pytest.raises(InvalidSubjectError):
        validate_subject(subject)


@pytest.mark.parametrize("pattern", ["a.*", "a.>", "*", ">", "*.*.>", "a.*.c"])
def test_valid_patterns(pattern):
    assert validate_pattern(pattern) == pattern
    with pytest.raises(InvalidSubjectError):
        validate_subject(pattern)


@pytest.mark.parametrize(
    "pattern", ["", "a.>.b", ">.a", "a.**", "a.*b", "a.b>", "a..>", "a. *", "a.>\n"]
)
def test_invalid_patterns_are_refused(pattern):
    with pytest.raises(InvalidSubjectError):
        validate_pattern(pattern)


def test_size_limit_counts_utf8_bytes():
    assert validate_subject("é" * 128) == "é" * 128  # 256 bytes
    with pytest.raises(InvalidSubjectError, match=f"at most {MAX_SUBJECT_BYTES}"):
        validate_subject("é" * 128 + "a")


@pytest.mark.parametrize(
    ("subject", "parts"),
    [
        ("wn.ns.delta.s1", SubjectParts("ns", "delta", ("s1",))),
        ("wn.ns.sync.s1", SubjectParts("ns", "sync", ("s1",))),
        ("wn.ns.heal.s1", SubjectParts("ns", "heal", ("s1",))),
        ("wn.ns.rpc.svc.m", SubjectParts("ns", "rpc", ("svc", "m"))),
    ],
)
def test_parse_subject_inverts_the_builders(subject, parts):
    assert parse_subject(subject) == parts


@pytest.mark.parametrize(
    "subject",
    [
        "wn.ns.delta",
        "xx.ns.delta.s",
        "wn.ns.other.s",
        "wn.ns.delta.a.b",
        "wn.ns.rpc.svc",
        "wn.n$.delta.s",
    ],
)
def test_parse_subject_refuses_what_breaks_the_layout(subject):
    with pytest.raises(InvalidSubjectError):
        parse_subject(subject)


@given(st.one_of(st.text(max_size=80), st.text(alphabet=ALLOWED + ".*> \t\n\x00é", max_size=70)))
def test_random_text_is_a_valid_token_or_refused(text):
    should_pass = 0 < len(text) <= MAX_TOKEN_LENGTH and set(text) <= set(ALLOWED)
    try:
        token = validate_token(text)
    except InvalidSubjectError:
        assert not should_pass
        return
    assert should_pass
    assert token == text
    subject = delta_subject(token, token)
    assert validate_subject(subject) == subject
    assert parse_subject(subject) == SubjectParts(token, "delta", (token,))


@given(st.one_of(st.text(max_size=300), st.text(alphabet="ab.é*> \t", max_size=300)))
def test_random_text_is_a_valid_subject_or_refused(text):
    try:
        subject = validate_subject(text)
    except InvalidSubjectError:
        return
    assert subject == text
    tokens = subject.split(".")
    assert all(tokens)
    assert ".".join(tokens) == subject
    assert not any(c in subject for c in "*> \t\r\n\x00")
    assert len(subject.encode()) <= MAX_SUBJECT_BYTES
    assert validate_pattern(subject) == subject
    assert subject_matches(subject, subject)


@given(st.text(alphabet="ab.*> ", max_size=12))
def test_random_patterns_are_valid_or_refused(text):
    try:
        pattern = validate_pattern(text)
    except InvalidSubjectError:
        return
    tokens = pattern.split(".")
    assert all(
        t == "*" or t == ">" or ("*" not in t and ">" not in t and " " not in t) for t in tokens
    )
    assert ">" not in tokens[:-1]


@given(
    st.lists(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=4), min_size=1, max_size=5),
    st.data(),
)
def test_patterns_from_a_subject_match_it(tokens, data):
    subject = ".".join(tokens)
    pattern = [data.draw(st.sampled_from([t, "*"])) for t in tokens]
    cut = data.draw(st.integers(0, len(tokens) - 1))
    with_tail = ".".join([*pattern[:cut], ">"])
    assert subject_matches(".".join(pattern), subject)
    assert subject_matches(with_tail, subject)
    assert not subject_matches(".".join([*pattern, "x"]), subject)


def test_every_kind_has_a_builder():
    assert set(KINDS) == {"delta", "sync", "heal", "rpc", "merkle"}
