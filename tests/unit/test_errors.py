"""One error tree: every worknode error derives from ``WorknodeError``, carries its status
code, says when it is raised and what to do, timeouts are ``TimeoutError``s, and nothing in the
code recognises an error by its message text (an AST check, with a case proving it flags)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import broker.errors
import broker.rpc
import broker.transport
from broker.codec import WireCodec
from broker.errors import (
    CallDepthExceededError,
    ResourceExhaustedError,
    StatusCode,
    WorknodeError,
    error_for,
)
from broker.rpc._protocol import (
    REASON_KEY,
    Response,
    check_depth,
    decode_response,
    encode_response,
    error_of,
    error_response,
)

ROOT = Path(__file__).resolve().parents[2]


def _tree() -> list[type[WorknodeError]]:
    """Every class of the tree that broker defines (walked from the root, so a new class
    anywhere in broker is covered once its module is imported)."""
    import broker.healing
    import broker.healing._endpoints  # broker.healing loads it lazily
    import broker.replica
    import broker.store  # noqa: F401 -- import for their subclasses

    out: list[type[WorknodeError]] = []
    todo: list[type[WorknodeError]] = [WorknodeError]
    while todo:
        cls = todo.pop()
        if cls not in out:
            out.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(
        (c for c in out if c.__module__.startswith("broker")), key=lambda c: c.__qualname__
    )


TREE = _tree()


def test_the_tree_is_found() -> None:
    names = {c.__name__ for c in TREE}
    assert {"WorknodeError", "RpcError", "CallDepthExceededError", "ServiceCallError",
            "TransportTimeoutError", "CodecError"} <= names


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_every_error_has_a_docstring_and_a_status(cls: type[WorknodeError]) -> None:
    doc = cls.__dict__.get("__doc__")
    assert doc, f"{cls.__name__} has no docstring"
    assert len(doc.split()) >= 6, f"{cls.__name__} says when it is raised and what to do"
    assert isinstance(cls.code, StatusCode)
    assert cls.code is not StatusCode.OK
    assert isinstance(cls.retriable, bool)


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_timeouts_are_builtin_timeouts_and_retriable(cls: type[WorknodeError]) -> None:
    if issubclass(cls, TimeoutError) or cls.code is StatusCode.DEADLINE_EXCEEDED:
        assert issubclass(cls, TimeoutError)
        assert cls.code is StatusCode.DEADLINE_EXCEEDED
        assert cls.retriable


@pytest.mark.parametrize("cls", [c for c in TREE if c.__dict__.get("retriable") is True],
                         ids=lambda c: c.__name__)
def test_retriable_errors_say_so(cls: type[WorknodeError]) -> None:
    assert "retr" in (cls.__doc__ or "").lower()


def test_invalid_input_is_a_value_error_and_missing_things_lookup_errors() -> None:
    for cls in TREE:
        if cls.code is StatusCode.NOT_FOUND:
            assert issubclass(cls, LookupError), cls
        if issubclass(cls, broker.errors.InvalidArgumentError):
            assert issubclass(cls, ValueError), cls


def test_rpc_names_are_the_error_tree_s() -> None:
    shared = set(broker.rpc.__all__) & set(broker.errors.__all__)
    assert {"StatusCode", "RpcError", "CallDepthExceededError", "error_for"} <= shared
    for name in shared:
        assert getattr(broker.rpc, name) is getattr(broker.errors, name)
    assert issubclass(broker.rpc.RpcInvalidArgumentError, broker.errors.InvalidArgumentError)
    assert issubclass(broker.rpc.ResourceExhaustedError, broker.errors.BoundsError)


@pytest.mark.parametrize(("http", "code"), [("400", StatusCode.INVALID_ARGUMENT),
                                            ("503", StatusCode.UNAVAILABLE),
                                            ("599", StatusCode.INTERNAL)])
def test_service_errors_carry_the_status_of_their_http_code(http: str, code: StatusCode) -> None:
    err = broker.transport.ServiceCallError(http, "why")
    assert (err.code, err.http_code, err.retriable) == (code, http, http.startswith("5"))
    assert broker.transport.ErrorReply(http, "why").code is code


def test_micro_endpoints_answer_with_the_error_s_own_code() -> None:
    from broker.transport._micro import error_code

    assert error_code(broker.errors.BadSignatureError("x")) == "401"
    assert error_code(broker.errors.MessageTooLargeError("x")) == "429"
    assert error_code(broker.errors.InvalidKeyError("x")) == "400"
    assert error_code(RuntimeError("a bug")) == "500"


_REASONS = st.sampled_from(["", "call_depth", "no-such-reason"])


@given(code=st.sampled_from([c for c in StatusCode if c is not StatusCode.OK]),
       message=st.text(max_size=40) | st.sampled_from(["call depth 9", "call depth"]),
       reason=_REASONS)
def test_the_exception_depends_on_status_and_reason_never_on_the_message(
    code: StatusCode, message: str, reason: str
) -> None:
    exc = error_for(code, message, reason=reason)
    assert type(exc) is type(error_for(code, "", reason=reason))
    assert exc.code is code
    assert exc.message == message
    assert isinstance(exc, CallDepthExceededError) == (
        code is StatusCode.RESOURCE_EXHAUSTED and reason == "call_depth"
    )


@pytest.mark.parametrize("message", ["call depth 9 exceeds MAX_CALL_DEPTH=8", "", "anything"])
def test_a_depth_refusal_is_recognised_on_the_wire_by_its_reason(message: str) -> None:
    codec = WireCodec()
    with pytest.raises(CallDepthExceededError) as info:
        check_depth(99)
    sent = error_response(info.value, message, b"t" * 16)
    assert sent.result == {REASON_KEY: "call_depth"}
    got = error_of(decode_response(codec, encode_response(codec, sent)))
    assert type(got) is CallDepthExceededError
    assert (got.message, got.trace_id, got.retriable) == (message, b"t" * 16, False)
    # The same status without the reason (an older server) is the status's own class.
    plain = Response(StatusCode.RESOURCE_EXHAUSTED, "call depth 9 exceeds")
    assert type(error_of(decode_response(codec, encode_response(codec, plain)))) is (
        ResourceExhaustedError
    )


def test_a_reason_that_is_not_text_is_ignored() -> None:
    r = Response(StatusCode.RESOURCE_EXHAUSTED, "m", result={REASON_KEY: 1})
    assert type(error_of(r)) is ResourceExhaustedError


def test_errors_without_a_reason_send_none() -> None:
    sent = error_response(broker.errors.InvalidKeyError("bad key"), "bad key")
    assert (sent.status, sent.result) == (StatusCode.INVALID_ARGUMENT, {})


# -- nothing recognises an error by its message text -----------------------------------------

_TEXT_ATTRS = frozenset({"args", "message", "description"})
_TEXT_NAMES = frozenset({"message", "description"})
_MATCHERS = frozenset({"startswith", "endswith", "find", "index", "count", "search", "match",
                       "fullmatch", "findall"})

ALLOWED: dict[tuple[str, str], str] = {
    ("broker/codec/_wire.py", "decoding"): (
        "pycapnp's KjException carries only text: its type is FAILED for a traversal limit, a "
        "nesting limit and malformed bytes alike; this is the boundary that maps it to types"
    ),
    ("broker/transport/_nats.py", "_refusal"): (
        "nats-py turns the server's -ERR lines (authorization violation, user authentication "
        "expired or revoked, secure connection required) into nats.errors.Error carrying only "
        "the text; this is the boundary that maps them to ConnectionRefusedByServerError"
    ),
}
"""(file, function) -> why matching the text of a third-party exception cannot be avoided."""


def _is_exc_type(ann: ast.expr | None) -> bool:
    if ann is None:
        return False
    text = ast.unparse(ann)
    return any(t.endswith(("Error", "Exception")) for t in text.replace("|", " ").split())


def _text_of(node: ast.AST, excs: set[str], texts: set[str]) -> bool:
    """Whether ``node`` is (derived from) an error's message text."""
    if isinstance(node, ast.Name):
        return node.id in texts or node.id in _TEXT_NAMES
    if isinstance(node, ast.Attribute):
        if node.attr in _TEXT_ATTRS:
            return True
        return _text_of(node.value, excs, texts)
    if isinstance(node, ast.Subscript):
        return _text_of(node.value, excs, texts)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("str", "repr", "format") and node.args:
            a = node.args[0]
            return (isinstance(a, ast.Name) and a.id in excs) or _text_of(a, excs, texts)
        if isinstance(f, ast.Attribute):
            return _text_of(f.value, excs, texts)
        return False
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
                   and v.value.id in excs for v in node.values)
    return False


def _scopes(tree: ast.AST) -> Iterator[tuple[str, ast.AST, set[str]]]:
    """(enclosing function, node, exception names bound there): every except handler with a
    name, and every function taking a parameter annotated as an exception."""
    enclosing: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                enclosing[n] = fn.name  # inner functions are walked later: innermost wins
            params = {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)
                      if _is_exc_type(a.annotation)}
            if params:
                yield fn.name, fn, params
    # Everywhere: a ``message``/``description`` name or attribute, or ``.args``, of anything
    # (the old RPC ``error_for`` read a status's message this way).
    for node in ast.walk(tree):
        if isinstance(node, (ast.Compare, ast.Call)):
            yield enclosing.get(node, "<module>"), node, set()
    for h in ast.walk(tree):
        if isinstance(h, ast.ExceptHandler) and h.name:
            yield enclosing.get(h, "<module>"), h, {h.name}


def message_matches(source: str) -> list[tuple[str, int, str]]:
    """(function, line, code) of each comparison or pattern match on an error's message."""
    tree = ast.parse(source)
    found: set[tuple[str, int, str]] = set()
    for fname, scope, excs in _scopes(tree):
        texts: set[str] = set()
        for node in ast.walk(scope):  # names holding message text: text = str(exc)...
            if isinstance(node, ast.Assign) and _text_of(node.value, excs, texts):
                texts.update(t.id for t in node.targets if isinstance(t, ast.Name))
        for node in ast.walk(scope):
            hit = False
            if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.In, ast.NotIn, ast.Eq, ast.NotEq)) for op in node.ops
            ):
                hit = any(_text_of(x, excs, texts) for x in (node.left, *node.comparators))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr in _MATCHERS
            ):
                hit = _text_of(node.func.value, excs, texts) or any(
                    _text_of(a, excs, texts) for a in node.args[1:2]  # re.search(p, text)
                )
            if hit:
                found.add((fname, getattr(node, "lineno", 0), ast.unparse(node)))
    return sorted(found)


def _sources() -> list[Path]:
    return sorted(p for d in ("broker", "services") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_error_is_recognised_by_its_message(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    bad = [m for m in message_matches(path.read_text()) if (rel, m[0]) not in ALLOWED]
    assert not bad, f"{rel} matches error text (use the type or its code): {bad}"


def test_the_allowed_exceptions_still_exist() -> None:
    for (rel, fname), why in ALLOWED.items():
        hits = [m for m in message_matches((ROOT / rel).read_text()) if m[0] == fname]
        assert why
        assert hits, f"{rel}:{fname} no longer matches text: drop it from ALLOWED"


@pytest.mark.parametrize("source", [
    # the old RPC error_for: a depth refusal recognised by the opening words of its message
    "def error_for(code, message):\n"
    "    if code == 3 and message.startswith(DEPTH_MESSAGE):\n        return 1\n",
    "try:\n    f()\nexcept ValueError as e:\n    if 'call depth' in str(e):\n        raise\n",
    "try:\n    f()\nexcept ValueError as exc:\n    text = str(exc).lower()\n"
    "    if text == 'x':\n        pass\n",
    "def f(exc: BaseException) -> bool:\n    return re.search('limit', str(exc)) is not None\n",
    "def f(r):\n    return r.message == 'stopping'\n",
    "try:\n    f()\nexcept E as e:\n    ok = e.args[0].endswith('!')\n",
])
def test_the_checker_flags_matching_on_message_text(source: str) -> None:
    assert message_matches(source)


@pytest.mark.parametrize("source", [
    "try:\n    f()\nexcept ValueError as e:\n    raise X(f'bad: {e}') from e\n",
    "try:\n    f()\nexcept ValueError as e:\n    if e.code is C.OK:\n        pass\n",
    "def f(exc: BaseException) -> str:\n    return str(exc) if str(exc) else 'x'\n",
])
def test_the_checker_passes_typed_handling(source: str) -> None:
    assert not message_matches(source)


def test_every_error_class_in_broker_is_in_the_one_tree() -> None:
    # A class whose base is an exception but not WorknodeError would start a second tree.
    names = {c.__name__ for c in TREE}
    stray = []
    for path in sorted((ROOT / "broker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases
            ) and node.name not in names:
                stray.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not stray, f"exceptions outside WorknodeError: {stray}"
