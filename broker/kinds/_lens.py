"""Lenses between kind versions (after Cambria): edits that translate a worknode's fields
from one version's shape to the next, and back.

Operations: ``AddField`` (with a default for data written without it), ``RemoveField`` (with
a default for older readers), ``RenameField``, ``Hoist`` (a field of a nested map up into
its parent), ``Plunge`` (the reverse), ``Wrap`` (a register read as the tuple of its live
values), ``Head`` (the reverse), ``Convert`` (values mapped one-to-one). Each has an
``inverse``; a lens (a sequence of operations) runs backwards as the inverses in reverse.

A lens translates CRDT *stores*, not plain values, so it applies alike to states and to
deltas (delta markers included) and leaves the causal context alone: a translation is a
relabelling of the store tree (paths moved, values mapped one-to-one) that never merges two
entries. Laws (property-tested):

- ``backward(forward(s)) == s`` (round trip) for states and deltas;
- ``forward(join(a, b)) == join(forward(a), forward(b))``: a lens commutes with join, so
  translating deltas one by one and joining them gives the translated state;
- what an operation does not name passes through untouched: fields a version does not know
  are preserved.

``AddField``, ``RemoveField``, ``Wrap`` and ``Head`` move nothing: stored data is never
dropped (an older writer keeps a removed field's data for older readers); they change how a
version *reads* (defaults, a tuple of values) and what compatibility allows.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from broker.crdt import Atom, Kind, ORMap, validate_atom
from broker.crdt._stores import KindStore, LWWStore, MapStore, MVStore, SetStore, Whole
from broker.errors import InvalidArgumentError
from broker.kinds._errors import LensError

__all__ = [
    "AddField",
    "Convert",
    "Head",
    "Hoist",
    "LensOp",
    "Plunge",
    "RemoveField",
    "RenameField",
    "Wrap",
    "backward",
    "forward",
    "lens_from_json",
    "lens_to_json",
    "map_path",
    "translate_document",
    "translate_fields",
]

FieldPath: TypeAlias = tuple[str, ...]


class LensOp:
    """One lens operation. ``forward_path`` maps a field path of the older shape to the
    newer; ``forward_store`` translates a map store (a root holding the fields under
    ``prefix``); ``inverse`` is the operation that undoes it."""

    __slots__ = ()
    NAME: ClassVar[str]

    def forward_path(self, path: FieldPath) -> FieldPath:
        """Where a field of the older shape is in the newer one."""
        return path

    def forward_value(self, path: FieldPath, value: Any) -> Any:
        """A value of the field at ``path`` (older shape), as the newer shape holds it."""
        return value

    def forward_store(self, root: MapStore, prefix: FieldPath) -> MapStore:
        """``root`` with the fields under ``prefix`` translated (a new map; ``root`` is not
        changed)."""
        return root

    def inverse(self) -> LensOp:
        """The operation that undoes this one."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored with a schema."""
        raise NotImplementedError


def _path(value: Any, what: str) -> FieldPath:
    if isinstance(value, str):
        value = (value,)
    if (not isinstance(value, (tuple, list)) or not value
            or not all(isinstance(k, str) and k for k in value)):
        raise LensError(f"{what}: a field path is a non-empty list of names, got {value!r:.80}")
    return tuple(value)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise LensError(f"{what}: a field name is a non-empty str, got {value!r:.80}")
    return value


def _scalar(value: Any, what: str) -> Atom:
    """``value`` if a schema can store it (a JSON scalar a register holds), else LensError."""
    if type(value) not in (type(None), bool, int, float, str):
        raise LensError(f"{what}: a value is a JSON scalar, got {type(value).__name__}")
    try:
        return validate_atom(value)
    except InvalidArgumentError as exc:
        raise LensError(f"{what}: {exc}") from None


@dataclass(frozen=True, slots=True)
class AddField(LensOp):
    """The newer version adds ``path``; data written without it reads as ``default``."""

    path: FieldPath
    default: Atom = None
    NAME: ClassVar[str] = "add"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "add"))
        _scalar(self.default, "add default")

    def inverse(self) -> LensOp:
        return RemoveField(self.path, self.default)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path), "default": self.default}


@dataclass(frozen=True, slots=True)
class RemoveField(LensOp):
    """The newer version drops ``path``; its stored data stays, and older readers read
    ``default`` where newer writers did not write it."""

    path: FieldPath
    default: Atom = None
    NAME: ClassVar[str] = "remove"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "remove"))
        _scalar(self.default, "remove default")

    def inverse(self) -> LensOp:
        return AddField(self.path, self.default)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path), "default": self.default}


class _Move(LensOp):
    """A relabelling: the entry at ``source`` moves to ``target`` (with what is under it)."""

    __slots__ = ()

    @property
    def source(self) -> FieldPath:
        raise NotImplementedError

    @property
    def target(self) -> FieldPath:
        raise NotImplementedError

    def forward_path(self, path: FieldPath) -> FieldPath:
        src = self.source
        if path[: len(src)] == src:
            return self.target + path[len(src):]
        return path

    def forward_store(self, root: MapStore, prefix: FieldPath) -> MapStore:
        return _move(root, prefix + self.source, prefix + self.target)


@dataclass(frozen=True, slots=True)
class RenameField(_Move):
    """Field ``path`` is called ``to`` in the newer version (same map)."""

    path: FieldPath
    to: str
    NAME: ClassVar[str] = "rename"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "rename"))
        _name(self.to, "rename to")

    @property
    def source(self) -> FieldPath:
        return self.path

    @property
    def target(self) -> FieldPath:
        return (*self.path[:-1], self.to)

    def inverse(self) -> LensOp:
        return RenameField(self.target, self.path[-1])

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path), "to": self.to}


@dataclass(frozen=True, slots=True)
class Hoist(_Move):
    """Field ``name`` of the nested map ``host`` moves up beside ``host``."""

    host: FieldPath
    name: str
    NAME: ClassVar[str] = "hoist"

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _path(self.host, "hoist"))
        _name(self.name, "hoist name")

    @property
    def source(self) -> FieldPath:
        return (*self.host, self.name)

    @property
    def target(self) -> FieldPath:
        return (*self.host[:-1], self.name)

    def inverse(self) -> LensOp:
        return Plunge(self.host, self.name)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "host": list(self.host), "name": self.name}


@dataclass(frozen=True, slots=True)
class Plunge(_Move):
    """Field ``name`` beside the nested map ``host`` moves down into it."""

    host: FieldPath
    name: str
    NAME: ClassVar[str] = "plunge"

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _path(self.host, "plunge"))
        _name(self.name, "plunge name")

    @property
    def source(self) -> FieldPath:
        return (*self.host[:-1], self.name)

    @property
    def target(self) -> FieldPath:
        return (*self.host, self.name)

    def inverse(self) -> LensOp:
        return Hoist(self.host, self.name)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "host": list(self.host), "name": self.name}


@dataclass(frozen=True, slots=True)
class Wrap(LensOp):
    """The register ``path`` reads, in the newer version, as the tuple of its live values
    (an ``LWW[T]`` seen as ``MV[T]``): concurrent writes show instead of one winning."""

    path: FieldPath
    NAME: ClassVar[str] = "wrap"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "wrap"))

    def inverse(self) -> LensOp:
        return Head(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path)}


@dataclass(frozen=True, slots=True)
class Head(LensOp):
    """The multi-value register ``path`` reads, in the newer version, as one value (the
    winner by hybrid time of a register; the first, sorted, of a multi-value register)."""

    path: FieldPath
    NAME: ClassVar[str] = "head"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "head"))

    def inverse(self) -> LensOp:
        return Wrap(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path)}


@dataclass(frozen=True, slots=True)
class Convert(LensOp):
    """Values of field ``path`` are mapped one-to-one (``mapping`` as ``(old, new)``
    pairs); values outside the mapping pass unchanged. Applies to registers and sets."""

    path: FieldPath
    mapping: tuple[tuple[Atom, Atom], ...]
    NAME: ClassVar[str] = "convert"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path, "convert"))
        pairs = tuple((_scalar(a, "convert"), _scalar(b, "convert")) for a, b in self.mapping)
        olds = [_key(a) for a, _ in pairs]
        news = [_key(b) for _, b in pairs]
        if len(set(olds)) != len(olds) or len(set(news)) != len(news):
            raise LensError(f"convert {'.'.join(self.path)}: the mapping is not one-to-one")
        object.__setattr__(self, "mapping", pairs)

    def table(self) -> dict[Any, Any]:
        """The mapping completed into a one-to-one map of all values (keys as ``_key``):
        values the mapping maps onto but not from map back onto the values it maps from but
        not onto, in sorted order. So a convert is a permutation: it never merges two
        values, its inverse undoes it on any value, and values outside pass unchanged."""
        out = {_key(a): b for a, b in self.mapping}
        sources = {_key(a): a for a, _ in self.mapping}
        targets = {_key(b): b for _, b in self.mapping}
        free_targets = sorted((k for k in targets if k not in sources), key=_order)
        free_sources = sorted((k for k in sources if k not in targets), key=_order)
        for t, s in zip(free_targets, free_sources, strict=True):
            out[t] = sources[s]
        return out

    def forward_value(self, path: FieldPath, value: Any) -> Any:
        if path != self.path:
            return value
        return _map_atom(self.table(), value)

    def forward_store(self, root: MapStore, prefix: FieldPath) -> MapStore:
        table = self.table()
        return _update_leaf(root, prefix + self.path, lambda e: _convert_entry(e, table))

    def inverse(self) -> LensOp:
        return Convert(self.path, tuple((b, a) for a, b in self.mapping))

    def to_json(self) -> dict[str, Any]:
        return {"op": self.NAME, "path": list(self.path),
                "mapping": [[a, b] for a, b in self.mapping]}


def _key(value: Any) -> tuple[str, Any]:
    """A dict key telling ``1``, ``True`` and ``1.0`` apart (Python's equality does not)."""
    return (type(value).__name__, value)


def _order(key: tuple[str, Any]) -> tuple[str, str]:
    return key[0], repr(key[1])


def _map_atom(table: dict[Any, Any], value: Any) -> Any:
    k = _key(value)
    return table.get(k, value)


_OPS: dict[str, Callable[[dict[str, Any]], LensOp]] = {
    "add": lambda d: AddField(d["path"], d.get("default")),
    "remove": lambda d: RemoveField(d["path"], d.get("default")),
    "rename": lambda d: RenameField(d["path"], d["to"]),
    "hoist": lambda d: Hoist(d["host"], d["name"]),
    "plunge": lambda d: Plunge(d["host"], d["name"]),
    "wrap": lambda d: Wrap(d["path"]),
    "head": lambda d: Head(d["path"]),
    "convert": lambda d: Convert(d["path"], tuple(tuple(p) for p in d["mapping"])),
}


def lens_to_json(ops: Sequence[LensOp]) -> list[dict[str, Any]]:
    """A lens as JSON data."""
    return [op.to_json() for op in ops]


def lens_from_json(data: Any) -> tuple[LensOp, ...]:
    """Parse ``lens_to_json``'s form; raises LensError for anything else."""
    if not isinstance(data, list):
        raise LensError("a lens is a list of operations")
    out = []
    for item in data:
        if not isinstance(item, dict) or item.get("op") not in _OPS:
            raise LensError(f"unknown lens operation {item!r:.80}")
        try:
            out.append(_OPS[item["op"]](item))
        except (KeyError, TypeError, ValueError) as exc:
            raise LensError(f"lens operation {item['op']}: {exc}") from None
    return tuple(out)


def map_path(ops: Sequence[LensOp], path: FieldPath) -> FieldPath:
    """Where field ``path`` lands after ``ops`` (forward)."""
    for op in ops:
        path = op.forward_path(path)
    return path


def forward(ops: Sequence[LensOp], root: MapStore, prefix: FieldPath = ()) -> MapStore:
    """``root`` with the fields under ``prefix`` translated by ``ops`` in order."""
    for op in ops:
        root = op.forward_store(root, prefix)
    return root


def backward(ops: Sequence[LensOp], root: MapStore, prefix: FieldPath = ()) -> MapStore:
    """The inverse of ``forward``: the inverses of ``ops`` in reverse order."""
    for op in reversed(ops):
        root = op.inverse().forward_store(root, prefix)
    return root


def translate_fields(ops: Sequence[LensOp], doc: ORMap, *, reverse: bool = False) -> ORMap:
    """An OR-map of one worknode's fields (a state or a delta), translated; same context.
    The result is independent of ``doc`` (a copy: translation shares untouched stores)."""
    run = backward if reverse else forward
    doc = doc.copy()
    out = ORMap(context=doc.context, is_delta=doc.is_delta)
    out.store = run(ops, doc.store or MapStore()) or None
    return out


def translate_document(
    ops: Sequence[LensOp], doc: ORMap, nodes: Sequence[str] | None = None, *,
    reverse: bool = False,
) -> ORMap:
    """A worknode tree's document (state or delta) with the fields of ``nodes`` (default:
    every worknode in it) translated; same context. The result is independent of ``doc``."""
    run = backward if reverse else forward
    doc = doc.copy()
    root = doc.store or MapStore()
    for node in (list(root) if nodes is None else nodes):
        root = run(ops, root, (node, "fields"))
    out = ORMap(context=doc.context, is_delta=doc.is_delta)
    out.store = root or None
    return out


# -- store surgery: copy on write along one path ---------------------------------------------


def _map_part(entry: Any) -> MapStore | None:
    """The map held by an entry (a map, the map kind of a kind conflict), else None."""
    if type(entry) is MapStore:
        return entry
    if type(entry) is KindStore:
        m = entry.get(Kind.MAP)
        return m if type(m) is MapStore else None
    return None


def _with_map_part(entry: Any, new_map: MapStore | None) -> Any:
    """``entry`` with its map replaced by ``new_map`` (None or empty: removed); the kind
    conflict collapses to its one remaining kind, as the canonical form wants."""
    if type(entry) is KindStore:
        ks = KindStore(entry)
        if new_map:
            ks[Kind.MAP] = new_map
        else:
            ks.pop(Kind.MAP, None)
        if len(ks) == 1:
            return next(iter(ks.values()))
        return ks or None
    return new_map or None


def _take(m: MapStore, path: FieldPath, in_whole: bool) -> tuple[MapStore, Any, bool]:
    """``(m without the entry at path, the entry, whether it was inside a Whole)``."""
    k = path[0]
    child = m.get(k)
    if len(path) == 1:
        if child is None:
            return m, None, in_whole
        out = MapStore(m)
        del out[k]
        return out, child, in_whole
    if child is None:
        return m, None, in_whole
    if type(child) is Whole:
        inner = _map_part(child.store)
        if inner is None:
            return m, None, True
        rest, taken, _ = _take(inner, path[1:], True)
        out = MapStore(m)
        out[k] = Whole(_with_map_part(child.store, rest))
        return out, taken, True
    inner = _map_part(child)
    if inner is None:
        return m, None, in_whole
    rest, taken, whole = _take(inner, path[1:], in_whole)
    if rest is inner:
        return m, taken, whole
    out = MapStore(m)
    new_child = _with_map_part(child, rest)
    if new_child is None:
        del out[k]
    else:
        out[k] = new_child
    return out, taken, whole


def _put(m: MapStore, path: FieldPath, entry: Any, in_whole: bool) -> MapStore:
    """``m`` with ``entry`` at ``path`` (maps made on the way); the place must be free."""
    k = path[0]
    child = m.get(k)
    out = MapStore(m)
    if len(path) == 1:
        if in_whole and type(entry) is Whole:
            entry = entry.store  # inside a Whole the marker is implied
        if entry is None:
            return m
        if child is not None:
            raise LensError(f"lens target {k!r} is already taken")
        out[k] = entry
        return out
    if type(child) is Whole:
        inner = _map_part(child.store) or MapStore()
        out[k] = Whole(_with_map_part_or_add(child.store, _put(inner, path[1:], entry, True)))
        return out
    if child is None:
        if entry is None:
            return m
        out[k] = _put(MapStore(), path[1:], entry, in_whole)
        return out
    held = _map_part(child) or MapStore()
    out[k] = _with_map_part_or_add(child, _put(held, path[1:], entry, in_whole))
    return out


def _with_map_part_or_add(entry: Any, new_map: MapStore) -> Any:
    """``entry`` with ``new_map`` as its map: a value there (a register written under the
    map's name concurrently) stays beside it, as a kind conflict."""
    if entry is None or type(entry) is MapStore:
        return new_map or None
    if type(entry) is KindStore:
        return _with_map_part(entry, new_map)
    if not new_map:
        return entry
    return KindStore({entry.KIND: entry, Kind.MAP: new_map})


def _move(root: MapStore, source: FieldPath, target: FieldPath) -> MapStore:
    rest, taken, whole = _take(root, source, False)
    if taken is None and not whole:
        return root
    if whole and type(taken) is not Whole:
        taken = Whole(taken)
    return _put(rest, target, taken, False)


def _update_leaf(root: MapStore, path: FieldPath, fn: Callable[[Any], Any]) -> MapStore:
    """``root`` with the entry at ``path`` replaced by ``fn(entry)`` (when present)."""
    rest, taken, whole = _take(root, path, False)
    if taken is None:
        return root
    new = fn(taken)
    return _put(rest, path, Whole(new) if whole and type(new) is not Whole else new, False)


def _convert_entry(entry: Any, table: dict[Any, Any]) -> Any:
    if type(entry) is Whole:
        return Whole(_convert_entry(entry.store, table))
    if type(entry) is KindStore:
        return KindStore({k: _convert_entry(v, table) for k, v in entry.items()})
    if type(entry) is LWWStore:
        return LWWStore(x for r, n, h, v in entry.entries()
                        for x in (r, n, h, _map_atom(table, v)))
    if type(entry) is MVStore:
        return MVStore(x for r, n, v in entry.entries() for x in (r, n, _map_atom(table, v)))
    if type(entry) is SetStore:
        out = SetStore()
        for element, dots in entry.items():
            out[_map_atom(table, element)] = dots
        return out
    return entry
