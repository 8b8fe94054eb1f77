"""The kind registry: kind schemas stored as CRDT state in a subject of their own.

Layout (one worknode per kind, in the registry subject's tree)::

    <kind name>: {"_kind": "kind-schema",
                  "versions": add-only set of schema texts (KindSchema.to_json),
                  "active": last-writer-wins register: the active version}

The set is only ever added to, so the registry replicates, heals and converges like any
subject, and a version once registered stays readable. Two nodes registering different
schemas under one version number concurrently both land in the set; ``Registry`` reports
that version as ``conflicted`` and refuses to use it (never picks one silently).

Registration runs the compatibility gate (``check_new``) against every version registered
here first: a breaking finding raises IncompatibleKindError and nothing is written.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from broker.crdt import Add, Assign, Create, Tree
from broker.crdt._stores import LWWStore, SetStore, value_of
from broker.kinds._compat import BREAKING, Finding, check_new
from broker.kinds._errors import IncompatibleKindError, SchemaFormatError, UnknownKindError
from broker.kinds._fields import Crdt
from broker.kinds._model import (
    FIELDS_KEY,
    KIND_FIELD,
    KindModel,
    KindView,
    Write,
    _map_in,
    _select,
)
from broker.kinds._schema import KindSchema

__all__ = ["REGISTRY_KIND", "Registry"]

REGISTRY_KIND: Final = "kind-schema"
"""The ``_kind`` of a registry worknode."""
_VERSIONS: Final = "versions"
_ACTIVE: Final = "active"


@dataclass(frozen=True)
class Registry:
    """The kinds of a registry subject, read from its tree."""

    schemas: Mapping[str, Mapping[int, KindSchema]] = field(default_factory=dict)
    active: Mapping[str, int] = field(default_factory=dict)
    conflicted: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Versions stored with more than one schema (concurrent registrations)."""
    skipped: tuple[str, ...] = ()
    """Why entries were skipped (not schema text of this format), one line each."""
    nodes: frozenset[str] = frozenset()
    """Every worknode of the registry subject (a kind's worknode may hold no valid schema)."""

    @classmethod
    def from_tree(cls, tree: Tree) -> Registry:
        """Read a registry subject's tree. Entries are refused (skipped, and listed in
        ``skipped`` with the reason) when they are not schema text of this format, name
        another kind, or fail the compatibility gate against the versions before them that
        passed: the registry's writers are trusted with the subject, not with the gate (a
        peer writing past ``register_ops``, or two versions registered concurrently, each
        checked against a history without the other)."""
        schemas: dict[str, dict[int, KindSchema]] = {}
        active: dict[str, int] = {}
        conflicted: dict[str, set[int]] = {}
        skipped: list[str] = []
        for node in sorted(tree.nodes()):
            fields = _map_in((tree.state.store or {}).get(node), (FIELDS_KEY,), (), {})
            if fields is None:
                continue
            # _select: a value written beside the set (a kind conflict) hides nothing
            versions = _select(fields.get(_VERSIONS), Crdt.SET)
            if type(versions) is not SetStore:
                continue
            candidates: dict[int, list[KindSchema]] = {}
            for text in sorted(e for e in value_of(versions) if isinstance(e, str)):
                try:
                    schema = KindSchema.from_json(text)
                except SchemaFormatError as exc:
                    skipped.append(f"{node}: {exc}")
                    continue
                if schema.name != node:
                    skipped.append(f"{node}: holds a schema of kind {schema.name}")
                    continue
                candidates.setdefault(schema.version, []).append(schema)
            passed: list[KindSchema] = []  # versions that passed, for the later ones' gate
            for version in sorted(candidates):
                fit = []
                for schema in candidates[version]:
                    breaking = [f for f in check_new(passed, schema) if f.kind == BREAKING]
                    if breaking:
                        skipped.append(f"{node}: {schema.ref} refused by the compatibility "
                                       f"gate: {breaking[0].format()}")
                    elif schema not in fit:
                        fit.append(schema)
                if not fit:
                    continue
                schemas.setdefault(node, {})[version] = fit[0]
                if len(fit) > 1:
                    conflicted.setdefault(node, set()).add(version)
                else:
                    passed.append(fit[0])
            reg = _select(fields.get(_ACTIVE), Crdt.LWW)
            if type(reg) is LWWStore and type(value_of(reg)) is int:
                active[node] = value_of(reg)
        return cls(schemas, active, {k: tuple(sorted(v)) for k, v in conflicted.items()},
                   tuple(skipped), tree.nodes())

    def kinds(self) -> list[str]:
        """Names of the registered kinds, sorted."""
        return sorted(self.schemas)

    def versions(self, name: str) -> list[int]:
        """Registered versions of kind ``name``, oldest first (raises UnknownKindError)."""
        if name not in self.schemas:
            refused = [line for line in self.skipped if line.startswith(f"{name}: ")]
            why = (f" ({len(refused)} stored entr{'y' if len(refused) == 1 else 'ies'} "
                   f"refused; the first: {refused[0][len(name) + 2:]:.200})" if refused else "")
            raise UnknownKindError(f"no kind {name!r} is registered{why}")
        return sorted(self.schemas[name])

    def get(self, name: str, version: int | None = None) -> KindSchema:
        """Version ``version`` (default: the active one, else the newest) of kind ``name``."""
        versions = self.versions(name)
        if version is None:
            version = self.active.get(name, versions[-1])
        if version not in self.schemas[name]:
            raise UnknownKindError(f"kind {name!r} has no version {version}")
        if version in self.conflicted.get(name, ()):
            raise IncompatibleKindError(
                f"kind {name}@{version} was registered twice with different schemas; "
                "register a new version")
        return self.schemas[name][version]

    def history(self, name: str, upto: int) -> list[KindSchema]:
        """Versions of ``name`` up to ``upto``, oldest first."""
        return [self.get(name, v) for v in self.versions(name) if v <= upto]

    def view(self, name: str, version: int | None = None) -> KindView:
        """A view of a registered version, with a model built from its schema: how a service
        reads and writes a kind it was not built with."""
        target = self.get(name, version)
        models = [s.to_model() for s in self.history(name, target.version)]
        return KindView(models[-1], models[:-1])

    def view_for(self, model: type[KindModel]) -> KindView:
        """A view of ``model`` (a version built into this service) over the registered
        history; raises IncompatibleKindError if the registry holds another schema under
        its version, UnknownKindError if the kind is not registered."""
        schema = KindSchema.of_model(model)
        earlier = [s for s in self.history(schema.name, schema.version)
                   if s.version < schema.version]
        registered = self.schemas.get(schema.name, {}).get(schema.version)
        if registered is not None and registered != schema:
            raise IncompatibleKindError(
                f"{schema.ref} differs from the schema registered under that version")
        return KindView(model, [s.to_model() for s in earlier])

    def check(self, schema: KindSchema) -> list[Finding]:
        """The gate's findings for registering ``schema`` here."""
        return check_new(list(self.schemas.get(schema.name, {}).values()), schema)

    def register_ops(self, schema: KindSchema, *, activate: bool = True) -> list[Write]:
        """The writes registering ``schema`` (and making it active), after the gate:
        raises IncompatibleKindError with the breaking findings, writing nothing.
        Registering a version again with the same schema only (re)activates it."""
        findings = self.check(schema)
        breaking = [f for f in findings if f.kind == BREAKING]
        if breaking:
            raise IncompatibleKindError(
                f"{schema.ref} is incompatible: " + "; ".join(f.format() for f in breaking),
                tuple(breaking))
        ops: list[Write] = []
        if schema.name not in self.nodes:
            ops += [Create(schema.name), Assign(schema.name, (KIND_FIELD,), REGISTRY_KIND)]
        if self.schemas.get(schema.name, {}).get(schema.version) is None:
            ops.append(Add(schema.name, (_VERSIONS,), schema.to_json()))
        if activate:
            ops.append(Assign(schema.name, (_ACTIVE,), schema.version))
        return ops

    def activate_ops(self, name: str, version: int) -> list[Write]:
        """The write making ``version`` of ``name`` the active one (it must be registered)."""
        self.get(name, version)
        return [Assign(name, (_ACTIVE,), version)]


def registry_of(trees: Sequence[Tree]) -> Registry:
    """The registry of the join of several trees (a helper for tools and tests)."""
    joined = Tree()
    for t in trees:
        joined.merge(t.state)
    return Registry.from_tree(joined)
