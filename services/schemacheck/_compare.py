"""Pure comparison of two schema snapshots: which edits break the Cap'n Proto wire contract.

A :class:`Snapshot` is one schema directory as the ``_dump`` worker described it plus the
source texts of its files. :func:`compare` takes an older and a newer snapshot and returns
every :class:`Violation`; :func:`missing_ids` checks one snapshot's sources for implicit ids.
No pycapnp, no I/O, no subprocesses: the same inputs always give the same violations, in the
same order.

Invariants the rules rely on:

- Nodes are matched by id, struct fields by ordinal, enumerants and methods by their index
  (which is their ordinal). Names only serve to detect a name that moved to another ordinal
  (``ORDINAL_CHANGED``); a new name on the same ordinal is a rename, and renames are safe.
- Groups share their parent's ordinal space and layout, so a struct is flattened into leaf
  slots keyed by ordinal; each leaf keeps the chain of groups and union discriminants above it.
  Group ids are derived by the compiler from the group's position and shift when fields move
  between groups, so a newer group is matched to the older group that held most of its
  fields at the same depth; a newer group that held none of them is new. A new plain group
  (not a union member, its member not in a new union) is transparent: wrapping a field in one
  keeps its bits, as Cap'n Proto allows.
- A node whose id is gone is matched to a newer node of the same name (``ID_CHANGED``) or,
  failing that, to the one new node of the same file, kind and wire shape
  (``NODE_RENAMED``: renamed without an explicit id); types that refer to it are compared
  through that match, so one cause gives one finding.
- Types compare after two allowances: bindings of generic parameters the older node did not
  have are dropped from newer types, and a field whose type became such a parameter passes
  only if every user of the generic binds it to the field's old type; ``List(T)`` may become
  ``List(U)`` where ``U``'s ``@0`` is a non-union ``T`` at offset 0 with a zero default
  (not for ``Bool``).
- Closed structs (``_rules.STRUCT_EVOLUTION``) take no new ordinal (``CLOSED_STRUCT_EXTENDED``).
- One pass per (older, newer) pair covers both reader directions: every rule names an edit
  that breaks a new reader of old messages, an old reader of new messages, or both, and the
  edits Cap'n Proto allows (a new field with the next ordinal, a rename, a new union member, a
  new node, a new enumerant or method at the end, comments) are safe both ways.
- Defaults compare by wire meaning: struct values keep only fields that differ from the
  field's own default, and fields that only one side's schema knows are ignored.
- Implicit ``(a :T) -> (b :U)`` method structs are compared through their method, and what
  they break is reported as ``METHOD_PARAM_TYPE_CHANGED`` / ``METHOD_RESULT_TYPE_CHANGED``.
- Source lines are best effort: schema nodes keep no positions, so a line is found by searching
  the comment- and string-stripped source for the declaration or member name. A removal
  points into the older snapshot, where the element still is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.schemacheck._rules import (
    CONTENT_FILE_ID,
    RULES,
    STRUCT_EVOLUTION,
    closed_structs,
    union_only_structs,
)

__all__ = [
    "Field",
    "FileInfo",
    "Method",
    "Node",
    "Slot",
    "Snapshot",
    "StructInfo",
    "Violation",
    "compare",
    "merge",
    "missing_ids",
    "transitive_pairs",
]

NO_DISCRIMINANT = 0xFFFF
"""``discriminantValue`` of a field that is not a union member."""

ROOT = 0
"""Container key of a struct's own fields (node ids are never 0)."""

_WIRE_KINDS = frozenset({"struct", "enum", "interface"})


@dataclass(frozen=True)
class Violation:
    """One finding: where it is, which rule, and what changed.

    ``path``/``line`` point into the newer schema, or into the older one for removals.
    ``struct``, ``field``, ``ordinal``, ``old`` and ``new`` repeat the message's parts for
    machine readers (empty or None where they do not apply). ``pairs`` names the comparisons
    (``"v1 → current"``) that found it; ``releases`` is their compact range, set by
    :func:`merge` (``"v1..v2 → current"``).
    """

    rule: str
    path: str
    line: int | None
    message: str
    pairs: tuple[str, ...] = ()
    struct: str = ""
    field: str = ""
    ordinal: int | None = None
    old: str = ""
    new: str = ""
    releases: str = ""

    @property
    def kind(self) -> str:
        """``"breaking"`` or ``"lint"`` (see :data:`RULES`)."""
        return RULES[self.rule].kind

    def format(self) -> str:
        """The ``path:line: RULE: message [releases]`` line printed by ``worknode schema
        check``."""
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        span = self.releases or ", ".join(self.pairs)
        suffix = f" [{span}]" if span else ""
        return f"{where}: {self.rule}: {self.message}{suffix}"

    def to_json(self) -> dict[str, Any]:
        """The finding as one object of ``--format json``."""
        return {
            "file": self.path, "line": self.line, "rule": self.rule, "kind": self.kind,
            "struct": self.struct or None, "field": self.field or None,
            "ordinal": self.ordinal, "old": self.old or None, "new": self.new or None,
            "message": self.message, "releases": self.releases or ", ".join(self.pairs),
            "pairs": list(self.pairs),
        }


@dataclass(frozen=True)
class Slot:
    """A field's storage: offset (in units of its own size), type and canonical default."""

    offset: int
    type: str
    pointer: bool
    default: Any


@dataclass(frozen=True)
class Field:
    """A struct or group member: a slot (with an explicit ordinal) or a group (with none)."""

    name: str
    ordinal: int | None
    discriminant: int
    slot: Slot | None
    group: int | None


@dataclass(frozen=True)
class StructInfo:
    """A struct's (or group's) layout and fields, fields sorted by ordinal."""

    data_words: int
    pointers: int
    discriminant_count: int
    discriminant_offset: int
    is_group: bool
    fields: tuple[Field, ...]


@dataclass(frozen=True)
class Method:
    """An interface method; its ordinal is its index."""

    name: str
    param: int
    result: int


@dataclass(frozen=True)
class Node:
    """One schema node: file, struct (or group, or implicit method params), enum, interface..."""

    id: int
    qualname: str
    file: str
    kind: str
    scope_id: int
    parameters: tuple[str, ...] = ()
    struct: StructInfo | None = None
    enumerants: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()
    superclasses: tuple[int, ...] = ()

    @property
    def implicit(self) -> bool:
        """True for groups and implicit ``(a :T)`` method structs: checked via their owner."""
        return self.kind == "struct" and (
            self.scope_id == 0 or (self.struct is not None and self.struct.is_group)
        )


@dataclass(frozen=True)
class FileInfo:
    """A schema file's id."""

    id: int


@dataclass(frozen=True)
class Snapshot:
    """One schema directory: a label (``v1``, ``current``), its files, nodes and sources."""

    label: str
    directory: Path
    files: Mapping[str, FileInfo]
    nodes: Mapping[int, Node]
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dump(
        cls, label: str, directory: Path, dump: Mapping[str, Any], sources: Mapping[str, str]
    ) -> Snapshot:
        """Build a snapshot from the JSON the ``_dump`` worker printed for ``directory``."""
        files = {name: FileInfo(int(info["id"], 16)) for name, info in dump["files"].items()}
        nodes = {int(key, 16): _node(raw) for key, raw in dump["nodes"].items()}
        return cls(label, directory, files, nodes, dict(sources))

    def path(self, file: str) -> str:
        """The display path of ``file`` in this snapshot."""
        return str(self.directory / file)


def _node(raw: Mapping[str, Any]) -> Node:
    struct = None
    if "struct" in raw:
        s = raw["struct"]
        struct = StructInfo(
            s["dataWordCount"], s["pointerCount"], s["discriminantCount"],
            s["discriminantOffset"], s["isGroup"],
            tuple(
                Field(
                    f["name"], f["ordinal"], f["discriminantValue"],
                    Slot(f["slot"]["offset"], f["slot"]["type"], f["slot"]["pointer"],
                         f["slot"]["default"]) if "slot" in f else None,
                    int(f["group"], 16) if "group" in f else None,
                )
                for f in s["fields"]
            ),
        )
    iface = raw.get("interface", {})
    return Node(
        id=int(raw["id"], 16),
        qualname=raw["qualname"],
        file=raw["file"],
        kind=raw["kind"],
        scope_id=int(raw["scopeId"], 16),
        parameters=tuple(raw.get("parameters", ())),
        struct=struct,
        enumerants=tuple(raw.get("enum", {}).get("enumerants", ())),
        methods=tuple(
            Method(m["name"], int(m["param"], 16), int(m["result"], 16))
            for m in iface.get("methods", ())
        ),
        superclasses=tuple(int(s, 16) for s in iface.get("superclasses", ())),
    )


# --- source text ----------------------------------------------------------------------------

_COMMENT_OR_STRING = re.compile(r'#[^\n]*|"(?:\\.|[^"\\\n])*"')
_DECL = re.compile(r"\b(struct|enum|interface)\s+([A-Za-z_]\w*)\s*(@\s*0x[0-9A-Fa-f]+)?")
_FILE_ID = re.compile(r"^\s*@\s*0x[0-9A-Fa-f]+\s*;", re.MULTILINE)


def _strip(text: str) -> str:
    """Blank out comments and string literals, keeping every offset and newline."""
    return _COMMENT_OR_STRING.sub(lambda m: " " * len(m.group()), text)


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def missing_ids(snapshot: Snapshot) -> list[Violation]:
    """``ID_MISSING`` for each file, struct, enum and interface declared without ``@0x``.

    Works on the source text: the parser invents ids for undeclared ones, so the parsed
    schema cannot tell. Also usable on snapshots whose files did not parse.
    """
    out: list[Violation] = []
    for file, text in sorted(snapshot.sources.items()):
        stripped = _strip(text)
        path = snapshot.path(file)
        if not _FILE_ID.search(stripped):
            out.append(Violation("ID_MISSING", path, 1, "file has no '@0x...;' id line"))
        for m in _DECL.finditer(stripped):
            if m.group(3) is None:
                out.append(Violation(
                    "ID_MISSING", path, _line_at(stripped, m.start()),
                    f"{m.group(1)} {m.group(2)} has no explicit @0x id",
                ))
    return out


class _Locator:
    """Best-effort source lines for nodes and members of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._stripped: dict[str, str] = {}

    def _text(self, file: str) -> str | None:
        if file not in self._stripped:
            raw = self._snapshot.sources.get(file)
            if raw is None:
                return None
            self._stripped[file] = _strip(raw)
        return self._stripped[file]

    def line(self, file: str, qualname: str, member: str | None = None) -> int | None:
        """Line of ``qualname`` (``Outer.Inner``, ``Svc.call$Params``) or of its ``member``
        (dotted through groups); the declaration's line when the member is not found."""
        text = self._text(file)
        if text is None:
            return None
        parts = [p.split("$")[0] for p in qualname.split(".")]
        pos, found = 0, None
        for part in parts:
            m = _find_name(text, part, pos)
            if m is None:
                return found
            pos, found = m.end(), _line_at(text, m.start())
        for part in (member.split(".") if member else ()):
            m = _find_name(text, part, pos)
            if m is None:
                return found
            pos, found = m.end(), _line_at(text, m.start())
        return found


def _find_name(text: str, name: str, pos: int) -> re.Match[str] | None:
    n = re.escape(name)
    best = None
    for pattern in (
        rf"\b(?:struct|enum|interface)\s+{n}\b",  # a declaration
        rf"(?<![\w$]){n}\s*:\s*(?:group|union)\b",  # a group or named union
        rf"(?<![\w$]){n}\s*@\s*\d+(?![\dxX])",  # a field, enumerant or method
    ):
        m = re.compile(pattern).search(text, pos)
        if m is not None and (best is None or m.start() < best.start()):
            best = m
    return best


# --- comparison -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Level:
    """Where a member sits inside one container (the root struct or a group)."""

    group: int  # the container's group node id; ROOT for the struct itself
    discriminant: int  # the member's discriminant value in this container, or NO_DISCRIMINANT
    union_offset: int | None  # the container's discriminant offset if the member is in its union


@dataclass(frozen=True)
class _Leaf:
    ordinal: int
    path: str  # dotted through groups: "meta.a"
    slot: Slot
    chain: tuple[_Level, ...]


def _leaves(snapshot: Snapshot, struct: StructInfo) -> dict[int, _Leaf]:
    """Flatten a struct and its groups into slots keyed by ordinal."""
    out: dict[int, _Leaf] = {}

    def walk(s: StructInfo, prefix: str, chain: tuple[_Level, ...], key: int) -> None:
        for f in s.fields:
            level = _Level(
                key, f.discriminant,
                s.discriminant_offset if f.discriminant != NO_DISCRIMINANT else None,
            )
            if f.slot is not None and f.ordinal is not None:
                out[f.ordinal] = _Leaf(f.ordinal, prefix + f.name, f.slot, (*chain, level))
            elif f.group is not None:
                group = snapshot.nodes.get(f.group)
                if group is not None and group.struct is not None:
                    walk(group.struct, f"{prefix}{f.name}.", (*chain, level), f.group)

    walk(struct, "", (), ROOT)
    return out


def _match_groups(old: Mapping[int, _Leaf], new: Mapping[int, _Leaf]) -> dict[int, int]:
    """Map each newer group id to the older group that held most of its fields at the same
    depth (ties: the one holding the smallest ordinal); unmatched groups map to ``-id``."""
    votes: dict[int, Counter[int]] = {}
    for ordinal in sorted(new):
        b, a = new[ordinal], old.get(ordinal)
        for depth, level in enumerate(b.chain):
            tally = votes.setdefault(level.group, Counter())
            if a is not None and depth < len(a.chain):
                tally[a.chain[depth].group] += 1
    return {g: (t.most_common(1)[0][0] if t else -g) for g, t in votes.items()}


_Report = Callable[..., None]
_STRUCT_TYPE = re.compile(r"struct:(0x[0-9a-f]{16})")
_ENUM_TYPE = re.compile(r"enum:(0x[0-9a-f]{16})")
_TYPE_REF = re.compile(r"(struct|enum|interface|param):(0x[0-9a-f]{16})(?:#(\d+))?")
_OWN_BRAND = re.compile(r"(struct|enum|interface):(0x[0-9a-f]{16})<\2=([^;<>]*)>")
_ID = re.compile(r"0x[0-9a-f]{16}")
_TOKEN = re.compile(r"List\(|[^(),<>;=]+|[(),<>;=]")
_REF_KINDS = ("struct:", "enum:", "interface:")
_NULL_POINTER_DEFAULTS: tuple[Any, ...] = (None, "", [], {}, {"data": ""})
_ZERO_DEFAULTS: tuple[Any, ...] = (None, 0, False, "", [], {}, {"data": ""},
                                   {"float": (0.0).hex()})


@dataclass(frozen=True)
class _Type:
    """A parsed canonical type string: ``head`` (``List``, ``Text``, ``struct:0x...``,
    ``param:0x...#0``), a list's element, and brand scopes (scope id, binds or None for
    ``inherit``; a bind is None for ``_``)."""

    head: str
    element: _Type | None = None
    brand: tuple[tuple[str, tuple[_Type | None, ...] | None], ...] = ()

    @property
    def ref(self) -> int | None:
        """The node id a struct, enum or interface type refers to."""
        return int(self.head.split(":", 1)[1], 16) if self.head.startswith(_REF_KINDS) else None

    def walk(self) -> Iterable[_Type]:
        """This type and every type inside it (list elements, brand bindings)."""
        yield self
        if self.element is not None:
            yield from self.element.walk()
        for _, binds in self.brand:
            for b in binds or ():
                if b is not None:
                    yield from b.walk()

    def __str__(self) -> str:
        if self.element is not None:
            return f"List({self.element})"
        if not self.brand:
            return self.head
        scopes = ";".join(
            f"{sid}=" + ("inherit" if binds is None else
                         ",".join("_" if b is None else str(b) for b in binds))
            for sid, binds in self.brand
        )
        return f"{self.head}<{scopes}>"


def _parse_type(text: str) -> _Type:
    """Parse a type string of the ``_dump`` worker (see ``_type_str`` there)."""
    tokens: list[str] = _TOKEN.findall(text)
    pos = 0

    def take() -> str:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        return token

    def parse() -> _Type:
        head = take()
        if head == "List(":
            element = parse()
            take()  # ")"
            return _Type("List", element)
        if pos >= len(tokens) or tokens[pos] != "<":
            return _Type(head)
        take()
        scopes: list[tuple[str, tuple[_Type | None, ...] | None]] = []
        while True:
            sid = take()
            take()  # "="
            binds: list[_Type | None] | None
            if tokens[pos] == "inherit":
                take()
                binds = None
            else:
                binds = []
                while True:
                    if tokens[pos] == "_":
                        take()
                        binds.append(None)
                    else:
                        binds.append(parse())
                    if tokens[pos] != ",":
                        break
                    take()
            scopes.append((sid, None if binds is None else tuple(binds)))
            if take() == ">":
                break
        return _Type(head, None, tuple(scopes))

    return parse()


class _Comparison:
    def __init__(
        self,
        old: Snapshot,
        new: Snapshot,
        closed: Collection[int],
        union_only: Collection[int] = (),
    ) -> None:
        self.old, self.new = old, new
        self.closed = closed
        self.union_only = union_only
        self.where = _Locator(new)
        self.where_old = _Locator(old)
        self.out: list[Violation] = []
        self.pair = f"{old.label} → {new.label}"
        # Old id -> new id of types that kept their shape under another id (renamed without
        # an explicit id, or given another id): reported once, not again in every field
        # that refers to them.
        self.renamed: dict[int, int] = {}
        self._bindings: dict[tuple[int, int], list[tuple[str, str | None]]] | None = None

    def report(self, rule: str, node: Node | None, member: str | None, message: str,
               *, file: str | None = None, removed: bool = False, field: str = "",
               ordinal: int | None = None, old: str = "", new: str = "") -> None:
        """Record a finding; ``removed`` points it at ``node``/``file`` in the older snapshot
        (the element no longer exists in the newer one)."""
        snap, where = (self.old, self.where_old) if removed else (self.new, self.where)
        if node is not None and node.file in snap.sources:
            line = where.line(node.file, node.qualname, member)
            path = snap.path(node.file)
        elif file is not None and file in snap.files:
            line, path = _file_id_line(snap, file), snap.path(file)
        else:
            line, path = None, self.old.path(file or (node.file if node else "?"))
        self.out.append(Violation(
            rule, path, line, message, (self.pair,),
            struct=node.qualname if node is not None else "", field=field, ordinal=ordinal,
            old=old, new=new,
        ))

    def type_name(self, type_str: str, first: Snapshot, second: Snapshot,
                  ids: bool = False) -> str:
        """``type_str`` with ids replaced by names (looked up in ``first``, then ``second``),
        followed by ``@id`` when ``ids``."""

        def name(m: re.Match[str]) -> str:
            key = int(m.group(2), 16)
            node = first.nodes.get(key) or second.nodes.get(key)
            if node is None:
                return m.group(0)
            if m.group(1) != "param":
                return f"{node.qualname}@{m.group(2)}" if ids else node.qualname
            index = int(m.group(3))
            params = node.parameters
            return f"{node.qualname}.{params[index] if index < len(params) else index}"

        return _TYPE_REF.sub(name, _OWN_BRAND.sub(r"\1:\2(\3)", type_str))

    def describe_types(self, old: str, new: str) -> tuple[str, str]:
        """Readable old and new types; with ids when the names alone read the same."""
        a = self.type_name(old, self.old, self.new)
        b = self.type_name(new, self.new, self.old)
        if a != b:
            return a, b
        return (self.type_name(old, self.old, self.new, ids=True),
                self.type_name(new, self.new, self.old, ids=True))

    # types

    def old_type(self, type_str: str) -> _Type:
        """An older type with renamed ids replaced by their newer ids."""
        return _parse_type(_ID.sub(
            lambda m: f"0x{self.renamed.get(int(m.group(), 16), int(m.group(), 16)):016x}",
            type_str))

    def new_type(self, type_str: str) -> _Type:
        """A newer type without the bindings of generic parameters the older schema did not
        have: those are checked where the parameter is used (``same_type``)."""
        return self._strip(_parse_type(type_str))

    def _strip(self, t: _Type) -> _Type:
        element = self._strip(t.element) if t.element is not None else None
        brand = []
        for sid, binds in t.brand:
            before = self._old_params(int(sid, 16))
            if binds is not None and before is not None:
                binds = tuple(None if b is None else self._strip(b) for b in binds[:before])
                if not binds:
                    continue
            brand.append((sid, binds))
        return _Type(t.head, element, tuple(brand))

    def _old_params(self, new_id: int) -> int | None:
        back = {v: k for k, v in self.renamed.items()}
        node = self.old.nodes.get(back.get(new_id, new_id))
        return None if node is None else len(node.parameters)

    def same_type(self, old_str: str, new_str: str, owner: Node) -> bool:
        """Whether a field of ``owner`` may change from ``old_str`` to ``new_str``: the same
        type once renames and newly added generic bindings are accounted for, a list upgraded
        to a list of structs whose @0 field is the old element, or a new generic parameter
        of ``owner`` (or its scope) that every user binds to the old type."""
        a, b = self.old_type(old_str), self.new_type(new_str)
        if str(a) == str(b) or self._list_upgrade(a, b):
            return True
        m = re.fullmatch(r"param:(0x[0-9a-f]{16})#(\d+)", b.head)
        if m is None or not a.head.startswith(("List", "Text", "Data", "struct:", "interface:",
                                              "Any", "Capability")):
            return False  # a parameter is a pointer: only a pointer type can become one
        scope, index = int(m.group(1), 16), int(m.group(2))
        before = self._old_params(scope)
        if before is None or index < before or not self._in_scope(owner, scope):
            return False
        binds = self.bindings().get((scope, index), [])
        return bool(binds) and all(bound == str(a) for _, bound in binds)

    def _in_scope(self, node: Node, scope: int) -> bool:
        seen: set[int] = set()
        current: Node | None = node
        while current is not None and current.id not in seen:
            if current.id == scope:
                return True
            seen.add(current.id)
            current = self.new.nodes.get(current.scope_id)
        return False

    def bindings(self) -> dict[tuple[int, int], list[tuple[str, str | None]]]:
        """(generic id, parameter index) -> (user, bound type or None if unbound) for every
        reference to a generic type (or a type nested in one) in the newer snapshot."""
        if self._bindings is not None:
            return self._bindings
        out: dict[tuple[int, int], list[tuple[str, str | None]]] = {}
        for node in self.new.nodes.values():
            for f in node.struct.fields if node.struct is not None else ():
                if f.slot is None:
                    continue
                user = f"{node.qualname}.{f.name}"
                for t in _parse_type(f.slot.type).walk():
                    if t.ref is None:
                        continue
                    scopes = dict(t.brand)
                    for generic in self._generic_scopes(t.ref):
                        g = self.new.nodes[generic]
                        binds = scopes.get(f"0x{generic:016x}", ())
                        if binds is None:  # "inherit": bound by the enclosing generic
                            continue
                        for i in range(len(g.parameters)):
                            b = binds[i] if i < len(binds) else None
                            if b is not None and b.head == f"param:0x{generic:016x}#{i}":
                                continue  # the generic passing its own parameter on
                            out.setdefault((generic, i), []).append(
                                (user, None if b is None else str(self._strip(b))))
        self._bindings = out
        return out

    def _generic_scopes(self, node_id: int) -> list[int]:
        out, seen = [], set()
        current = self.new.nodes.get(node_id)
        while current is not None and current.id not in seen:
            seen.add(current.id)
            if current.parameters:
                out.append(current.id)
            current = self.new.nodes.get(current.scope_id)
        return out

    def _list_upgrade(self, a: _Type, b: _Type) -> bool:
        """``List(T)`` -> ``List(U)`` where U's @0 field is a non-union T at offset 0 with a
        zero default: Cap'n Proto reads either list encoding as the other (not for Bool)."""
        if a.element is None or b.element is None:
            return False
        x, u = a.element, b.element
        if str(x) == str(u):
            return True
        if x.element is not None and u.element is not None:
            return self._list_upgrade(x, u)
        if u.ref is None or not u.head.startswith("struct:") or x.head == "Bool" or (
                x.head.startswith((*_REF_KINDS, "param:", "methodParam", "Any", "Capability"))):
            return False
        node = self.new.nodes.get(u.ref)
        if node is None or node.struct is None:
            return False
        first = _leaves(self.new, node.struct).get(0)
        return (
            first is not None
            and all(lv.discriminant == NO_DISCRIMINANT for lv in first.chain)
            and first.slot.offset == 0
            and str(self.new_type(first.slot.type)) == str(x)
            and any(first.slot.default == z for z in _ZERO_DEFAULTS)
        )

    # files and nodes

    def run(self) -> list[Violation]:
        for name, info in sorted(self.old.files.items()):
            now_file = self.new.files.get(name)
            if now_file is None:
                self.report("FILE_REMOVED", None, None, f"file {name} is missing",
                            file=name, removed=True)
            elif now_file.id != info.id:
                self.report("FILE_ID_CHANGED", None, None,
                            f"file id changed from {info.id:#018x} to {now_file.id:#018x}",
                            file=name, old=f"{info.id:#018x}", new=f"{now_file.id:#018x}")
        self._find_renames()
        for node in sorted(self.old.nodes.values(), key=lambda n: (n.file, n.qualname)):
            if node.kind == "file" or node.implicit:
                continue
            now = self.new.nodes.get(node.id)
            if now is None:
                if node.kind in _WIRE_KINDS:
                    self._missing(node)
                continue
            if now.kind != node.kind:
                self.report("KIND_CHANGED", now, None,
                            f"{node.qualname} ({node.id:#018x}) changed from {node.kind} "
                            f"to {now.kind}", old=node.kind, new=now.kind)
                continue
            self._compare_node(node, now)
        return self.out

    def _compare_node(self, node: Node, now: Node) -> None:
        self._generics(node, now)
        if node.struct is not None and now.struct is not None:
            self.struct(node, now, None)
        elif node.kind == "enum":
            self.enum(node, now)
        elif node.kind == "interface":
            self.interface(node, now)

    def _generics(self, node: Node, now: Node) -> None:
        old_p, new_p = list(node.parameters), list(now.parameters)
        if len(new_p) < len(old_p):
            self.report("GENERIC_PARAMETERS_CHANGED", now, None,
                        f"{now.qualname} generic parameters changed from {old_p} to {new_p}",
                        old=", ".join(old_p), new=", ".join(new_p))
            return
        unbound = sorted({
            user for i in range(len(old_p), len(new_p))
            for user, bound in self.bindings().get((now.id, i), []) if bound is None
        })
        if unbound:
            self.report("GENERIC_PARAMETERS_CHANGED", now, None,
                        f"{now.qualname} generic parameters changed from {old_p} to {new_p} "
                        f"and {', '.join(unbound)} does not bind the new ones",
                        old=", ".join(old_p), new=", ".join(new_p))

    def _shape(self, node: Node, snap: Snapshot) -> tuple[Any, ...]:
        """What a type looks like on the wire, ids blanked: finds a type under another id."""
        if node.struct is not None:
            leaves = _leaves(snap, node.struct)
            return (node.kind, node.struct.data_words, node.struct.pointers, tuple(
                (o, leaf.slot.offset, _ID.sub("id", leaf.slot.type))
                for o, leaf in sorted(leaves.items())))
        if node.kind == "enum":
            return (node.kind, len(node.enumerants))
        return (node.kind, tuple(m.name for m in node.methods))

    def _find_renames(self) -> None:
        gone = [n for n in self.old.nodes.values() if n.id not in self.new.nodes
                and n.kind in _WIRE_KINDS and not n.implicit]
        fresh = [n for n in self.new.nodes.values() if n.id not in self.old.nodes
                 and n.kind in _WIRE_KINDS and not n.implicit]
        by_name = {(n.file, n.qualname): n for n in fresh}
        claimed: set[int] = set()
        for node in sorted(gone, key=lambda n: (n.file, n.qualname)):
            twin = by_name.get((node.file, node.qualname))
            if twin is not None and twin.kind == node.kind:
                self.renamed[node.id] = twin.id
                claimed.add(twin.id)
        for node in sorted(gone, key=lambda n: (n.file, n.qualname)):
            if node.id in self.renamed:
                continue
            shape = self._shape(node, self.old)
            candidates = [n for n in fresh if n.id not in claimed and n.file == node.file
                          and n.qualname not in {g.qualname for g in gone}
                          and self._shape(n, self.new) == shape]
            if len(candidates) == 1:
                self.renamed[node.id] = candidates[0].id
                claimed.add(candidates[0].id)

    def _missing(self, node: Node) -> None:
        """A node whose id is gone: given another id, renamed without one, or removed."""
        now_id = self.renamed.get(node.id)
        now = self.new.nodes.get(now_id) if now_id is not None else None
        if now is None:
            self.report("NODE_REMOVED", node, None,
                        f"{node.kind} {node.qualname} ({node.id:#018x}) is missing: no node "
                        f"has its id (if it was renamed or moved, declare the new one with "
                        f"@{node.id:#018x})", removed=True, old=node.qualname)
            return
        if now.qualname == node.qualname:
            self.report("ID_CHANGED", now, None,
                        f"{node.kind} {node.qualname} id changed from {node.id:#018x} to "
                        f"{now.id:#018x}", old=f"{node.id:#018x}", new=f"{now.id:#018x}")
        else:
            self.report("NODE_RENAMED", now, None,
                        f"{node.kind} {node.qualname} was renamed to {now.qualname} and its "
                        f"id changed from {node.id:#018x} to {now.id:#018x} (declare "
                        f"`{now.kind} {now.qualname.rsplit('.', 1)[-1]} @{node.id:#018x}` to "
                        f"keep the old id)", old=node.qualname, new=now.qualname)
        if now.kind == node.kind:
            self._compare_node(node, now)

    # structs

    def struct(self, old: Node, new: Node, as_method: tuple[str, Node, str] | None) -> None:
        """Compare two versions of a struct; ``as_method`` = (rule, interface, method name)
        reports every finding under that method rule instead (implicit param structs)."""
        so, sn = old.struct, new.struct
        if so is None or sn is None:
            return
        what = new.qualname if as_method is None else f"{as_method[2]}{_SIDE[as_method[0]]}"

        def report(rule: str, member: str | None, message: str, *, removed: bool = False,
                   ordinal: int | None = None, old_s: str = "", new_s: str = "") -> None:
            if as_method is None:
                self.report(rule, old if removed else new, member, f"{what}: {message}",
                            removed=removed, field=member or "", ordinal=ordinal,
                            old=old_s, new=new_s)
            else:
                self.report(as_method[0], as_method[1], as_method[2],
                            f"{as_method[1].qualname}.{what}: {message} ({rule})",
                            field=member or "", ordinal=ordinal, old=old_s, new=new_s)

        if sn.data_words < so.data_words or sn.pointers < so.pointers:
            report("STRUCT_LAYOUT_SHRUNK", None,
                   f"layout shrank from {so.data_words} data words / {so.pointers} pointers "
                   f"to {sn.data_words} / {sn.pointers}",
                   old_s=f"{so.data_words}/{so.pointers}", new_s=f"{sn.data_words}/{sn.pointers}")
        lo, ln = _leaves(self.old, so), _leaves(self.new, sn)
        if as_method is None and (old.id in self.closed or old.id in self.union_only):
            known = {leaf.path.split(".")[0] for leaf in lo.values()}
            for ordinal in sorted(ln.keys() - lo.keys()):
                leaf = ln[ordinal]
                if old.id in self.union_only and (
                    leaf.chain[0].discriminant != NO_DISCRIMINANT
                    and leaf.path.split(".")[0] not in known
                ):
                    continue  # a new member of the union: older readers keep it whole
                what = "a closed struct" if old.id in self.closed else (
                    "a struct whose union alone may grow")
                report("CLOSED_STRUCT_EXTENDED", leaf.path,
                       f"field {leaf.path} @{ordinal} was added to {what}",
                       ordinal=ordinal, new_s=leaf.slot.type)
        groups = _match_groups(lo, ln)
        new_by_path = {leaf.path: leaf for leaf in ln.values()}
        for ordinal, a in sorted(lo.items()):
            b = ln.get(ordinal)
            moved = new_by_path.get(a.path)
            if moved is not None and moved.ordinal != ordinal:
                report("ORDINAL_CHANGED", moved.path,
                       f"field {a.path} moved from @{ordinal} to @{moved.ordinal}",
                       ordinal=ordinal, old_s=f"@{ordinal}", new_s=f"@{moved.ordinal}")
            if b is None:
                report("FIELD_REMOVED", a.path, f"field {a.path} @{ordinal} was removed",
                       removed=True, ordinal=ordinal, old_s=a.path)
                continue
            label = f"field {b.path} @{ordinal}" + (
                f" (was {a.path})" if a.path != b.path else "")
            self._chain(a, b, groups, label, report)
            if not self.same_type(a.slot.type, b.slot.type, new):
                told, tnew = self.describe_types(a.slot.type, b.slot.type)
                report("TYPE_CHANGED", b.path, f"{label}: type changed from {told} to {tnew}",
                       ordinal=ordinal, old_s=told, new_s=tnew)
                continue
            if a.slot.offset != b.slot.offset:
                report("OFFSET_CHANGED", b.path,
                       f"{label}: offset changed from {a.slot.offset} to {b.slot.offset}",
                       ordinal=ordinal, old_s=str(a.slot.offset), new_s=str(b.slot.offset))
            if not self.same_default(a.slot.default, b.slot.default, b.slot.type):
                dold = _show(a.slot.default, a.slot.type, self.old)
                dnew = _show(b.slot.default, b.slot.type, self.new)
                report("DEFAULT_CHANGED", b.path,
                       f"{label}: default changed from {dold} to {dnew}",
                       ordinal=ordinal, old_s=dold, new_s=dnew)

    def same_default(self, a: Any, b: Any, type_str: str) -> bool:
        """Whether two canonical defaults of ``type_str`` read the same on both sides: fields
        of a struct value that only one side's schema knows are ignored."""
        if a == b:
            return True
        if type_str.startswith("param:") and b is None and a in _NULL_POINTER_DEFAULTS:
            return True  # a pointer without a default became a parameter: null either way
        if isinstance(a, list) and isinstance(b, list) and type_str.startswith("List("):
            return len(a) == len(b) and all(
                self.same_default(x, y, type_str[5:-1]) for x, y in zip(a, b, strict=True))
        m = _STRUCT_TYPE.match(type_str)
        if m is None or not isinstance(a, dict) or not isinstance(b, dict):
            return False
        old_node, new_node = self.old.nodes.get(int(m.group(1), 16)), self.new.nodes.get(
            int(m.group(1), 16))
        if old_node is None or new_node is None or old_node.struct is None or (
                new_node.struct is None):
            return False
        lo, ln = _leaves(self.old, old_node.struct), _leaves(self.new, new_node.struct)
        if {k: v for k, v in a.items() if k.startswith("which@")} != {
                k: v for k, v in b.items() if k.startswith("which@")}:
            return False
        for ordinal in lo.keys() & ln.keys():
            x, y = a.get(str(ordinal)), b.get(str(ordinal))
            if (x is None) != (y is None):
                return False
            if x is not None and not self.same_default(x, y, ln[ordinal].slot.type):
                return False
        return True

    def _chain(self, a: _Leaf, b: _Leaf, groups: Mapping[int, int], label: str,
               report: _Report) -> None:
        b_chain = _unwrap_new_groups(b.chain, groups)
        if [lv.group for lv in a.chain] != [groups.get(lv.group, lv.group) for lv in b_chain]:
            report("GROUP_CHANGED", b.path,
                   f"{label}: moved from {_container(a.path)} to {_container(b.path)}",
                   ordinal=a.ordinal, old_s=_container(a.path), new_s=_container(b.path))
            return
        for x, y in zip(a.chain, b_chain, strict=True):
            if x.discriminant == y.discriminant:
                if x.union_offset != y.union_offset:
                    report("UNION_MEMBERSHIP_CHANGED", b.path,
                           f"{label}: union discriminant moved from offset {x.union_offset} "
                           f"to {y.union_offset}", ordinal=a.ordinal,
                           old_s=str(x.union_offset), new_s=str(y.union_offset))
                    return
                continue
            if x.discriminant == NO_DISCRIMINANT:
                change = "moved into a union"
            elif y.discriminant == NO_DISCRIMINANT:
                change = "moved out of a union"
            else:
                change = f"discriminant changed from {x.discriminant} to {y.discriminant}"
            report("UNION_MEMBERSHIP_CHANGED", b.path, f"{label}: {change}", ordinal=a.ordinal,
                   old_s=_disc(x.discriminant), new_s=_disc(y.discriminant))
            return

    # enums and interfaces

    def enum(self, old: Node, new: Node) -> None:
        for ordinal, name in enumerate(old.enumerants):
            if name in new.enumerants and new.enumerants.index(name) != ordinal:
                self.report("ENUMERANT_ORDINAL_CHANGED", new, name,
                            f"{new.qualname}: enumerant {name} moved from @{ordinal} to "
                            f"@{new.enumerants.index(name)}", field=name, ordinal=ordinal,
                            old=f"@{ordinal}", new=f"@{new.enumerants.index(name)}")
            if ordinal >= len(new.enumerants):
                self.report("ENUMERANT_REMOVED", old, name,
                            f"{new.qualname}: enumerant {name} @{ordinal} was removed",
                            removed=True, field=name, ordinal=ordinal, old=name)

    def interface(self, old: Node, new: Node) -> None:
        names = [m.name for m in new.methods]
        for ordinal, m in enumerate(old.methods):
            if m.name in names and names.index(m.name) != ordinal:
                self.report("METHOD_ORDINAL_CHANGED", new, m.name,
                            f"{new.qualname}: method {m.name} moved from @{ordinal} to "
                            f"@{names.index(m.name)}", field=m.name, ordinal=ordinal,
                            old=f"@{ordinal}", new=f"@{names.index(m.name)}")
            if ordinal >= len(new.methods):
                self.report("METHOD_REMOVED", old, m.name,
                            f"{new.qualname}: method {m.name} @{ordinal} was removed",
                            removed=True, field=m.name, ordinal=ordinal, old=m.name)
                continue
            n = new.methods[ordinal]
            for rule, sid_old, sid_new in (
                ("METHOD_PARAM_TYPE_CHANGED", m.param, n.param),
                ("METHOD_RESULT_TYPE_CHANGED", m.result, n.result),
            ):
                a, b = self.old.nodes.get(sid_old), self.new.nodes.get(sid_new)
                if self.renamed.get(sid_old, sid_old) != sid_new:
                    ta = a.qualname if a else f"{sid_old:#018x}"
                    tb = b.qualname if b else f"{sid_new:#018x}"
                    self.report(rule, new, n.name,
                                f"{new.qualname}.{n.name}{_SIDE[rule]}: struct changed from "
                                f"{ta} ({sid_old:#018x}) to {tb} ({sid_new:#018x})",
                                field=n.name, ordinal=ordinal, old=ta, new=tb)
                elif a is not None and b is not None and a.implicit and b.implicit:
                    self.struct(a, b, (rule, new, n.name))
        gone = [s for s in old.superclasses if s not in new.superclasses]
        for sid in gone:
            sup = self.old.nodes.get(sid)
            name = sup.qualname if sup else f"{sid:#018x}"
            self.report("SUPERCLASS_REMOVED", new, None,
                        f"{new.qualname} no longer extends {name}", old=name)


_SIDE = {"METHOD_PARAM_TYPE_CHANGED": " params", "METHOD_RESULT_TYPE_CHANGED": " results"}


def _disc(value: int) -> str:
    return "no union" if value == NO_DISCRIMINANT else f"discriminant {value}"


def _unwrap_new_groups(chain: tuple[_Level, ...], groups: Mapping[int, int]) -> list[_Level]:
    """A newer leaf's chain without the plain groups that are new (matched to no older
    group): a field wrapped in a new group that is not a union member keeps its bits, as
    Cap'n Proto allows. A new group that is a union member, or a union inside it, stays."""
    out = list(chain)
    i = 1
    while i < len(out):
        outer, inner = out[i - 1], out[i]
        if groups.get(inner.group, inner.group) < 0 and outer.discriminant == NO_DISCRIMINANT \
                and inner.discriminant == NO_DISCRIMINANT:
            out[i - 1:i + 1] = [_Level(outer.group, NO_DISCRIMINANT, None)]
            continue
        i += 1
    return out


def _file_id_line(snapshot: Snapshot, file: str) -> int | None:
    text = snapshot.sources.get(file)
    if text is None:
        return None
    m = _FILE_ID.search(_strip(text))
    return _line_at(text, m.end() - 1) if m else None


def _container(path: str) -> str:
    return f"group {path.rsplit('.', 1)[0]}" if "." in path else "the struct itself"


def _show(value: Any, type_str: str, snapshot: Snapshot) -> str:
    m = _ENUM_TYPE.fullmatch(type_str)
    if m is not None and isinstance(value, int):
        node = snapshot.nodes.get(int(m.group(1), 16))
        if node is not None and 0 <= value < len(node.enumerants):
            return f"{node.enumerants[value]} (@{value})"
    return _fmt(value)


def _fmt(value: Any) -> str:
    """A canonical default in capnp-like text: ``(@0 = "n", @2 = 7)``, ``[1, 2]``."""
    if isinstance(value, dict):
        if set(value) == {"float"}:
            return str(float.fromhex(value["float"]))
        if set(value) == {"data"}:
            return f'0x"{value["data"]}"'
        return "(" + ", ".join(
            f"@{k} = {_fmt(v)}" if k.isdigit() else f"{k} = {_fmt(v)}"
            for k, v in sorted(value.items(), key=lambda kv: (not kv[0].isdigit(),
                                                              len(kv[0]), kv[0]))
        ) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def compare(old: Snapshot, new: Snapshot,
            closed: Collection[int] | None = None) -> list[Violation]:
    """Every breaking change from ``old`` (an earlier release) to ``new``.

    Findings point into ``new`` where the element still exists there, else into ``old``.
    ``closed`` holds the ids of structs that may not grow (default: the ``STRUCT_EVOLUTION``
    table's closed structs).
    """
    if closed is None:
        content_files = {name for name, f in old.files.items() if f.id == CONTENT_FILE_ID}
        content = {
            i for i, n in old.nodes.items()
            if n.kind == "struct" and not n.implicit and n.file in content_files
            and i not in STRUCT_EVOLUTION
        }
        return _Comparison(old, new, closed_structs() | content, union_only_structs()).run()
    return _Comparison(old, new, closed).run()


def merge(violations: Iterable[Violation], order: Sequence[str] = ()) -> list[Violation]:
    """Fold findings of the same change found by several pairs into one, sorted by place
    and rule, each with its release range.

    Two findings are the same change when rule, file name, struct, member, ordinal, old, new
    and message agree: a removal seen by ``v1 → current`` and ``v2 → current`` points into
    each release's own copy of the file, so the place is not part of the key; the newest
    older release's place is kept. ``order`` lists the snapshot labels oldest first, so a
    run of consecutive releases prints as ``v1..v3``.
    """
    merged: dict[tuple[Any, ...], tuple[Violation, list[str]]] = {}
    for v in violations:
        key = (v.rule, Path(v.path).name, v.struct, v.field, v.ordinal, v.old, v.new, v.message)
        _, pairs = merged.get(key, (v, []))
        pairs.extend(p for p in v.pairs if p not in pairs)
        merged[key] = (v, pairs)
    out = [
        replace(v, pairs=tuple(pairs), releases=release_range(pairs, order))
        for v, pairs in merged.values()
    ]
    return sorted(out, key=lambda v: (v.path, v.line or 0, v.rule, v.message))


def release_range(pairs: Sequence[str], order: Sequence[str] = ()) -> str:
    """``["v1 → current", "v2 → current"]`` as ``"v1..v2 → current"``: per newer label, the
    older labels, a run of consecutive ones (in ``order``) shortened to ``first..last``."""
    by_new: dict[str, list[str]] = {}
    for pair in pairs:
        old, _, new = pair.partition(" → ")
        by_new.setdefault(new, []).append(old)
    rank = {label: i for i, label in enumerate(order)}
    parts = []
    for new, olds in by_new.items():
        idx = sorted(rank.get(o, -1) for o in olds)
        if len(olds) >= 2 and idx[0] >= 0 and idx == list(range(idx[0], idx[0] + len(idx))):
            ordered = sorted(olds, key=lambda o: rank[o])
            text = f"{ordered[0]}..{ordered[-1]}"
        else:
            text = ", ".join(olds)
        parts.append(f"{text} → {new}")
    return "; ".join(parts)


def transitive_pairs(snapshots: Sequence[Snapshot]) -> list[tuple[Snapshot, Snapshot]]:
    """Every (older, newer) pair of an oldest-first sequence: the transitive closure."""
    return [(a, b) for i, a in enumerate(snapshots) for b in snapshots[i + 1:]]
