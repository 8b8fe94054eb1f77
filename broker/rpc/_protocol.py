"""The RPC protocol, pure: request and response bodies, bounds, deadlines and call depth.

Bodies are the Cap'n Proto structs ``RpcRequest`` / ``RpcResponse`` of ``schemas/rpc.capnp``,
packed. Invariants:

- Nothing here reads a clock: every time is an argument (milliseconds on a monotonic clock
  for deadlines), so deadline logic is tested without sleeping.
- Deadlines are relative on the wire (``deadlineMs``: time left when the request was sent),
  never absolute, so callers and servers need no synchronized clocks. Each hop passes on the
  time *remaining* when it calls, never the original deadline, and never more than
  ``MAX_RPC_TIMEOUT_MS``.
- ``callDepth`` is 0 for a call from outside and grows by one at each hop; a request deeper
  than ``MAX_CALL_DEPTH`` is refused, so a recursive chain ends.
- Every decode failure is an ``RpcInvalidArgumentError`` (bad bytes) or a
  ``FailedPreconditionError`` (a wire version the server does not support): a caller can act
  on both, and a server answers them and carries on.
- An error response carries its status and a human-readable message; when the error's class
  has a ``reason`` (``CallDepthExceededError``), its ``result`` holds ``reason`` = that token
  (``error_response`` / ``error_of``). Clients pick the exception by status and reason, never
  by the message text. Older readers ignore the result of an error and still see the status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import capnp

from broker.codec import NESTING_LIMIT, OLDEST_VERSION, WireCodec, decoding
from broker.codec._document import decode_document, encode_document
from broker.codec._packed import check_segments
from broker.crdt import MAX_VALUE_BYTES, OpaqueAtom, ORMap, validate_atom
from broker.errors import (
    CallDepthExceededError,
    CodecError,
    ConflictError,
    DeadlineExceededError,
    FailedPreconditionError,
    RpcConflictError,
    RpcError,
    RpcInvalidArgumentError,
    StatusCode,
    WorknodeError,
    error_for,
)

__all__ = [
    "MAX_ARGUMENTS",
    "MAX_CALL_DEPTH",
    "MAX_REQUEST_BYTES",
    "MAX_RPC_TIMEOUT_MS",
    "REASON_KEY",
    "TRACE_ID_BYTES",
    "Deadline",
    "Request",
    "Response",
    "check_depth",
    "child_depth",
    "clamp_timeout_ms",
    "decode_request",
    "decode_response",
    "encode_call",
    "encode_request",
    "encode_response",
    "encode_result",
    "error_of",
    "error_response",
]

MAX_RPC_TIMEOUT_MS: Final = 30_000
"""No deadline exceeds this (30 s): a longer one is cut down to it, at every hop."""
MAX_CALL_DEPTH: Final = 8
"""Hops in one call chain; a request with a larger ``callDepth`` is refused."""
MAX_REQUEST_BYTES: Final = 64 * 1024
"""Largest request body a server accepts (the default of the ``rpc_max_request_bytes``
setting); larger requests get ``RESOURCE_EXHAUSTED``."""
MAX_ARGUMENTS: Final = 64
"""Arguments per request or result."""
TRACE_ID_BYTES: Final = 16
REASON_KEY: Final = "reason"
"""The result entry of an error response that names its ``RpcError.reason``."""


@dataclass(frozen=True, slots=True)
class Request:
    """One RPC request as the server sees it."""

    worknode: str
    method: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    token: bytes = b""
    deadline_ms: int = 0
    call_depth: int = 0
    trace_id: bytes = b""
    version: int = 0


@dataclass(frozen=True, slots=True)
class Response:
    """One RPC response: ``status`` OK with ``result`` (and maybe ``state``), or an error
    status with a human-readable ``message``."""

    status: StatusCode
    message: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)
    state: ORMap | None = None
    trace_id: bytes = b""


def clamp_timeout_ms(timeout_ms: float) -> int:
    """A caller's timeout as a wire deadline: whole milliseconds in ``[0, MAX_RPC_TIMEOUT_MS]``."""
    if type(timeout_ms) is int and 0 <= timeout_ms <= MAX_RPC_TIMEOUT_MS:
        return timeout_ms  # already a wire deadline (the common case: clamped once before)
    if timeout_ms != timeout_ms:  # NaN
        return 0
    return int(max(0.0, min(float(timeout_ms), float(MAX_RPC_TIMEOUT_MS))))


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute deadline on a monotonic clock (milliseconds), made from a relative one.

    ``Deadline.start(now_ms, deadline_ms)`` when a request arrives; ``remaining_ms(now)`` is
    what a nested call passes on; ``expired(now)`` says whether the work must be dropped.
    """

    at_ms: float

    @classmethod
    def start(cls, now_ms: float, deadline_ms: int) -> Deadline:
        """The deadline ``deadline_ms`` (capped at ``MAX_RPC_TIMEOUT_MS``) after ``now_ms``."""
        d = _new(cls)  # one per request: set the slot directly (see ``new_request``)
        _set_at_ms(d, now_ms + clamp_timeout_ms(deadline_ms))
        return d

    def remaining_ms(self, now_ms: float) -> int:
        """Whole milliseconds left at ``now_ms`` (0 when passed), capped at the maximum."""
        return clamp_timeout_ms(self.at_ms - now_ms)

    def expired(self, now_ms: float) -> bool:
        """Whether no time is left at ``now_ms`` (less than a whole millisecond: the same
        answer as ``remaining_ms(now_ms) <= 0``, without its rounding)."""
        return not self.at_ms - now_ms >= 1.0

    def child_timeout_ms(self, now_ms: float, requested_ms: float | None = None) -> int:
        """The deadline a nested call carries: what remains, or less if the handler asks for
        less. Raises ``DeadlineExceededError`` when nothing remains (the call is not sent)."""
        left = self.remaining_ms(now_ms)
        if requested_ms is not None:
            left = min(left, clamp_timeout_ms(requested_ms))
        if left <= 0:
            raise DeadlineExceededError("deadline passed before the nested call was sent")
        return left


_new: Final = object.__new__
_set_at_ms: Final = Deadline.__dict__["at_ms"].__set__


def check_depth(depth: int) -> None:
    """Raise ``CallDepthExceededError`` if a request at ``depth`` must not run."""
    if depth > MAX_CALL_DEPTH:
        # Readers before the ``reason`` entry recognised this by its opening words: keep them.
        raise CallDepthExceededError(f"call depth {depth} exceeds MAX_CALL_DEPTH={MAX_CALL_DEPTH}")


def child_depth(depth: int) -> int:
    """The depth of a call made while handling a request at ``depth`` (checked before sending)."""
    nxt = depth + 1
    check_depth(nxt)
    return nxt


# -- encoding ----------------------------------------------------------------------------------
#
# Readers are read by field object (``_get_by_field``), never by attribute: pycapnp's reader
# ``__getattr__`` costs about four times as much, and a request has a dozen fields. Builders
# are written by attribute, which is the fastest way to set them.


class _Layout:
    """The RPC structs of one loaded schema, with their fields resolved once (in the order
    the codec functions unpack them)."""

    __slots__ = ("arg_name", "arg_value", "by_type", "holder", "req", "request", "resp",
                 "response", "value")

    def __init__(self, schema: Any) -> None:
        rpc = schema.rpc
        self.request = rpc.RpcRequest
        self.response = rpc.RpcResponse
        req = _fields_of(rpc.RpcRequest)
        self.req = tuple(req[name] for name in _REQUEST_FIELDS)
        resp = _fields_of(rpc.RpcResponse)
        self.resp = tuple(resp[name] for name in _RESPONSE_FIELDS)
        argument = _fields_of(rpc.Argument)
        self.arg_name = argument["name"]
        self.arg_value = argument["value"]
        value = _fields_of(schema.crdt.Value)
        self.value = {name: value[name] for name in _VALUE_KINDS}
        # The union member for each atom type (exact types: validate_atom admits no others).
        self.by_type = {bool: value["bool"], int: value["int"], float: value["float"],
                        str: value["text"], bytes: value["data"]}
        self.holder = schema.crdt.SetElement  # carries an OpaqueAtom's Value struct


_REQUEST_FIELDS: Final = (
    "version", "worknode", "method", "arguments", "token", "deadlineMs", "callDepth", "traceId",
)
_RESPONSE_FIELDS: Final = ("version", "status", "message", "result", "state", "traceId")
_VALUE_KINDS: Final = ("null", "bool", "int", "float", "text", "data")
_LAYOUTS: dict[int, tuple[Any, _Layout]] = {}


def _fields_of(struct: Any) -> dict[str, Any]:
    return dict(struct.schema.fields)


def _layout(codec: WireCodec) -> _Layout:
    schema = codec.schema
    hit = _LAYOUTS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    layout = _Layout(schema)
    _LAYOUTS[id(schema)] = (schema, layout)  # the schema is kept alive: its id stays unique
    return layout


# Request and Response are frozen: their dataclass __init__ sets each field through
# object.__setattr__, which costs twice as much as the slot descriptors' own setters. Bodies
# are decoded and built on every call, so the codec makes them with the setters directly
# (the same objects: equal, immutable, and every field set).
_REQUEST_SETTERS: Final = tuple(
    Request.__dict__[name].__set__
    for name in ("worknode", "method", "arguments", "token", "deadline_ms", "call_depth",
                 "trace_id", "version")
)
_RESPONSE_SETTERS: Final = tuple(
    Response.__dict__[name].__set__
    for name in ("status", "message", "result", "state", "trace_id")
)


def new_request(
    worknode: str, method: str, arguments: Mapping[str, Any], token: bytes, deadline_ms: int,
    call_depth: int, trace_id: bytes, version: int,
) -> Request:
    """``Request(...)`` with every field given, built by the slot setters (for hot paths)."""
    r: Request = _new(Request)
    s_worknode, s_method, s_arguments, s_token, s_deadline, s_depth, s_trace, s_version = (
        _REQUEST_SETTERS
    )
    s_worknode(r, worknode)
    s_method(r, method)
    s_arguments(r, arguments)
    s_token(r, token)
    s_deadline(r, deadline_ms)
    s_depth(r, call_depth)
    s_trace(r, trace_id)
    s_version(r, version)
    return r


def new_response(
    status: StatusCode, message: str, result: Mapping[str, Any], state: ORMap | None,
    trace_id: bytes,
) -> Response:
    """``Response(status, message, result, state, trace_id)``, built by the slot setters
    (for hot paths: the server answers every call with one)."""
    r: Response = _new(Response)
    s_status, s_message, s_result, s_state, s_trace = _RESPONSE_SETTERS
    s_status(r, status)
    s_message(r, message)
    s_result(r, result)
    s_state(r, state)
    s_trace(r, trace_id)
    return r


def error_response(exc: WorknodeError, message: str, trace_id: bytes = b"") -> Response:
    """The response that answers ``exc``: its status, ``message``, and its reason if any."""
    if isinstance(exc, ConflictError):  # the versions travel beside the status
        details = {REASON_KEY: RpcConflictError.reason, "expected": exc.expected,
                   "current": exc.current}
        return new_response(exc.code, message, details, None, trace_id)
    reason = exc.reason if isinstance(exc, RpcError) else ""
    return new_response(exc.code, message, {REASON_KEY: reason} if reason else {}, None, trace_id)


def error_of(response: Response, trace_id: bytes = b"") -> RpcError:
    """The exception for a non-OK ``response``, chosen by its status and reason."""
    reason = response.result.get(REASON_KEY, "")
    if response.status is StatusCode.FAILED_PRECONDITION and reason == RpcConflictError.reason:
        expected, current = response.result.get("expected"), response.result.get("current")
        return RpcConflictError(
            response.message, expected=expected if type(expected) is int else 0,
            current=current if type(current) is int else None,
            trace_id=trace_id or response.trace_id)
    return error_for(
        response.status,
        response.message,
        reason=reason if type(reason) is str else "",
        trace_id=trace_id or response.trace_id,
    )


def _write_arguments(builder: Any, field: Any, args: Mapping[str, Any], layout: _Layout) -> None:
    n = len(args)
    if n > MAX_ARGUMENTS:
        raise RpcInvalidArgumentError(f"{n} arguments, at most {MAX_ARGUMENTS}")
    lst = builder._init_by_field(field, n)
    name_field = layout.arg_name
    value_field = layout.arg_value
    by_type = layout.by_type
    null = layout.value["null"]
    for i, (key, value) in enumerate(args.items()):
        item = lst[i]
        item._set_by_field(name_field, key)
        if value is None:
            item._get_by_field(value_field)._set_by_field(null, None)
        elif type(value) is OpaqueAtom:  # a newer release's value, passed on as it came
            item._set_by_field(value_field, layout.holder.from_bytes_packed(value.raw).value)
        else:
            validate_atom(value)  # raises for any type by_type does not hold
            item._get_by_field(value_field)._set_by_field(by_type[type(value)], value)


def _read_arguments(lst: Any, layout: _Layout) -> dict[str, Any]:
    n = len(lst)
    if not n:
        return {}
    if n > MAX_ARGUMENTS:
        raise RpcInvalidArgumentError(f"{n} arguments, at most {MAX_ARGUMENTS}")
    name_field = layout.arg_name
    value_field = layout.arg_value
    fields = layout.value
    out: dict[str, Any] = {}
    for item in lst:
        get = item._get_by_field
        name = get(name_field)
        if name in out:
            raise RpcInvalidArgumentError(f"argument {name!r} given twice")
        v = get(value_field)
        try:
            w = v._which_str()
        except capnp.KjException:  # a value type a newer release added: kept, not lost
            holder = layout.holder.new_message()
            holder.value = v
            raw = holder.to_bytes_packed()
            if len(raw) > MAX_VALUE_BYTES + 64:
                raise RpcInvalidArgumentError(
                    f"argument value over {MAX_VALUE_BYTES} bytes") from None
            out[name] = OpaqueAtom(raw)
            continue
        if w == "data":
            x = v._get_by_field(fields[w])
            if len(x) > MAX_VALUE_BYTES:
                raise RpcInvalidArgumentError(f"argument value over {MAX_VALUE_BYTES} bytes")
            out[name] = bytes(x)
        elif w == "text":
            x = v._get_by_field(fields[w])
            if len(x) > MAX_VALUE_BYTES:
                raise RpcInvalidArgumentError(f"argument value over {MAX_VALUE_BYTES} bytes")
            out[name] = x
        elif w == "null":
            out[name] = None
        else:
            x = v._get_by_field(fields[w])
            if w == "float" and not math.isfinite(x):
                raise RpcInvalidArgumentError("argument floats must be finite")
            out[name] = x
    return out


def _parse(codec: WireCodec, struct: Any, data: bytes) -> Any:
    if len(data) > codec.max_payload:
        raise RpcInvalidArgumentError(f"{len(data)} bytes, over max_payload={codec.max_payload}")
    check_segments(data)
    return struct.from_bytes_packed(
        data, traversal_limit_in_words=codec.traversal_limit_words, nesting_limit=NESTING_LIMIT
    )


def encode_request(codec: WireCodec, request: Request) -> bytes:
    """Packed ``RpcRequest`` bytes (written as ``codec``'s wire version)."""
    return encode_call(
        codec, request.worknode, request.method, request.arguments, request.token,
        request.deadline_ms, request.call_depth, request.trace_id,
    )


def encode_call(
    codec: WireCodec, worknode: str, method: str, arguments: Mapping[str, Any], token: bytes,
    deadline_ms: float, call_depth: int, trace_id: bytes,
) -> bytes:
    """``encode_request(codec, Request(worknode, method, ...))`` without the ``Request``
    (the client encodes one per call and keeps nothing of it)."""
    layout = _layout(codec)
    f_version, f_worknode, f_method, f_arguments, f_token, f_deadline, f_depth, f_trace = (
        layout.req
    )
    msg = layout.request.new_message()
    put = msg._set_by_field
    put(f_version, codec.version)
    put(f_worknode, worknode)
    put(f_method, method)
    if arguments:
        _write_arguments(msg, f_arguments, arguments, layout)
    if token:
        put(f_token, token)
    put(f_deadline, clamp_timeout_ms(deadline_ms))
    put(f_depth, call_depth if 0 <= call_depth <= 255 else min(max(call_depth, 0), 255))
    if trace_id:
        put(f_trace, trace_id)
    return msg.to_bytes_packed()  # type: ignore[no-any-return]


def decode_request(codec: WireCodec, data: bytes) -> Request:
    """The request in ``data``.

    Raises ``RpcInvalidArgumentError`` for bytes that are not a valid ``RpcRequest`` (or carry
    invalid arguments) and ``FailedPreconditionError`` for a wire version older than the
    oldest this server reads (or none).
    """
    try:
        layout = _layout(codec)
        msg = _parse(codec, layout.request, data)
        f_version, f_worknode, f_method, f_arguments, f_token, f_deadline, f_depth, f_trace = (
            layout.req
        )
        get = msg._get_by_field
        version = get(f_version)
        if version < OLDEST_VERSION:
            raise FailedPreconditionError(
                f"request wire version {version} is not supported (oldest {OLDEST_VERSION})"
            )
        trace = get(f_trace)
        if len(trace) > TRACE_ID_BYTES:
            raise RpcInvalidArgumentError(f"trace id longer than {TRACE_ID_BYTES} bytes")
        return new_request(
            get(f_worknode),
            get(f_method),
            _read_arguments(get(f_arguments), layout),
            get(f_token),
            get(f_deadline),
            get(f_depth),
            trace,
            version,
        )
    except (FailedPreconditionError, RpcInvalidArgumentError):
        raise
    except _DECODE_ERRORS as exc:
        raise RpcInvalidArgumentError(f"malformed request: {_reason(exc)}") from None


_DECODE_ERRORS: Final = (
    capnp.KjException, CodecError, WorknodeError, ValueError, TypeError, UnicodeError,
    OverflowError, IndexError, AttributeError,
)


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    if isinstance(exc, capnp.KjException):
        text = text.split("failed: ", 1)[-1]  # "file.c++:123: failed: why": keep the why
    return f"{type(exc).__name__}: {text[:200]}"


_STATUS: Final = {int(code): code for code in StatusCode}
_OK: Final = int(StatusCode.OK)


def encode_response(codec: WireCodec, response: Response) -> bytes:
    """Packed ``RpcResponse`` bytes."""
    layout = _layout(codec)
    f_version, f_status, f_message, f_result, _, f_trace = layout.resp
    msg = layout.response.new_message()
    put = msg._set_by_field
    put(f_version, codec.version)
    put(f_status, int(response.status))
    if response.message:
        put(f_message, response.message)
    if response.result:
        _write_arguments(msg, f_result, response.result, layout)
    if response.state is not None:
        msg.state = encode_document(codec.schema, response.state)
    if response.trace_id:
        put(f_trace, response.trace_id)
    return msg.to_bytes_packed()  # type: ignore[no-any-return]


def encode_result(codec: WireCodec, result: Mapping[str, Any], trace_id: bytes) -> bytes:
    """``encode_response(codec, Response(OK, result=result, trace_id=trace_id))`` without the
    ``Response`` (the server answers most calls with one and keeps nothing of it)."""
    layout = _layout(codec)
    f_version, f_status, _, f_result, _, f_trace = layout.resp
    msg = layout.response.new_message()
    put = msg._set_by_field
    put(f_version, codec.version)
    put(f_status, _OK)
    if result:
        _write_arguments(msg, f_result, result, layout)
    if trace_id:
        put(f_trace, trace_id)
    return msg.to_bytes_packed()  # type: ignore[no-any-return]


def decode_response(codec: WireCodec, data: bytes) -> Response:
    """The response in ``data``; ``RpcInvalidArgumentError`` for bytes that are not one."""
    try:
        layout = _layout(codec)
        msg = _parse(codec, layout.response, data)
        _, f_status, f_message, f_result, f_state, f_trace = layout.resp
        get = msg._get_by_field
        raw_status = get(f_status).raw
        status = _STATUS.get(raw_status)
        if status is None:
            raise RpcInvalidArgumentError(f"malformed response: unknown status {raw_status}")
        state = None
        if msg._has_by_field(f_state):
            with decoding("rpc response state"):
                doc = decode_document(codec.schema, get(f_state), ORMap)
            if not isinstance(doc, ORMap):
                raise RpcInvalidArgumentError("the state of a response is an OR-map")
            state = doc
        return new_response(
            status,
            get(f_message),
            _read_arguments(get(f_result), layout),
            state,
            get(f_trace),
        )
    except RpcInvalidArgumentError:
        raise
    except _DECODE_ERRORS as exc:
        raise RpcInvalidArgumentError(f"malformed response: {_reason(exc)}") from None
