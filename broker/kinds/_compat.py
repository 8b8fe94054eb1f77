"""The compatibility gate of kind versions: FULL_TRANSITIVE, as in Confluent Schema Registry.

A new version must be readable by, and must read, every earlier version: for each earlier
version the check follows every field through the lens chain between them and compares what
each side writes with what the other reads. Findings read like ``worknode schema check`` 's
(``where: RULE: message [pairs]``); ``RULES`` lists each rule, what it refuses and why.

Destructive changes (a field dropped, renamed, retyped) are refused unless a lens covers
them: ``RemoveField`` (with a default older readers read), ``RenameField``, ``Hoist`` /
``Plunge``, ``Wrap`` / ``Head``, ``Convert``. A change of CRDT (a register into a counter) no
lens covers: add a new field and a migration.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from broker.kinds._fields import Crdt, FieldSpec
from broker.kinds._lens import (
    AddField,
    Convert,
    FieldPath,
    Head,
    Hoist,
    LensOp,
    Plunge,
    RemoveField,
    RenameField,
    Wrap,
)
from broker.kinds._schema import KindSchema

__all__ = ["BREAKING", "LINT", "RULES", "Finding", "Rule", "check_all", "check_new"]

BREAKING: Final = "breaking"
"""A finding that breaks a reader of some version: registration refused, exit code 1."""
LINT: Final = "lint"
"""A finding that breaks nothing but deserves a look: reported, not refused."""


@dataclass(frozen=True)
class Rule:
    """One rule: whether it is breaking or lint, what it refuses, and why."""

    kind: Literal["breaking", "lint"]
    refuses: str
    why: str


RULES: Mapping[str, Rule] = {
    "VERSION_TAKEN": Rule(BREAKING, "a version number registered with another schema",
                          "replicas would read one version two ways"),
    "VERSION_NOT_NEWER": Rule(BREAKING, "a version below the newest registered one",
                              "lenses chain versions in order"),
    "PARENT_CHANGED": Rule(BREAKING, "a kind's parent kind changed",
                           "readers of the parent read this kind's worknodes"),
    "LENS_INVALID": Rule(BREAKING, "a lens operation that does not fit the version before "
                         "(a missing source, a taken target, a convert of a counter)",
                         "the translation it describes cannot be carried out"),
    "FIELD_REMOVED": Rule(BREAKING, "a field of an earlier version missing from the new one "
                          "with no lens (remove, rename, hoist, plunge) covering it",
                          "earlier readers find it unwritten; its data looks lost"),
    "REMOVED_WITHOUT_DEFAULT": Rule(BREAKING, "a removed register whose RemoveField default "
                                    "the earlier version cannot hold",
                                    "earlier readers of new writes have no value to show"),
    "FIELD_ADDED_WITHOUT_DEFAULT": Rule(BREAKING, "a register added with no default (in the "
                                        "model or an AddField)",
                                        "new readers of earlier writes have no value to show"),
    "CRDT_CHANGED": Rule(BREAKING, "a field's CRDT changed (a register into a counter, a map "
                         "into a value) other than by Wrap/Head",
                         "the stored dots of one CRDT mean nothing to another"),
    "VALUE_TYPE_CHANGED": Rule(BREAKING, "the value types of a field differ (after Convert)",
                               "one side writes values the other cannot read"),
    "DEFAULT_CHANGED": Rule(LINT, "a register's default differs between versions",
                            "an unwritten field reads differently per version"),
}


@dataclass(frozen=True)
class Finding:
    """One finding: which rule, where (``kind@version`` and field), what, between which
    versions (``pairs``)."""

    rule: str
    where: str
    message: str
    pairs: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``"breaking"`` or ``"lint"``."""
        return RULES[self.rule].kind

    def format(self) -> str:
        """The ``where: RULE: message [pairs]`` line ``worknode kinds check`` prints."""
        pairs = f" [{', '.join(self.pairs)}]" if self.pairs else ""
        return f"{self.where}: {self.rule}: {self.message}{pairs}"

    def to_json(self) -> dict[str, Any]:
        """The finding as JSON data."""
        return {"rule": self.rule, "kind": self.kind, "where": self.where,
                "message": self.message, "pairs": list(self.pairs)}


def _leaves(shape: tuple[tuple[str, FieldSpec], ...], prefix: FieldPath = ()
            ) -> Iterator[tuple[FieldPath, FieldSpec]]:
    for name, spec in shape:
        yield (*prefix, name), spec
        if spec.crdt is Crdt.MAP:
            yield from _leaves(spec.fields, (*prefix, name))


def _dotted(path: FieldPath) -> str:
    return ".".join(path)


def _accepts(spec: FieldSpec, value: Any) -> bool:
    token = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str",
             bytes: "bytes"}.get(type(value))
    if spec.enum:
        return any(type(v) is type(value) and v == value for v in spec.enum)
    return token in spec.types


def _convert(tables: Sequence[dict[Any, Any]], value: Any) -> Any:
    for t in tables:
        value = t.get((type(value).__name__, value), value)
    return value


def _values_fit(old: FieldSpec, new: FieldSpec, tables: Sequence[dict[Any, Any]]) -> bool:
    """Whether each side reads every value the other writes (old values mapped by
    ``tables``)."""
    if old.enum or new.enum:
        if not (old.enum and new.enum):
            return False
        mapped = [_convert(tables, v) for v in old.enum]
        return sorted(map(repr, mapped)) == sorted(map(repr, new.enum))
    return old.types == new.types


def check_lens(old: KindSchema, new: KindSchema) -> list[Finding]:
    """LENS_INVALID findings of ``new.lens`` run over ``old`` 's shape."""
    paths: dict[FieldPath, Crdt] = {p: s.crdt for p, s in _leaves(old.fields)}
    out: list[Finding] = []
    pair = (f"{old.ref} → {new.ref}",)

    def bad(op: LensOp, why: str) -> None:
        out.append(Finding("LENS_INVALID", new.ref, f"{op.NAME}: {why}", pair))

    new_paths = {p: spec.crdt for p, spec in _leaves(new.fields)}
    for i, op in enumerate(new.lens):
        if isinstance(op, (RenameField, Hoist, Plunge)):
            src, dst = op.source, op.target
            if src not in paths:
                bad(op, f"{_dotted(src)} is not a field of the version before")
                continue
            if dst in paths:
                bad(op, f"{_dotted(dst)} is already a field")
                continue
            if len(dst) > 1 and paths.get(dst[:-1]) is not Crdt.MAP:
                bad(op, f"{_dotted(dst[:-1])} is not a map")
                continue
            paths = {op.forward_path(p): c for p, c in paths.items()}
        elif isinstance(op, AddField):
            if op.path in paths:
                bad(op, f"{_dotted(op.path)} is already a field")
                continue
            paths[op.path] = _added_crdt(new.lens[i + 1:], op.path, new_paths)
        elif isinstance(op, RemoveField):
            if op.path not in paths:
                bad(op, f"{_dotted(op.path)} is not a field of the version before")
            else:
                paths = {p: c for p, c in paths.items() if p[: len(op.path)] != op.path}
        elif isinstance(op, (Wrap, Head, Convert)):
            want = {Wrap: (Crdt.LWW,), Head: (Crdt.MV,)}.get(type(op),
                                                             (Crdt.LWW, Crdt.MV, Crdt.SET))
            crdt = paths.get(op.path)
            if crdt not in want:
                bad(op, f"{_dotted(op.path)} is not a field of CRDT "
                        f"{'/'.join(c.value for c in want)}")
            elif isinstance(op, Wrap):
                paths[op.path] = Crdt.MV
            elif isinstance(op, Head):
                paths[op.path] = Crdt.LWW
    return out


def _added_crdt(later: Sequence[LensOp], path: FieldPath,
                new_paths: Mapping[FieldPath, Crdt]) -> Crdt:
    """The CRDT a field added at ``path`` has before ``later`` operations: its CRDT where it
    ends in the new version, unwound through any Wrap/Head on the way."""
    end = path
    trail = []
    for op in later:
        trail.append((op, end))
        end = op.forward_path(end)
    crdt = new_paths.get(end, Crdt.LWW)
    for op, at in reversed(trail):
        if isinstance(op, Wrap) and op.path == at:
            crdt = Crdt.LWW
        elif isinstance(op, Head) and op.path == at:
            crdt = Crdt.MV
    return crdt


def check_pair(old: KindSchema, new: KindSchema, chain: Sequence[LensOp]) -> list[Finding]:
    """Findings between ``old`` and ``new`` (both reader directions); ``chain`` is the lens
    from ``old`` to ``new`` (every later version's lens in order)."""
    pair = (f"{old.ref} → {new.ref}",)
    out: list[Finding] = []
    new_leaves = dict(_leaves(new.fields))
    reached: set[FieldPath] = set()
    if old.parent != new.parent:
        out.append(Finding("PARENT_CHANGED", new.ref,
                           f"parent {old.parent} is now {new.parent}", pair))
    for path, spec in _leaves(old.fields):
        p, crdt, tables, removed = path, spec.crdt, [], None
        for op in chain:
            # A removed field keeps its stored place (data is never dropped): follow it on,
            # so a later version that puts another field there is compared with it.
            if isinstance(op, RemoveField) and p[: len(op.path)] == op.path:
                removed = op
            elif isinstance(op, Wrap) and op.path == p:
                crdt = Crdt.MV
            elif isinstance(op, Head) and op.path == p:
                crdt = Crdt.LWW
            elif isinstance(op, Convert) and op.path == p:
                tables.append(op.table())
            p = op.forward_path(p)
        where = f"{new.ref}.{_dotted(path)}"
        if removed is not None and p not in new_leaves:
            if (spec.crdt is Crdt.LWW and not spec.has_default
                    and not _accepts(spec, removed.default)):
                out.append(Finding("REMOVED_WITHOUT_DEFAULT", where,
                                   f"{old.ref} reads {_dotted(path)} but the remove's default "
                                   f"{removed.default!r} is not one of its values", pair))
            continue
        other = new_leaves.get(p)
        if other is None and spec.crdt is Crdt.MAP:
            continue  # a map is its fields: each is followed by itself
        if other is None:
            out.append(Finding("FIELD_REMOVED", where,
                               f"field {_dotted(path)} of {old.ref} is gone and no lens "
                               "removes or moves it", pair))
            continue
        reached.add(p)
        if other.crdt is not crdt:
            out.append(Finding("CRDT_CHANGED", f"{new.ref}.{_dotted(p)}",
                               f"{crdt.value} in {old.ref}, {other.crdt.value} now", pair))
            continue
        if crdt is Crdt.MAP:
            continue
        if crdt is not Crdt.COUNTER and crdt is not Crdt.FLAG and not _values_fit(
                spec, other, tables):
            out.append(Finding("VALUE_TYPE_CHANGED", f"{new.ref}.{_dotted(p)}",
                               f"{_describe(spec)} in {old.ref}, {_describe(other)} now",
                               pair))
        elif (crdt is Crdt.LWW and spec.has_default and other.has_default
              and _convert(tables, spec.default) != other.default):
            out.append(Finding("DEFAULT_CHANGED", f"{new.ref}.{_dotted(p)}",
                               f"default {spec.default!r} in {old.ref}, "
                               f"{other.default!r} now", pair))
    added = _added_defaults(chain)
    for p, spec in new_leaves.items():
        if p in reached or spec.crdt is not Crdt.LWW or spec.has_default:
            continue
        if p in added and _accepts(spec, added[p]):
            continue
        out.append(Finding("FIELD_ADDED_WITHOUT_DEFAULT", f"{new.ref}.{_dotted(p)}",
                           f"{old.ref} never writes {_dotted(p)}: give it a default (in the "
                           "model or an AddField)", pair))
    return out


def _added_defaults(chain: Sequence[LensOp]) -> dict[FieldPath, Any]:
    """Where each AddField of ``chain`` ends up (after later moves), with its default."""
    out: dict[FieldPath, Any] = {}
    for i, op in enumerate(chain):
        if isinstance(op, AddField):
            p = op.path
            for later in chain[i + 1:]:
                p = later.forward_path(p)
            out[p] = op.default
    return out


def _describe(spec: FieldSpec) -> str:
    if spec.enum:
        return "one of " + ", ".join(map(repr, spec.enum))
    return " | ".join(spec.types) or "(none)"


def check_new(earlier: Sequence[KindSchema], new: KindSchema) -> list[Finding]:
    """Findings of registering ``new`` after ``earlier`` (one kind, any order): the version
    order, the lens against the version before, and every earlier version against ``new``."""
    history = sorted((s for s in earlier if s.version != new.version), key=lambda s: s.version)
    out: list[Finding] = []
    for s in earlier:
        if s.version == new.version:
            if s == new:
                return []  # registered already: nothing new to check
            return [Finding("VERSION_TAKEN", new.ref,
                            f"version {new.version} is registered with another schema")]
    if history and history[-1].version > new.version:
        out.append(Finding("VERSION_NOT_NEWER", new.ref,
                           f"the newest version registered is {history[-1].version}"))
        return out
    if history:
        out.extend(check_lens(history[-1], new))
    if any(f.rule == "LENS_INVALID" for f in out):
        return out
    for i, old in enumerate(history):
        chain = [op for s in (*history[i + 1:], new) for op in s.lens]
        out.extend(check_pair(old, new, chain))
    return out


def check_all(schemas: Sequence[KindSchema]) -> list[Finding]:
    """Findings of a whole version history (one kind): each version against every earlier
    one, in version order (what ``worknode kinds check`` runs in CI)."""
    ordered = sorted(schemas, key=lambda s: s.version)
    out: list[Finding] = []
    for i, s in enumerate(ordered):
        out.extend(check_new(ordered[:i], s))
    return out
