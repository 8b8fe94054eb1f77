"""Atoms: the scalar values registers hold and sets contain, and their canonical bytes.

Invariants:

- an atom is ``None``, ``bool``, a signed 64-bit ``int``, a finite ``float``, ``str`` or
  ``bytes`` within ``MAX_VALUE_BYTES``; set elements are ``str``, ``int`` or ``bytes`` only,
  because Python makes ``1 == 1.0 == True`` and a set must not merge distinct elements;
- ``encode_atom`` is injective and type-tagged, so canonical bytes never confuse ``1`` with
  ``"1"`` or ``True``; digests are built from it;
- an ``OpaqueAtom`` is a value of a type a newer wire version added, as an older reader
  holds it: only the codec builds one (``validate_atom`` refuses it, so no local write makes
  one), it joins like any value and is written back byte for byte.

Pure: no I/O.
"""

from __future__ import annotations

import math
import struct

from broker.errors import InvalidKeyError, InvalidValueError, ValueTooLargeError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "Atom",
    "Element",
    "OpaqueAtom",
    "encode_atom",
    "validate_atom",
    "validate_element",
    "validate_key",
]

Atom = None | bool | int | float | str | bytes
"""A scalar value a register can hold."""


class OpaqueAtom:
    """A value whose type this wire version does not know (a newer release added it), kept
    as the packed Cap'n Proto bytes the codec copied it into (``raw``). Registers and sets
    hold it like any value; the codec writes it back unchanged, so a relay through an older
    node loses nothing. Built by the codec only; equal when the bytes are."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        return type(other) is OpaqueAtom and other.raw == self.raw

    def __hash__(self) -> int:
        return hash((OpaqueAtom, self.raw))

    def __repr__(self) -> str:
        return f"OpaqueAtom(<{len(self.raw)} bytes of a newer value type>)"

Element = str | int | bytes
"""A value an OR-set can contain."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 256 * 1024

_pack_q = struct.Struct(">q").pack
_pack_d = struct.Struct(">d").pack
_pack_i = struct.Struct(">I").pack


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid map key, else raise InvalidKeyError."""
    if type(key) is not str or not key:
        raise InvalidKeyError(f"map keys are non-empty str, got {key!r}")
    if len(key) > MAX_KEY_BYTES or not key.isascii():
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(f"map key is not valid UTF-8: {key!r}") from exc
        if size > MAX_KEY_BYTES:
            raise InvalidKeyError(f"map key is {size} bytes, over {MAX_KEY_BYTES}")
    return key


def _check_int(value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueTooLargeError(f"int {value} is outside the signed 64-bit range")


def _check_text(value: str | bytes) -> None:
    size = len(value) if isinstance(value, bytes) or value.isascii() else _utf8_len(value)
    if size > MAX_VALUE_BYTES:
        raise ValueTooLargeError(f"value is {size} bytes, over {MAX_VALUE_BYTES}")


def _utf8_len(value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidValueError(f"text is not valid UTF-8: {value!r:.80}") from exc


def validate_atom(value: object) -> Atom:
    """Return ``value`` if a register can hold it, else raise InvalidValueError or
    ValueTooLargeError."""
    t = type(value)
    if value is None or t is bool:
        return value  # type: ignore[return-value]
    if t is int:
        _check_int(value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
    if t is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidValueError(f"floats must be finite, got {value!r}")
        return value  # type: ignore[return-value]
    if t is str or t is bytes:
        _check_text(value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
    raise InvalidValueError(
        f"unsupported value type {t.__name__}: use None, bool, int, float, str or bytes "
        "(nest maps for structure)"
    )


def validate_element(value: object) -> Element:
    """Return ``value`` if an OR-set can contain it, else raise InvalidValueError."""
    t = type(value)
    if t is int:
        _check_int(value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
    if t is str or t is bytes:
        _check_text(value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
    raise InvalidValueError(f"set elements are str, int or bytes, got {t.__name__}")


def encode_atom(value: Atom | OpaqueAtom) -> bytes:
    """Canonical, type-tagged bytes of an atom."""
    if value is None:
        return b"N"
    if value is True:
        return b"T"
    if value is False:
        return b"F"
    if type(value) is int:
        return b"I" + _pack_q(value)
    if type(value) is float:
        return b"D" + _pack_d(value)
    if type(value) is str:
        raw = value.encode("utf-8")
        return b"S" + _pack_i(len(raw)) + raw
    if type(value) is OpaqueAtom:
        return b"O" + _pack_i(len(value.raw)) + value.raw
    assert type(value) is bytes
    return b"B" + _pack_i(len(value)) + value
