"""Kinds: pydantic models whose fields are CRDTs, and the typed reads and writes through them.

A kind is a ``KindModel`` subclass with a name and a version (and, when it is not its kind's
first version, the lens from the version before)::

    class Order(KindModel, kind="order", version=1):
        title: LWW[str] = ""
        total: Counter = 0
        tags: ORSet[str] = frozenset()

Its base class, when that is a kind too, is its parent kind: the subclass inherits its
fields, and its schema names the parent.

``KindView(model, history)`` is one version of a kind over the stored shape of its first
version (``history[0]``, or the model itself): every field path of the version maps, through
the lens chain, to a path, a CRDT and a value mapping in storage. So every version writes the
same stored fields, concurrent writes of two versions converge, and each version reads the
other's writes in its own shape. Writes are validated by pydantic first (a
``KindValidationError`` naming the field; nothing written), then become ordinary writes for
``Replica.write_many``. Reads return model instances; kind conflicts in storage (a field
holding two CRDTs after concurrent writes of different types) are kept beside the instance
(``conflicts_of``), never hidden; a multi-value field shows every live value.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticUndefined

from broker.crdt import (
    INT64_MAX,
    INT64_MIN,
    MAX_FIELD_DEPTH,
    MAX_VALUE_BYTES,
    ROOT_ID,
    Add,
    Assign,
    Batch,
    Create,
    Increment,
    Kind,
    KindConflict,
    ORMap,
    Tree,
    TreeOp,
    validate_atom,
    validate_element,
    validate_node_id,
)
from broker.crdt._atoms import encode_atom
from broker.crdt._stores import (
    CLASS_OF_KIND,
    KindStore,
    LWWStore,
    MapStore,
    MVStore,
    counter_contribution,
    value_of,
)
from broker.errors import (
    InvalidArgumentError,
    UnknownNodeError,
    ValueTooLargeError,
    WorknodeError,
)
from broker.kinds._errors import KindDefinitionError, KindReadError, KindValidationError
from broker.kinds._fields import (
    VALUE_TYPES,
    Crdt,
    CrdtMarker,
    FieldSpec,
    bottom_of,
    check_field_name,
    element_check,
    value_spec,
)
from broker.kinds._lens import Convert, FieldPath, Head, LensOp, Wrap

__all__ = [
    "KIND_FIELD",
    "KindInfo",
    "KindModel",
    "KindView",
    "Write",
    "conflicts_of",
    "shape_of",
]

FIELDS_KEY = "fields"
"""Where a worknode record keeps its fields (``broker.crdt.Tree``'s layout)."""
KIND_FIELD = "_kind"
"""The field a typed create writes the kind's name to (pydantic fields never start with
``_``, so it cannot clash with a kind's own field)."""

Write = Callable[[Tree, str, int], ORMap] | TreeOp
"""One write for ``Replica.write_many``: a ``TreeOp`` or a mutator function."""

_CRDT_KIND = {Crdt.LWW: Kind.LWW, Crdt.MV: Kind.MV, Crdt.COUNTER: Kind.COUNTER,
              Crdt.SET: Kind.SET, Crdt.FLAG: Kind.FLAG, Crdt.MAP: Kind.MAP}


@dataclass(frozen=True, slots=True)
class KindInfo:
    """A kind model's identity: name, version, parent (``name@version``) and the lens from
    the version before."""

    name: str
    version: int
    parent: str | None
    lens: tuple[LensOp, ...]

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


class KindModel(BaseModel):
    """Base of every kind (with ``kind=``, ``version=``, ``lens=`` class arguments) and of
    nested map shapes (without them). Instances are frozen: a read's snapshot."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    __kind__: ClassVar[KindInfo | None] = None
    __shape__: ClassVar[tuple[tuple[str, FieldSpec], ...]] = ()
    __pending__: ClassVar[tuple[str | None, int, tuple[LensOp, ...]]] = (None, 1, ())
    _conflicts: dict[str, KindConflict] = PrivateAttr(default_factory=dict)

    def __init_subclass__(
        cls, *, kind: str | None = None, version: int = 1, lens: Sequence[LensOp] = (),
        **kw: Any,
    ) -> None:
        super().__init_subclass__(**kw)
        cls.__pending__ = (kind, version, tuple(lens))

    @classmethod
    def __pydantic_init_subclass__(cls, **kw: Any) -> None:
        super().__pydantic_init_subclass__(**kw)
        name, version, lens = cls.__pending__
        cls.__pending__ = (None, 1, ())
        if not cls.__pydantic_complete__:
            raise KindDefinitionError(
                f"{cls.__name__}: pydantic could not resolve its field annotations (a name "
                "defined later, or a class body run without a module): define the kind at "
                "module level, after the models it uses")
        cls.__shape__ = shape_of(cls)
        if name is None:
            cls.__kind__ = None
            return
        try:
            validate_node_id(name)  # a kind is a worknode of the registry subject
        except InvalidArgumentError as exc:
            raise KindDefinitionError(f"kind name: {exc}") from None
        if type(version) is not int or not 1 <= version <= INT64_MAX:
            raise KindDefinitionError(f"kind {name}: version must be a positive int")
        parent = next((b.__kind__ for b in cls.__mro__[1:]
                       if isinstance(b, type) and issubclass(b, KindModel)
                       and b.__kind__ is not None and b.__kind__.name != name), None)
        cls.__kind__ = KindInfo(name, version, parent.ref if parent else None, lens)


def conflicts_of(instance: KindModel) -> Mapping[str, KindConflict]:
    """The kind conflicts a read met, by dotted field path: the field holds several CRDTs
    (concurrent writes of different types); the instance shows the declared one's value."""
    return dict(instance._conflicts)


def _marker(metadata: Sequence[Any]) -> CrdtMarker | None:
    return next((m for m in metadata if isinstance(m, CrdtMarker)), None)


def shape_of(model: type[BaseModel], depth: int = 1) -> tuple[tuple[str, FieldSpec], ...]:
    """The field specs of a model, sorted by name; raises KindDefinitionError."""
    if depth > MAX_FIELD_DEPTH:
        raise KindDefinitionError(f"{model.__name__}: maps nest deeper than {MAX_FIELD_DEPTH}")
    out = []
    for name, info in model.model_fields.items():
        where = f"{model.__name__}.{name}"
        check_field_name(name, where)  # what a registry reader accepts, nothing more
        if info.alias not in (None, name):
            raise KindDefinitionError(f"{where}: aliases are not supported")
        out.append((name, _field_spec(info.annotation, info.metadata, info.default,
                                      info.default_factory is not None, where, depth)))
    return tuple(sorted(out))


def _field_spec(annotation: Any, metadata: Sequence[Any], default: Any, factory: bool,
                where: str, depth: int) -> FieldSpec:
    marker = _marker(metadata)
    has_default = default is not PydanticUndefined and not factory
    constraints = [m for m in metadata if not isinstance(m, CrdtMarker)]
    if constraints:
        # Not in the schema: typed writes, the fast read and a model built from the
        # registry would all skip them, so a write breaking one would silently succeed.
        raise KindDefinitionError(
            f"{where}: field constraints ({', '.join(map(repr, constraints))}) are not part "
            "of a kind's schema; use a Literal, or check values in the application")
    if marker is None:
        if isinstance(annotation, type) and issubclass(annotation, KindModel):
            return FieldSpec(Crdt.MAP, fields=shape_of(annotation, depth + 1))
        raise KindDefinitionError(
            f"{where}: declare a CRDT type (LWW[T], MV[T], Counter, ORSet[T], Flag) or a "
            "nested KindModel")
    crdt = marker.crdt
    if crdt in (Crdt.LWW, Crdt.MV, Crdt.SET):
        inner = annotation if crdt is Crdt.LWW else get_args(annotation)[0]
        tokens, enum_ = value_spec(inner, where)
        if crdt is Crdt.SET:
            element_check(tokens, where)
    else:
        tokens, enum_ = (("int",) if crdt is Crdt.COUNTER else ("bool",)), ()
    if crdt is not Crdt.LWW:
        if has_default and default != bottom_of(crdt):
            raise KindDefinitionError(
                f"{where}: a {crdt.value} field starts at {bottom_of(crdt)!r}; it cannot have "
                "another default")
        return FieldSpec(crdt, tokens, enum_)
    if has_default:
        try:
            validate_atom(default)
        except InvalidArgumentError as exc:
            raise KindDefinitionError(f"{where}: default: {exc}") from None
        if isinstance(default, bytes):
            raise KindDefinitionError(f"{where}: a bytes default cannot be stored in a schema")
    spec = FieldSpec(crdt, tokens, enum_, default if has_default else None, has_default)
    spec.check(where)  # what a schema read from the registry must pass, a model passes
    return spec


# -- validation of writes -------------------------------------------------------------------


def _atom(value: Any) -> Any:
    try:
        validate_atom(value)
    except WorknodeError as exc:  # a ValueError is what pydantic reports as a field error
        raise ValueError(str(exc)) from None
    return value


def _element(value: Any) -> Any:
    try:
        validate_element(value)
    except WorknodeError as exc:
        raise ValueError(str(exc)) from None
    return value


_INT64 = Field(ge=INT64_MIN, le=INT64_MAX)


def _write_type(spec: FieldSpec, name: str) -> Any:
    # The write model is strict (no "3" for 3, no 1 for True); a set also takes a list or a
    # set, its elements still strict.
    if spec.crdt is Crdt.MAP:
        return _write_model(spec.fields, name)
    if spec.crdt is Crdt.COUNTER:
        return Annotated[int, _INT64]
    if spec.crdt is Crdt.FLAG:
        return bool
    value = spec.value_type()
    if spec.crdt is Crdt.SET:
        element = value if spec.enum else Annotated[value, Strict()]
        return Annotated[frozenset[Annotated[element, AfterValidator(_element)]],  # type: ignore[valid-type]
                         Field(strict=False)]
    return Annotated[value, AfterValidator(_atom)]


def _write_model(shape: tuple[tuple[str, FieldSpec], ...], name: str) -> type[BaseModel]:
    # Every field is optional (default None, never validated, absent from the fields set),
    # but an explicit None is validated like any value: refused unless the field holds it.
    fields: dict[str, Any] = {n: (_write_type(s, f"{name}_{n}"), None) for n, s in shape}
    return create_model(f"{name}Write", __config__=ConfigDict(extra="forbid", strict=True),
                        **fields)


def _first_error(exc: ValidationError, kind: str) -> KindValidationError:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "(kind)"
    if len(field) > 120:  # an unknown key as long as a value: named, not echoed whole
        field = field[:100] + f"...({len(field)} chars)"
    reason = str(err["msg"])
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return KindValidationError(f"{kind}: field {field}: {reason}{more}", field=field,
                               reason=reason)


# -- the view: one version over storage -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Slot:
    """A leaf field of the version: where and how it is stored."""

    path: FieldPath
    spec: FieldSpec
    stored_path: FieldPath
    stored_crdt: Crdt
    to_store: tuple[dict[Any, Any], ...]
    """Value tables newer -> older, applied in order on writes."""
    from_store: tuple[dict[Any, Any], ...]
    """Value tables older -> newer, applied in order on reads."""

    @property
    def name(self) -> str:
        """The field's dotted name (as errors name it)."""
        return ".".join(self.path)


def _leaves(shape: tuple[tuple[str, FieldSpec], ...], prefix: FieldPath = ()
            ) -> Iterator[tuple[FieldPath, FieldSpec]]:
    for name, spec in shape:
        if spec.crdt is Crdt.MAP:
            yield from _leaves(spec.fields, (*prefix, name))
        else:
            yield (*prefix, name), spec


def _slot(path: FieldPath, spec: FieldSpec, chain: Sequence[LensOp]) -> _Slot:
    p, crdt = path, spec.crdt
    to_store: list[dict[Any, Any]] = []
    for op in reversed(chain):
        if isinstance(op, Wrap) and op.path == p:
            crdt = Crdt.LWW
        elif isinstance(op, Head) and op.path == p:
            crdt = Crdt.MV
        elif isinstance(op, Convert) and op.path == p:
            inv = op.inverse()
            assert isinstance(inv, Convert)
            to_store.append(inv.table())
        p = op.inverse().forward_path(p)
    from_store = tuple(reversed([{(type(b).__name__, b): a for (_, a), b in t.items()}
                                 for t in to_store]))  # each table is one-to-one
    return _Slot(path, spec, p, crdt, tuple(to_store), from_store)


def _convert(tables: Sequence[dict[Any, Any]], value: Any) -> Any:
    for t in tables:
        value = t.get((type(value).__name__, value), value)
    return value


def _select(entry: Any, crdt: Crdt) -> Any:
    if type(entry) is KindStore:
        return entry.get(_CRDT_KIND[crdt])
    return entry if type(entry) is CLASS_OF_KIND[_CRDT_KIND[crdt]] else None


@dataclass(frozen=True, slots=True)
class _FieldIncrement(Increment):
    """A typed write's counter increment: the same fused ``Increment``, whose out-of-range
    total is reported as a KindValidationError naming the kind's field."""

    ref: str = ""
    field: str = ""

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        try:
            return tree.apply_increment(replica_id, self.node, self.path, self.amount)
        except ValueTooLargeError as exc:
            raise self._refused(exc) from None

    def apply_into(self, tree: Tree, replica_id: str, ts: int, into: Batch) -> ORMap | None:
        try:
            return tree.increment_into(into, replica_id, self.node, self.path, self.amount)
        except ValueTooLargeError as exc:
            raise self._refused(exc) from None

    def _refused(self, exc: ValueTooLargeError) -> KindValidationError:
        return KindValidationError(f"{self.ref}: field {self.field}: {exc}",
                                   field=self.field, reason=str(exc))


class KindView:
    """One version of a kind, reading and writing the stored shape of its first version.

    ``history`` lists the kind's earlier versions, oldest (the stored shape) first; empty
    when ``model`` is the first version. The lens chain is the ``lens`` of every version
    after the first, in order.
    """

    __slots__ = ("_counters", "_plain", "_plan", "_slots", "_specs", "_writer", "chain", "info",
                 "model")

    def __init__(self, model: type[KindModel], history: Sequence[type[KindModel]] = ()) -> None:
        info = model.__kind__
        if info is None:
            raise KindDefinitionError(f"{model.__name__} is not a kind (no kind= argument)")
        last = 0
        for h in history:
            if h.__kind__ is None or h.__kind__.name != info.name:
                raise KindDefinitionError(f"{h.__name__} is not a version of kind {info.name}")
            if not last < h.__kind__.version < info.version:
                raise KindDefinitionError(
                    f"{info.ref}: its history lists versions oldest first, each older than "
                    f"it (got {h.__kind__.ref} after version {last})")
            last = h.__kind__.version
        self.model = model
        self.info = info
        chain: list[LensOp] = []
        for h in (*history[1:], model) if history else ():
            assert h.__kind__ is not None
            chain.extend(h.__kind__.lens)
        self.chain: tuple[LensOp, ...] = tuple(chain)
        self._slots = tuple(_slot(p, s, chain) for p, s in _leaves(model.__shape__))
        self._writer = _write_model(model.__shape__, model.__name__)
        self._plain = _plain(model)
        self._counters = tuple(s for s in self._slots if s.stored_crdt is Crdt.COUNTER)
        self._specs = _spec_tree(model.__shape__)
        # Per slot, what a read needs without dispatching on enums each time: the stored
        # CRDT's store class and kind, and whether the value is read as stored.
        self._plan = tuple(
            (slot.stored_path[0] if len(slot.stored_path) == 1 else None, slot.stored_path,
             CLASS_OF_KIND[_CRDT_KIND[slot.stored_crdt]], _CRDT_KIND[slot.stored_crdt],
             slot.stored_crdt is slot.spec.crdt and not slot.from_store,
             slot.path[0] if len(slot.path) == 1 else None, _default_of(slot.spec), slot)
            for slot in self._slots)

    # -- writing -----------------------------------------------------------------------------

    def validate(self, changes: Mapping[str, Any]) -> dict[FieldPath, Any]:
        """The changes as ``{field path: validated value}``; raises KindValidationError."""
        out: dict[FieldPath, Any] = {}
        for v in changes.values():
            if type(v) not in _TOKENS and isinstance(v, (BaseModel, dict)):
                changes = _unmodel(changes)
                break
        # Plain values of exactly the declared types (the common case) are checked here;
        # anything else goes through pydantic, which accepts or names the field and why.
        if _fast_changes(self._specs, changes, (), out):
            return out
        out.clear()
        try:
            checked = self._writer.model_validate(changes)
        except ValidationError as exc:
            raise _first_error(exc, self.info.ref) from None
        _flatten(checked, (), out)
        return out

    def ops(self, node_id: str, /, **changes: Any) -> list[Write]:
        """The writes of ``changes`` to worknode ``node_id``, validated first (raises
        KindValidationError: nothing is written). A register or multi-value field takes a
        value, a counter an amount to add, a set the elements to add, a flag True (enable)
        or False (disable), a nested map a dict of its own changes."""
        values = self.validate(changes)
        counters = [(s, values[s.path]) for s in self._counters if s.path in values]
        if len(counters) == 1 and self._plain:
            # The one increment goes first: if the counter's total would leave int64 it
            # raises before anything is applied, and ``write_many`` then applies nothing
            # (no guard to run: a guard reads the counter once more).
            (slot, amount), = counters
            return [_FieldIncrement(node_id, slot.stored_path, amount, self.info.ref,
                                    slot.name),
                    *self._writes(node_id, values, skip=slot.path)]
        guard = [self._counter_guard(node_id, counters)] if counters else []
        if not self._plain:
            guard.append(self._validator_guard(node_id, values))
        return guard + self._writes(node_id, values)

    def _after(self, current: dict[str, Any], values: dict[FieldPath, Any]) -> dict[str, Any]:
        """``current`` (a model dump) as the next read would show it once ``values`` are
        written here (no concurrent writes)."""
        for slot in self._slots:
            if slot.path not in values:
                continue
            value, parent = values[slot.path], current
            for k in slot.path[:-1]:
                parent = parent.setdefault(k, {})
            k, crdt = slot.path[-1], slot.spec.crdt
            if crdt is Crdt.COUNTER:
                parent[k] = (parent.get(k) or 0) + value
            elif crdt is Crdt.SET:
                parent[k] = frozenset(parent.get(k) or ()) | frozenset(value)
            elif crdt is Crdt.MV:
                parent[k] = (value,)
            else:
                parent[k] = value
        return current

    def _check_model(self, data: dict[str, Any]) -> None:
        """Run the model's own validators over ``data``; raises KindValidationError."""
        try:
            self.model.model_validate(data)
        except ValidationError as exc:
            raise _first_error(exc, self.info.ref) from None

    def _validator_guard(self, node: str, values: dict[FieldPath, Any]
                         ) -> Callable[[Tree, str, int], ORMap]:
        """A first write that runs the model's validators over the worknode as the write
        would leave it: a model with validators of its own refuses a write that breaks them
        (the changes alone were checked against the field types only)."""
        def guard(tree: Tree, replica: str, ts: int) -> ORMap:
            try:
                current = self.read(tree, node).model_dump()
            except KindReadError:
                return ORMap(is_delta=True)  # stored data that does not fit: this may fix it
            self._check_model(self._after(current, values))
            return ORMap(is_delta=True)

        return guard

    def _writes(self, node_id: str, values: dict[FieldPath, Any], *,
                skip: FieldPath | None = None) -> list[Write]:
        out: list[Write] = []
        for slot in self._slots:
            path = slot.path
            if path in values and path != skip:
                out.extend(self._ops_for(node_id, slot, values[path]))
        return out

    def _counter_guard(self, node: str, counters: list[tuple[_Slot, int]]
                       ) -> Callable[[Tree, str, int], ORMap]:
        """A first write that refuses the whole ``ops`` when an increment would take a
        counter's total out of range: amounts are validated alone, totals only here (a
        write that fails in ``write_many`` keeps the writes before it)."""
        ref = self.info.ref

        def guard(tree: Tree, replica: str, ts: int) -> ORMap:
            _require(tree, node)
            fields = _map_in((tree.state.store or {}).get(node), (FIELDS_KEY,), (), {})
            for slot, amount in counters:
                parent = _map_in(fields, slot.stored_path[:-1], (), {})
                entry = parent.get(slot.stored_path[-1]) if parent is not None else None
                try:
                    counter_contribution(_select(entry, Crdt.COUNTER), replica, amount)
                except WorknodeError as exc:
                    field = ".".join(slot.path)
                    raise KindValidationError(f"{ref}: field {field}: {exc}", field=field,
                                              reason=str(exc)) from None
            return ORMap(is_delta=True)

        return guard

    def create_ops(self, node_id: str, /, parent: str = ROOT_ID, **changes: Any) -> list[Write]:
        """Create worknode ``node_id`` of this kind (its ``_kind`` field names the kind),
        then ``ops`` of ``changes``, which must set every register without a default
        (KindValidationError otherwise: nothing is written)."""
        values = self.validate(changes)  # validated before anything is built
        for slot in self._slots:
            # A register without a default that a create leaves unwritten would make every
            # read of the worknode fail ("Field required"): refuse the create instead.
            if (slot.spec.crdt is Crdt.LWW and not slot.spec.has_default
                    and slot.path not in values):
                field = ".".join(slot.path)
                raise KindValidationError(f"{self.info.ref}: field {field}: Field required",
                                          field=field, reason="Field required")
        if not self._plain:
            self._check_model(self._after({}, values))
        writes = self._writes(node_id, values)
        return [Create(node_id, parent), Assign(node_id, (KIND_FIELD,), self.info.name),
                *writes]

    def discard_ops(self, node_id: str, field: str, elements: Sequence[Any]) -> list[Write]:
        """Writes removing ``elements`` (as observed) from set field ``field`` (dotted)."""
        slot = self._slot(field, Crdt.SET)
        try:
            values = [_convert(slot.to_store, validate_element(e)) for e in elements]
        except InvalidArgumentError as exc:
            raise KindValidationError(f"{self.info.ref}: field {field}: {exc}", field=field,
                                      reason=str(exc)) from None
        path = slot.stored_path

        def discard(tree: Tree, replica: str, ts: int) -> ORMap:
            _require(tree, node_id)
            delta = ORMap()
            for v in values:
                delta.merge(tree.discard(replica, node_id, path, v))
            return delta

        return [discard]

    def _slot(self, field: str, crdt: Crdt) -> _Slot:
        path = tuple(field.split("."))
        for slot in self._slots:
            if slot.path == path and slot.spec.crdt is crdt:
                return slot
        raise KindValidationError(f"{self.info.ref}: field {field}: no {crdt.value} field "
                                  "of that name", field=field, reason="no such field")

    @staticmethod
    def _ops_for(node: str, slot: _Slot, value: Any) -> list[Write]:
        path, crdt = slot.stored_path, slot.stored_crdt
        if crdt is Crdt.COUNTER:
            return [Increment(node, path, value)]
        if crdt is Crdt.SET:
            return [Add(node, path, _convert(slot.to_store, e))
                    for e in sorted(value, key=encode_atom)]
        if crdt is Crdt.FLAG:
            return [_flag(node, path, value)]
        if slot.spec.crdt is Crdt.MV and crdt is Crdt.LWW:
            value = value if not isinstance(value, tuple) else value[0]
        if slot.to_store:
            value = _convert(slot.to_store, value)
        if crdt is Crdt.MV:
            return [_multi(node, path, value)]
        return [Assign(node, path, value)]

    # -- reading -----------------------------------------------------------------------------

    def read(self, tree: Tree, node_id: str) -> KindModel:
        """Worknode ``node_id`` as an instance of the model (raises UnknownNodeError,
        KindReadError when a stored value does not fit the model)."""
        record = (tree.state.store or {}).get(node_id)
        if record is None:
            raise UnknownNodeError(f"no worknode {node_id!r}")
        conflicts: dict[str, KindConflict] = {}
        fields = _map_in(record, (FIELDS_KEY,), (), conflicts)
        return self.read_fields(fields, conflicts)

    def read_fields(self, fields: MapStore | None,
                    conflicts: dict[str, KindConflict] | None = None) -> KindModel:
        """A worknode's stored fields map as an instance of the model."""
        conflicts = {} if conflicts is None else conflicts
        data: dict[str, Any] = {}
        for top, stored, cls, kind, plain, name, default, slot in self._plan:
            if top is not None:
                entry = fields.get(top) if fields is not None else None
            else:
                parent = _map_in(fields, stored[:-1], (), conflicts)
                entry = parent.get(stored[-1]) if parent is not None else None
            store: Any = None
            if entry is not None:
                if type(entry) is cls:
                    store = entry
                elif type(entry) is KindStore:
                    conflicts[".".join(slot.path)] = KindConflict(value_of(entry))
                    store = entry.get(kind)
            if store is None:
                if default is _NO_DEFAULT:
                    continue
                value = default
            else:
                value = value_of(store) if plain else self._value(slot, store)
            if name is not None:
                data[name] = value
            else:
                _place(data, slot.path, value)
        # Stored values of exactly the declared types (the common case) make the instance
        # directly; anything else goes through pydantic, which converts or names the field.
        fast = _fast_build(self.model, data, conflicts) if self._plain else None
        if fast is not None:
            return fast
        try:
            out = self.model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            raise KindReadError(f"{self.info.ref}: stored field {field}: {err['msg']}",
                                field=field) from None
        out._conflicts = conflicts
        return out

    @staticmethod
    def _value(slot: _Slot, store: Any) -> Any:
        view = slot.spec.crdt
        if type(store) is LWWStore and view is Crdt.MV:
            raw: Any = tuple(sorted({e[3] for e in store.entries()}, key=encode_atom))
        elif type(store) is MVStore and view is Crdt.LWW:
            values = value_of(store)
            raw = values[0] if values else None
        else:
            raw = value_of(store)
        if not slot.from_store:
            return raw
        if isinstance(raw, tuple):
            return tuple(_convert(slot.from_store, v) for v in raw)
        if isinstance(raw, frozenset):
            return frozenset(_convert(slot.from_store, v) for v in raw)
        return _convert(slot.from_store, raw)

    def read_all(self, tree: Tree) -> dict[str, KindModel]:
        """Every worknode whose ``_kind`` field names this kind, read as the model."""
        out = {}
        for node in sorted(tree.nodes()):
            fields = _map_in((tree.state.store or {}).get(node), (FIELDS_KEY,), (), {})
            marker = _select(fields.get(KIND_FIELD) if fields else None, Crdt.LWW)
            if marker is not None and value_of(marker) == self.info.name:
                out[node] = self.read(tree, node)
        return out


_TOKENS = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str",
           bytes: "bytes"}


def _fast_value(spec: FieldSpec, value: Any) -> bool:
    """Whether ``value`` is, as it is, a value of a field of ``spec`` (a subset of what
    pydantic's strict validation accepts unchanged)."""
    crdt = spec.crdt
    if crdt is Crdt.COUNTER:
        return type(value) is int and INT64_MIN <= value <= INT64_MAX
    if crdt is Crdt.FLAG:
        return type(value) is bool
    if crdt is Crdt.SET:
        return (type(value) in (set, frozenset)
                and all(_fast_atom(spec, e, element=True) for e in value))
    return _fast_atom(spec, value)


def _fast_atom(spec: FieldSpec, value: Any, *, element: bool = False) -> bool:
    token = _TOKENS.get(type(value))
    if token is None:
        return False
    if spec.enum:
        if not any(type(v) is type(value) and v == value for v in spec.enum):
            return False
    elif token not in spec.types:
        return False
    if not element:  # the common register values, checked as validate_atom does, inline
        t = type(value)
        if t is str:
            if value.isascii():
                return len(value) <= MAX_VALUE_BYTES
        elif t is int:
            return bool(INT64_MIN <= value <= INT64_MAX)
        elif t is bool or value is None:
            return True
    try:
        (validate_element if element else validate_atom)(value)
    except WorknodeError:
        return False
    return True


def _unmodel(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` with nested model instances (a map field given as its model) as dicts of
    the fields they set."""
    out = dict(changes)
    for name, value in changes.items():
        if isinstance(value, BaseModel):
            out[name] = _unmodel({k: getattr(value, k) for k in value.model_fields_set})
        elif type(value) is dict:
            out[name] = _unmodel(value)
    return out


_SpecTree = dict[str, tuple[FieldSpec, Any]]


def _spec_tree(shape: tuple[tuple[str, FieldSpec], ...]) -> _SpecTree:
    """``{name: (spec, the map's own tree or None)}``, made once per view."""
    return {n: (s, _spec_tree(s.fields) if s.crdt is Crdt.MAP else None) for n, s in shape}


def _fast_changes(specs: _SpecTree, changes: Any, prefix: FieldPath,
                  out: dict[FieldPath, Any]) -> bool:
    if type(changes) is not dict:
        return False
    for name, value in changes.items():
        found = specs.get(name)
        if found is None:
            return False
        spec, nested = found
        if nested is not None:
            if not _fast_changes(nested, value, (*prefix, name), out):
                return False
        elif _fast_value(spec, value):
            out[(*prefix, name)] = frozenset(value) if spec.crdt is Crdt.SET else value
        else:
            return False
    return True


def _plain(model: type[BaseModel]) -> bool:
    """Whether ``model`` (and every nested model) has no validators and no settings of its
    own: only then may a read skip pydantic for values already of their declared types
    (else pydantic runs on reads, and over the result of every write)."""
    d = model.__pydantic_decorators__
    if d.validators or d.field_validators or d.model_validators or d.root_validators:
        return False
    own = {k: v for k, v in model.model_config.items() if k != "title"}
    if own != KindModel.model_config:  # str_to_lower, str_max_length, ...: pydantic's work
        return False
    return all(_plain(f.annotation) for f in model.model_fields.values()
               if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))


def _fast_build(model: type[KindModel], data: dict[str, Any],
                conflicts: dict[str, KindConflict]) -> KindModel | None:
    """``model`` made from ``data`` without validation when every value is exactly of its
    field's type and every field without a default is there; else None. Stored values are
    atoms already (checked when written or decoded): only their types are looked at."""
    values: dict[str, Any] = {}
    for name, code, allowed, enum_, info, nested in _build_plan(model):
        if name not in data:
            if info.is_required():
                return None
            values[name] = info.get_default(call_default_factory=True)
            continue
        value = data[name]
        if code == _C_MAP:
            value = _fast_build(nested, value, {})
            if value is None:
                return None
        elif code == _C_SCALAR:
            if not (type(value) in allowed if not enum_ else _in_enum(enum_, value)):
                return None
        elif code == _C_MANY:  # a multi-value register's tuple, a set's frozenset
            if type(value) is not nested or not all(
                    type(v) in allowed if not enum_ else _in_enum(enum_, v) for v in value):
                return None
        elif type(value) is not allowed:  # a counter's int, a flag's bool
            return None
        values[name] = value
    # What model_construct does, without its per-call setup: the instance's four slots.
    out = model.__new__(model)
    object.__setattr__(out, "__dict__", values)
    object.__setattr__(out, "__pydantic_fields_set__", set(values))
    object.__setattr__(out, "__pydantic_extra__", None)
    object.__setattr__(out, "__pydantic_private__", {"_conflicts": conflicts})
    return out


_NO_DEFAULT: Any = object()


def _default_of(spec: FieldSpec) -> Any:
    """What an unwritten field reads as: its default, its CRDT's bottom, or nothing."""
    if spec.has_default:
        return spec.default
    return _NO_DEFAULT if spec.crdt is Crdt.LWW else bottom_of(spec.crdt)


def _in_enum(enum_: tuple[Any, ...], value: Any) -> bool:
    return any(type(v) is type(value) and v == value for v in enum_)


_C_SCALAR, _C_MANY, _C_ONE, _C_MAP = range(4)
_PLANS: weakref.WeakKeyDictionary[type[BaseModel], tuple[tuple[str, int, Any, Any, Any, Any],
                                                          ...]] = weakref.WeakKeyDictionary()
"""Per model class; weak, so models built at run time (``Registry.view``) can be freed."""


def _build_plan(model: type[KindModel]) -> tuple[tuple[str, int, Any, Any, Any, Any], ...]:
    """Per field, what ``_fast_build`` checks: ``(name, code, allowed types, enum,
    FieldInfo, nested model or container type)`` (cached per model)."""
    plan = _PLANS.get(model)
    if plan is None:
        rows: list[tuple[str, int, Any, Any, Any, Any]] = []
        for name, spec in model.__shape__:
            info = model.model_fields[name]
            allowed = frozenset(VALUE_TYPES[t] for t in spec.types)
            if spec.crdt is Crdt.MAP:
                rows.append((name, _C_MAP, None, (), info, info.annotation))
            elif spec.crdt in (Crdt.MV, Crdt.SET):
                container = tuple if spec.crdt is Crdt.MV else frozenset
                rows.append((name, _C_MANY, allowed, spec.enum, info, container))
            elif spec.crdt in (Crdt.COUNTER, Crdt.FLAG):
                rows.append((name, _C_ONE, int if spec.crdt is Crdt.COUNTER else bool, (),
                             info, None))
            else:
                rows.append((name, _C_SCALAR, allowed, spec.enum, info, None))
        plan = tuple(rows)
        _PLANS[model] = plan
    return plan


def _map_in(entry: Any, path: FieldPath, where: FieldPath,
            conflicts: dict[str, KindConflict]) -> MapStore | None:
    """The map at ``path`` under ``entry`` (recording kind conflicts met on the way)."""
    for k in path:
        if entry is None:
            return None
        if type(entry) is KindStore:
            if where:
                conflicts.setdefault(".".join(where), KindConflict(value_of(entry)))
            entry = entry.get(Kind.MAP)
        if type(entry) is not MapStore:
            return None
        entry = entry.get(k)
        where = (*where, k) if k != FIELDS_KEY or where else ()
    if type(entry) is KindStore:
        if where:
            conflicts.setdefault(".".join(where), KindConflict(value_of(entry)))
        entry = entry.get(Kind.MAP)
    return entry if type(entry) is MapStore else None


def _place(data: dict[str, Any], path: FieldPath, value: Any) -> None:
    for k in path[:-1]:
        data = data.setdefault(k, {})
    data[path[-1]] = value


def _flatten(model: BaseModel, prefix: FieldPath, out: dict[FieldPath, Any]) -> None:
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _flatten(value, (*prefix, name), out)
        else:
            out[(*prefix, name)] = value


def _require(tree: Tree, node: str) -> None:
    if node not in tree:
        raise UnknownNodeError(f"no worknode {node!r}")


def _fields_path(node: str, path: FieldPath) -> FieldPath:
    return (node, FIELDS_KEY, *path)


def _multi(node: str, path: FieldPath, value: Any) -> Callable[[Tree, str, int], ORMap]:
    def write(tree: Tree, replica: str, ts: int) -> ORMap:
        _require(tree, node)
        return tree.assign_multi(replica, node, path, value)
    return write


def _flag(node: str, path: FieldPath, on: bool) -> Callable[[Tree, str, int], ORMap]:
    def write(tree: Tree, replica: str, ts: int) -> ORMap:
        _require(tree, node)
        full = _fields_path(node, path)
        return tree.state.enable(replica, full) if on else tree.state.disable(full)
    return write
