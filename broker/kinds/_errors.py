"""The errors of typed kinds: every one is an ``InvalidArgumentError`` of the worknode tree.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from broker.errors import InvalidArgumentError, StatusCode

__all__ = [
    "IncompatibleKindError",
    "KindDefinitionError",
    "KindError",
    "KindReadError",
    "KindValidationError",
    "LensError",
    "SchemaFormatError",
    "UnknownKindError",
]


class KindError(InvalidArgumentError):
    """Base of the typed-kind errors: a kind, a write through it, or a schema is refused.

    Nothing was written; fix the input named by the message.
    """


class KindDefinitionError(KindError):
    """A kind model declares a field without a CRDT type, a value type worknode cannot
    store, or a default a counter, set, flag or multi-value field cannot have. Fix the model.
    """


class KindValidationError(KindError):
    """A write through a kind failed pydantic validation before any delta existed: nothing
    was written. ``field`` names the field (dotted path), ``reason`` says why; fix the value.
    """

    def __init__(self, message: str, *, field: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class KindReadError(KindError):
    """A worknode's stored fields do not fit the kind it is read as (another writer stored
    a value of another type). ``field`` names the field; read it untyped to inspect it.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class LensError(KindError):
    """A lens does not fit the versions it joins (a rename of a field that does not exist,
    a target already taken, a mapping that is not one-to-one). Fix the lens.
    """


class IncompatibleKindError(KindError):
    """Registering a kind version was refused: the compatibility check against every earlier
    version found breaking changes (``findings``). Add a lens that covers them, or a
    migration, and register again.
    """

    def __init__(self, message: str, findings: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.findings = findings


class SchemaFormatError(KindError):
    """A stored kind schema is not valid schema JSON (a newer or a damaged entry). It is
    skipped when a registry is read; fix or re-register the schema.
    """


class UnknownKindError(KindError, LookupError):
    """No such kind (or version of it) is registered. Register it first, or check the name.
    """

    code = StatusCode.NOT_FOUND
