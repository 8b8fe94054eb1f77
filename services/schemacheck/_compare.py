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
  fields at the same depth; a newer group that held none of them is new.
- One pass per (older, newer) pair covers both reader directions: every rule names an edit
  that breaks a new reader of old messages, an old reader of new messages, or both, and the
  edits Cap'n Proto allows (a new field with the next ordinal, a rename, a new union member, a
  new node, a new enumerant or method at the end, comments) are safe both ways.
- Defaults compare by wire meaning: struct values keep only fields that differ from the
  field's own default, and fields that only one side's schema knows are ignored.
- Implicit ``(a :T) -> (b :U)`` method structs are compared through their method, and what
  they break is reported as ``METHOD_PARAM_TYPE_CHANGED`` / ``METHOD_RESULT_TYPE_CHANGED``.
- Source lines are best effort: schema nodes keep no positions, so a line is found by searching
  the comment- and string-stripped source for the declaration or member name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RULES",
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

RULES: Mapping[str, str] = {
    "FILE_REMOVED": "a schema file of an older release is missing",
    "FILE_ID_CHANGED": "a file's @0x id changed",
    "ID_MISSING": "a file, struct, enum or interface has no explicit @0x id in its source",
    "ID_CHANGED": "a struct, enum or interface kept its name but got another id",
    "NODE_REMOVED": "a struct, enum or interface of an older release is missing (by id)",
    "KIND_CHANGED": "a node changed kind (struct, enum, interface, const...)",
    "GENERIC_PARAMETERS_CHANGED": "the number of generic parameters changed",
    "STRUCT_LAYOUT_SHRUNK": "a struct's data word count or pointer count decreased",
    "FIELD_REMOVED": "a field ordinal of an older release is missing",
    "ORDINAL_CHANGED": "a field name now has another ordinal",
    "TYPE_CHANGED": "a field's type changed (element types and type ids included)",
    "OFFSET_CHANGED": "a field's data or pointer offset changed",
    "DEFAULT_CHANGED": "a field's default value changed",
    "UNION_MEMBERSHIP_CHANGED": "a field moved into or out of a union, or its discriminant "
    "value or the union's discriminant location changed",
    "GROUP_CHANGED": "a field moved into, out of, or between groups",
    "ENUMERANT_REMOVED": "an enumerant ordinal of an older release is missing",
    "ENUMERANT_ORDINAL_CHANGED": "an enumerant name now has another ordinal",
    "METHOD_REMOVED": "a method ordinal of an older release is missing",
    "METHOD_ORDINAL_CHANGED": "a method name now has another ordinal",
    "METHOD_PARAM_TYPE_CHANGED": "a method's parameter struct changed (id or its fields)",
    "METHOD_RESULT_TYPE_CHANGED": "a method's result struct changed (id or its fields)",
    "SUPERCLASS_REMOVED": "an interface no longer extends one of its superclasses",
}
"""Every rule name the checker reports, with what it means."""

_WIRE_KINDS = frozenset({"struct", "enum", "interface"})


@dataclass(frozen=True)
class Violation:
    """One breaking change: where it is, which rule, and what changed.

    ``pairs`` names the comparisons (``"v1 → current"``) that found it.
    """

    rule: str
    path: str
    line: int | None
    message: str
    pairs: tuple[str, ...] = ()

    def format(self) -> str:
        """The ``path:line: RULE: message [pairs]`` line printed by ``worknode schema check``."""
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        suffix = f" [{', '.join(self.pairs)}]" if self.pairs else ""
        return f"{where}: {self.rule}: {self.message}{suffix}"


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
            out.append(Violation("ID_MISSING", path, None,
                                 "file has no '@0x...;' id line"))
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


_Report = Callable[[str, str | None, str], None]
_STRUCT_TYPE = re.compile(r"struct:(0x[0-9a-f]{16})")
_ENUM_TYPE = re.compile(r"enum:(0x[0-9a-f]{16})")
_TYPE_REF = re.compile(r"(struct|enum|interface|param):(0x[0-9a-f]{16})(?:#(\d+))?")
_OWN_BRAND = re.compile(r"(struct|enum|interface):(0x[0-9a-f]{16})<\2=([^;<>]*)>")


class _Comparison:
    def __init__(self, old: Snapshot, new: Snapshot) -> None:
        self.old, self.new = old, new
        self.where = _Locator(new)
        self.out: list[Violation] = []
        self.pair = f"{old.label} → {new.label}"

    def report(self, rule: str, node: Node | None, member: str | None, message: str,
               *, file: str | None = None) -> None:
        if node is not None and node.file in self.new.sources:
            file = node.file
            line = self.where.line(node.file, node.qualname, member)
            path = self.new.path(node.file)
        elif file is not None and file in self.new.files:
            line, path = None, self.new.path(file)
        else:
            line, path = None, self.old.path(file or (node.file if node else "?"))
        self.out.append(Violation(rule, path, line, message, (self.pair,)))

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

    # files and nodes

    def run(self) -> list[Violation]:
        for name, info in sorted(self.old.files.items()):
            now_file = self.new.files.get(name)
            if now_file is None:
                self.report("FILE_REMOVED", None, None,
                            f"file {name} of {self.old.label} is missing", file=name)
            elif now_file.id != info.id:
                self.out.append(Violation(
                    "FILE_ID_CHANGED", self.new.path(name), self._file_id_line(name),
                    f"file id changed from {info.id:#018x} to {now_file.id:#018x}", (self.pair,),
                ))
        by_name = {(n.file, n.qualname): n for n in self.new.nodes.values()}
        for node in sorted(self.old.nodes.values(), key=lambda n: (n.file, n.qualname)):
            if node.kind == "file" or node.implicit:
                continue
            now = self.new.nodes.get(node.id)
            if now is None:
                if node.kind not in _WIRE_KINDS:
                    continue
                twin = by_name.get((node.file, node.qualname))
                if twin is not None and twin.kind == node.kind:
                    self.report("ID_CHANGED", twin, None,
                                f"{node.kind} {node.qualname} id changed from "
                                f"{node.id:#018x} to {twin.id:#018x}")
                else:
                    self.report("NODE_REMOVED", None, None,
                                f"{node.kind} {node.qualname} ({node.id:#018x}) of "
                                f"{self.old.label} is missing", file=node.file)
                continue
            if now.kind != node.kind:
                self.report("KIND_CHANGED", now, None,
                            f"{node.qualname} ({node.id:#018x}) changed from {node.kind} "
                            f"to {now.kind}")
                continue
            if len(now.parameters) != len(node.parameters):
                self.report("GENERIC_PARAMETERS_CHANGED", now, None,
                            f"{now.qualname} generic parameters changed from "
                            f"{list(node.parameters)} to {list(now.parameters)}")
            if node.struct is not None and now.struct is not None:
                self.struct(node, now, None)
            elif node.kind == "enum":
                self.enum(node, now)
            elif node.kind == "interface":
                self.interface(node, now)
        return self.out

    def _file_id_line(self, file: str) -> int | None:
        text = self.new.sources.get(file)
        if text is None:
            return None
        m = _FILE_ID.search(_strip(text))
        return _line_at(text, m.end() - 1) if m else None

    # structs

    def struct(self, old: Node, new: Node, as_method: tuple[str, Node, str] | None) -> None:
        """Compare two versions of a struct; ``as_method`` = (rule, interface, method name)
        reports every finding under that method rule instead (implicit param structs)."""
        so, sn = old.struct, new.struct
        if so is None or sn is None:
            return
        what = new.qualname if as_method is None else f"{as_method[2]}{_SIDE[as_method[0]]}"

        def report(rule: str, member: str | None, message: str) -> None:
            if as_method is None:
                self.report(rule, new, member, f"{what}: {message}")
            else:
                self.report(as_method[0], as_method[1], as_method[2],
                            f"{as_method[1].qualname}.{what}: {message} ({rule})")

        if sn.data_words < so.data_words or sn.pointers < so.pointers:
            report("STRUCT_LAYOUT_SHRUNK", None,
                   f"layout shrank from {so.data_words} data words / {so.pointers} pointers "
                   f"to {sn.data_words} / {sn.pointers}")
        lo, ln = _leaves(self.old, so), _leaves(self.new, sn)
        groups = _match_groups(lo, ln)
        new_by_path = {leaf.path: leaf for leaf in ln.values()}
        for ordinal, a in sorted(lo.items()):
            b = ln.get(ordinal)
            moved = new_by_path.get(a.path)
            if moved is not None and moved.ordinal != ordinal:
                report("ORDINAL_CHANGED", moved.path,
                       f"field {a.path} moved from @{ordinal} to @{moved.ordinal}")
            if b is None:
                report("FIELD_REMOVED", None, f"field {a.path} @{ordinal} was removed")
                continue
            label = f"field {b.path} @{ordinal}" + (
                f" (was {a.path})" if a.path != b.path else "")
            self._chain(a, b, groups, label, report)
            if a.slot.type != b.slot.type:
                told, tnew = self.describe_types(a.slot.type, b.slot.type)
                report("TYPE_CHANGED", b.path, f"{label}: type changed from {told} to {tnew}")
                continue
            if a.slot.offset != b.slot.offset:
                report("OFFSET_CHANGED", b.path,
                       f"{label}: offset changed from {a.slot.offset} to {b.slot.offset}")
            if not self.same_default(a.slot.default, b.slot.default, b.slot.type):
                report("DEFAULT_CHANGED", b.path,
                       f"{label}: default changed from "
                       f"{_show(a.slot.default, a.slot.type, self.old)} to "
                       f"{_show(b.slot.default, b.slot.type, self.new)}")

    def same_default(self, a: Any, b: Any, type_str: str) -> bool:
        """Whether two canonical defaults of ``type_str`` read the same on both sides: fields
        of a struct value that only one side's schema knows are ignored."""
        if a == b:
            return True
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
        if [lv.group for lv in a.chain] != [groups[lv.group] for lv in b.chain]:
            report("GROUP_CHANGED", b.path,
                   f"{label}: moved from {_container(a.path)} to {_container(b.path)}")
            return
        for x, y in zip(a.chain, b.chain, strict=True):
            if x.discriminant == y.discriminant:
                if x.union_offset != y.union_offset:
                    report("UNION_MEMBERSHIP_CHANGED", b.path,
                           f"{label}: union discriminant moved from offset {x.union_offset} "
                           f"to {y.union_offset}")
                    return
                continue
            if x.discriminant == NO_DISCRIMINANT:
                change = "moved into a union"
            elif y.discriminant == NO_DISCRIMINANT:
                change = "moved out of a union"
            else:
                change = f"discriminant changed from {x.discriminant} to {y.discriminant}"
            report("UNION_MEMBERSHIP_CHANGED", b.path, f"{label}: {change}")
            return

    # enums and interfaces

    def enum(self, old: Node, new: Node) -> None:
        for ordinal, name in enumerate(old.enumerants):
            if name in new.enumerants and new.enumerants.index(name) != ordinal:
                self.report("ENUMERANT_ORDINAL_CHANGED", new, name,
                            f"{new.qualname}: enumerant {name} moved from @{ordinal} to "
                            f"@{new.enumerants.index(name)}")
            if ordinal >= len(new.enumerants):
                self.report("ENUMERANT_REMOVED", new, None,
                            f"{new.qualname}: enumerant {name} @{ordinal} was removed")

    def interface(self, old: Node, new: Node) -> None:
        names = [m.name for m in new.methods]
        for ordinal, m in enumerate(old.methods):
            if m.name in names and names.index(m.name) != ordinal:
                self.report("METHOD_ORDINAL_CHANGED", new, m.name,
                            f"{new.qualname}: method {m.name} moved from @{ordinal} to "
                            f"@{names.index(m.name)}")
            if ordinal >= len(new.methods):
                self.report("METHOD_REMOVED", new, None,
                            f"{new.qualname}: method {m.name} @{ordinal} was removed")
                continue
            n = new.methods[ordinal]
            for rule, sid_old, sid_new in (
                ("METHOD_PARAM_TYPE_CHANGED", m.param, n.param),
                ("METHOD_RESULT_TYPE_CHANGED", m.result, n.result),
            ):
                a, b = self.old.nodes.get(sid_old), self.new.nodes.get(sid_new)
                if sid_old != sid_new:
                    ta = a.qualname if a else f"{sid_old:#018x}"
                    tb = b.qualname if b else f"{sid_new:#018x}"
                    self.report(rule, new, n.name,
                                f"{new.qualname}.{n.name}{_SIDE[rule]}: struct changed from "
                                f"{ta} ({sid_old:#018x}) to {tb} ({sid_new:#018x})")
                elif a is not None and b is not None and a.implicit and b.implicit:
                    self.struct(a, b, (rule, new, n.name))
        gone = [s for s in old.superclasses if s not in new.superclasses]
        for sid in gone:
            sup = self.old.nodes.get(sid)
            self.report("SUPERCLASS_REMOVED", new, None,
                        f"{new.qualname} no longer extends "
                        f"{sup.qualname if sup else f'{sid:#018x}'}")


_SIDE = {"METHOD_PARAM_TYPE_CHANGED": " params", "METHOD_RESULT_TYPE_CHANGED": " results"}


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


def compare(old: Snapshot, new: Snapshot) -> list[Violation]:
    """Every breaking change from ``old`` (an earlier release) to ``new``.

    Violations point into ``new`` where the element still exists there, else into ``old``.
    """
    return _Comparison(old, new).run()


def merge(violations: Iterable[Violation]) -> list[Violation]:
    """Fold violations that differ only in their pairs into one, sorted by place and rule."""
    merged: dict[tuple[str, int | None, str, str], list[str]] = {}
    for v in violations:
        pairs = merged.setdefault((v.path, v.line, v.rule, v.message), [])
        pairs.extend(p for p in v.pairs if p not in pairs)
    return [
        Violation(rule, path, line, message, tuple(pairs))
        for (path, line, rule, message), pairs in sorted(
            merged.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2], kv[0][3]))
    ]


def transitive_pairs(snapshots: Sequence[Snapshot]) -> list[tuple[Snapshot, Snapshot]]:
    """Every (older, newer) pair of an oldest-first sequence: the transitive closure."""
    return [(a, b) for i, a in enumerate(snapshots) for b in snapshots[i + 1:]]
