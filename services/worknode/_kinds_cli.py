"""``worknode kinds``: typed kinds' schemas, their compatibility gate, and the registry.

Offline (CI): ``check FILE...`` runs the FULL_TRANSITIVE gate over every version of every
kind the files define; ``diff OLD NEW`` compares two versions. A FILE is a Python file of
``KindModel`` classes (``models.py``, or ``models.py:OrderV2`` for one class) or a kind
schema's JSON text (``*.json``, as ``show --json`` prints it).

Online (the registry subject, ``kinds`` by default, replicated like any subject):
``register FILE`` (refused with the gate's findings when incompatible), ``list``, ``show
NAME[@VERSION]``.

Output in the style of ``worknode schema check``: one line per finding on stdout
(``where: RULE: message [pairs]``), lint findings as ``warning: ...`` with ``--lint``, a
summary on stderr. Exit codes: 0 compatible, 1 breaking findings (or any failure: one
``error:`` line on stderr), 2 usage error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from broker.crdt import ORMap, Tree
from broker.errors import WorknodeError
from broker.kinds import (
    KIND_FIELD,
    Finding,
    KindModel,
    KindSchema,
    KindView,
    Migration,
    Registry,
    check_all,
    check_new,
    conflicts_of,
)
from broker.kinds._compat import BREAKING, LINT
from broker.replica import Replica
from services._config import load_settings

__all__ = [
    "DEFAULT_REGISTRY_SUBJECT", "kind_view_of", "kinds", "load_migration", "load_models",
    "load_schemas",
    "register_kinds", "typed_lines", "typed_tree",
]

DEFAULT_REGISTRY_SUBJECT = "kinds"
"""The subject the kind registry lives in, unless ``--registry-subject`` says otherwise."""


class KindSourceError(click.ClickException):
    """A kind source file that cannot be loaded (one line: which file, why)."""


def load_models(spec: str) -> list[type[KindModel]]:
    """The kind models a Python file defines (``path.py`` or ``path.py:Class``)."""
    path_text, _, wanted = spec.partition(":")
    module = _load_module(Path(path_text))
    found = [v for k, v in vars(module).items()
             if isinstance(v, type) and issubclass(v, KindModel) and v.__kind__ is not None
             and v.__module__ == module.__name__ and (not wanted or k == wanted)]
    if not found:
        raise KindSourceError(f"{spec}: defines no kind" + (f" named {wanted}" if wanted
                                                            else ""))
    return found


def _load_module(path: Path) -> Any:
    """A Python file, loaded as a module of its own (errors: one line naming the file)."""
    if not path.is_file():
        raise KindSourceError(f"{path}: no such file")
    name = "_worknode_kinds_" + hashlib.blake2b(str(path.resolve()).encode(),
                                                digest_size=6).hexdigest()
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise KindSourceError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # pydantic resolves the module's annotations through it
    # Warnings are held until the file loads: one that leads to the error (pydantic's about
    # a field name the kind then refuses) must not add lines before the one error line.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            module_spec.loader.exec_module(module)
        except WorknodeError as exc:
            raise KindSourceError(f"{path}: {exc}") from None
        except Exception as exc:  # any error in a user's file is one line
            raise KindSourceError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from None
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return module


def load_migration(spec: str) -> Migration:
    """The ``Migration`` named by ``FILE.py:NAME``."""
    path_text, _, name = spec.partition(":")
    if not name:
        raise KindSourceError(f"{spec}: name the migration (FILE.py:NAME)")
    module = _load_module(Path(path_text))
    found = getattr(module, name, None)
    if not isinstance(found, Migration):
        raise KindSourceError(f"{spec}: {name} is not a broker.kinds.Migration")
    return found


def load_schemas(specs: Sequence[str]) -> list[KindSchema]:
    """The kind schemas of source files (Python model files or schema JSON)."""
    out: list[KindSchema] = []
    for spec in specs:
        if spec.endswith(".json"):
            try:
                text = Path(spec).read_text(encoding="utf-8")
            except OSError as exc:
                raise KindSourceError(f"{spec}: {exc.strerror or exc}") from None
            try:
                out.append(KindSchema.from_json(text))
            except WorknodeError as exc:
                raise KindSourceError(f"{spec}: {exc}") from None
        else:
            out.extend(KindSchema.of_model(m) for m in load_models(spec))
    return out


def _print_findings(findings: Sequence[Finding], lint: bool, fmt: str,
                    compared: int) -> int:
    breaking = [f for f in findings if f.kind == BREAKING]
    warnings = [f for f in findings if f.kind == LINT]
    code = 1 if breaking else (3 if lint and warnings else 0)
    if fmt == "json":
        click.echo(json.dumps({"exit_code": code,
                               "findings": [f.to_json() for f in breaking],
                               "warnings": [f.to_json() for f in warnings] if lint else []},
                              indent=1, ensure_ascii=False))
        return code
    for f in breaking:
        click.echo(f.format())
    if lint:
        for f in warnings:
            click.echo(f"warning: {f.format()}")
    if breaking:
        click.echo(f"kinds check: {len(breaking)} breaking change(s)", err=True)
    else:
        click.echo(f"kinds check: OK ({compared} versions checked)", err=True)
    return code


@click.group("kinds")
def kinds() -> None:
    """Typed worknode kinds: schemas, compatibility, the registry."""


@kinds.command("check")
@click.argument("files", nargs=-1, required=True)
@click.option("--lint", is_flag=True, help="Also report lint findings; exit 3 if they are all.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def check_command(files: tuple[str, ...], lint: bool, fmt: str) -> None:
    """Fail on any breaking change between the versions of each kind FILES define: every
    version against every earlier one (FULL_TRANSITIVE)."""
    schemas = load_schemas(files)
    by_kind: dict[str, list[KindSchema]] = {}
    for s in schemas:
        by_kind.setdefault(s.name, []).append(s)
    findings = [f for name in sorted(by_kind) for f in check_all(by_kind[name])]
    raise SystemExit(_print_findings(findings, lint, fmt, len(schemas)))


@kinds.command("diff")
@click.argument("old")
@click.argument("new")
def diff_command(old: str, new: str) -> None:
    """Show what changed from version OLD to NEW (one kind each) and the gate's findings."""
    a, b = (_one(load_schemas([x]), x) for x in (old, new))
    if a.name != b.name:
        raise KindSourceError(f"{new}: kind {b.name} is not kind {a.name}: diff compares two "
                              "versions of one kind")
    for line in diff_lines(a, b):
        click.echo(line)
    raise SystemExit(_print_findings(check_new([a], b), True, "text", 2))


def _one(schemas: Sequence[KindSchema], spec: str) -> KindSchema:
    if len(schemas) != 1:
        raise KindSourceError(f"{spec}: defines {len(schemas)} kinds; name one "
                              "(FILE.py:Class)")
    return schemas[0]


def diff_lines(a: KindSchema, b: KindSchema) -> list[str]:
    """``+ field``, ``- field``, ``~ field: old -> new`` and ``lens: op`` lines."""
    def flat(s: KindSchema) -> dict[str, str]:
        out: dict[str, str] = {}

        def walk(fields: Any, prefix: str) -> None:
            for name, spec in fields:
                if spec.fields:
                    walk(spec.fields, f"{prefix}{name}.")
                else:
                    out[prefix + name] = json.dumps(spec.to_json(), sort_keys=True)
        walk(s.fields, "")
        return out

    fa, fb = flat(a), flat(b)
    lines = [f"{a.ref} -> {b.ref}"]
    lines += [f"- {k}: {fa[k]}" for k in sorted(fa.keys() - fb.keys())]
    lines += [f"+ {k}: {fb[k]}" for k in sorted(fb.keys() - fa.keys())]
    lines += [f"~ {k}: {fa[k]} -> {fb[k]}" for k in sorted(fa.keys() & fb.keys())
              if fa[k] != fb[k]]
    lines += [f"lens: {json.dumps(op.to_json(), sort_keys=True)}" for op in b.lens]
    return lines


# -- the registry subject -------------------------------------------------------------------


def _registry_options(fn: Any) -> Any:
    return click.option("--registry-subject", default=DEFAULT_REGISTRY_SUBJECT,
                        show_default=True, help="The subject the kind registry lives in.")(fn)


async def _with_registry(kw: dict[str, Any], subject: str,
                         work: Any) -> Any:
    """Start a one-shot replica of the registry subject (caught up from a peer), run
    ``work(replica)``, flush, stop."""
    from services.worknode._service import WorknodeService
    from services.worknode._settings import one_shot_settings

    settings = one_shot_settings(kw, subject)
    async with WorknodeService(settings, warn_open_bus=False) as svc:
        replica: Replica = svc.replica(subject)
        out = await work(replica)
        await replica.flush()
        return out


def register_kinds(main: click.Group) -> None:
    """Add ``worknode kinds`` (its online commands use the write commands' options)."""
    from services._cli_errors import EXIT_UNCONFIRMED, error_line
    from services.worknode._cli import _one_write, _run, _write_command, one_shot_options

    def reader(name: str, help_text: str) -> Callable[[Callable[..., None]], click.Command]:
        def deco(fn: Any) -> click.Command:
            fn = _registry_options(one_shot_options(fn, "Reader"))
            return kinds.command(name, help=help_text)(fn)
        return deco

    @_write_command("register", "Register the kind version FILE defines (a model file, "
                    "FILE.py:Class, or schema JSON) after the compatibility gate against "
                    "every version registered; make it active unless --no-activate.")
    @click.argument("file")
    @click.option("--no-activate", is_flag=True, help="Register without making it active.")
    @_registry_options
    def register(file: str, no_activate: bool, registry_subject: str, **kw: Any) -> None:
        schema = _one(load_schemas([file]), file)
        outcome = ["registered"]

        async def work(replica: Replica) -> ORMap:
            registry = Registry.from_tree(replica.tree)
            if schema.version in registry.schemas.get(schema.name, {}):
                outcome[0] = "already registered"
            ops = registry.register_ops(schema, activate=not no_activate)
            return await replica.write_many(ops) if ops else ORMap(is_delta=True)

        _, holder = _run(lambda: _one_write(registry_subject, kw, work))
        click.echo(f"{outcome[0]}: {schema.ref}{'' if no_activate else ' (active)'}")
        if holder is None and not kw["no_confirm"]:
            sys.stdout.flush()
            click.echo(error_line(
                f"published, not confirmed: no replica of {registry_subject!r} held the "
                f"registration within {kw['confirm_timeout']:g} s"), err=True)
            sys.exit(EXIT_UNCONFIRMED)

    kinds.add_command(register)

    @reader("list", "List the registered kinds: name, versions, active version.")
    def list_(registry_subject: str, **kw: Any) -> None:
        async def work(replica: Replica) -> Registry:
            return Registry.from_tree(replica.tree)

        registry: Registry = _run(lambda: _with_registry(kw, registry_subject, work))
        for name in registry.kinds():
            versions = registry.versions(name)
            active = registry.active.get(name, versions[-1])
            conflicted = registry.conflicted.get(name, ())
            extra = f" CONFLICTED {list(conflicted)}" if conflicted else ""
            click.echo(f"{name}: versions {', '.join(map(str, versions))}; active {active}"
                       f"{extra}")
        for line in registry.skipped:
            click.echo(f"skipped: {line}", err=True)
        if not registry.kinds():
            click.echo("no kinds registered", err=True)

    @reader("show", "Show kind NAME (NAME@VERSION; default the active version) as schema "
            "JSON.")
    @click.argument("ref")
    def show(ref: str, registry_subject: str, **kw: Any) -> None:
        name, _, version = ref.partition("@")
        if version and not version.isdigit():
            raise click.BadParameter(f"{ref}: the version after @ must be a number")

        async def work(replica: Replica) -> Registry:
            return Registry.from_tree(replica.tree)

        registry: Registry = _run(lambda: _with_registry(kw, registry_subject, work))
        schema = registry.get(name, int(version) if version else None)
        click.echo(json.dumps(json.loads(schema.to_json()), indent=1, sort_keys=True,
                              ensure_ascii=False))

    @kinds.command("migrate")
    @click.argument("subject")
    @click.argument("migration")
    @click.option("--config", "config_file",
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The node's TOML settings (WORKNODE_* environment variables override).")
    @click.option("--node-id", default=None, help="Overrides the configured node id.")
    @click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True,
                  help="Worknodes per batch (one durable commit, one progress line).")
    def migrate(subject: str, migration: str, config_file: Path | None, node_id: str | None,
                batch: int) -> None:
        """Run MIGRATION (FILE.py:NAME, a broker.kinds.Migration) on this node's replica of
        SUBJECT: while the node is stopped (its upgrade), as the node (its settings, state
        and key; caught up from its peers first). Every node runs it itself: the migration's
        writes have fixed authors, so all nodes write the same dots; they are stored, never
        published. Progress on stderr, one line a batch."""
        from services.worknode._service import WorknodeService
        from services.worknode._settings import WorknodeSettings

        job = load_migration(migration)
        kw: dict[str, Any] = {}
        if config_file is not None:
            kw["config_file"] = config_file
        if node_id is not None:
            kw["node_id"] = node_id
        settings = load_settings(WorknodeSettings, lambda: WorknodeSettings(**kw))
        if subject not in settings.hosted_subjects():
            raise click.BadParameter(f"this node does not host {subject!r}",
                                     param_hint="'SUBJECT'")

        async def run() -> tuple[int, int]:
            written = total = 0
            async with WorknodeService(settings) as svc:
                replica = svc.replica(subject)
                for step in job.batches(replica.tree, batch):
                    if step.delta.store is not None:
                        await replica.apply_repair(step.delta)
                    written += step.written
                    total = step.total
                    click.echo(f"migrate {job.id}: {step.done}/{step.total} worknodes, "
                               f"{written} written", err=True)
            return written, total

        written, total = _run(run)
        click.echo(f"migrated {job.id} on {settings.node_id}/{subject}: {written} of {total} "
                   "worknodes written")

    del list_, show, migrate
    main.add_command(kinds)



def kind_view_of(specs: Sequence[str]) -> KindView:
    """The view ``tail --kind`` reads with: every version the files define, of one kind; the
    newest is the shape shown, the oldest the stored shape."""
    models: list[type[KindModel]] = []
    for spec in specs:
        if spec.endswith(".json"):
            models.extend(s.to_model() for s in load_schemas([spec]))
        else:
            models.extend(load_models(spec))
    names = {m.__kind__.name for m in models if m.__kind__ is not None}
    if len(names) != 1:
        raise KindSourceError(f"--kind: the files define {len(names)} kinds; give the "
                              "versions of one")
    models.sort(key=lambda m: m.__kind__.version if m.__kind__ is not None else 0)
    return KindView(models[-1], models[:-1])


def typed_tree() -> Tree:
    """The tree ``tail --kind`` joins the batches it sees into."""
    return Tree()


def typed_lines(view: KindView, tree: Tree, document: object) -> list[str]:
    """``tail --kind``: join a batch's ``document`` into ``tree`` (the batches seen so far),
    then each worknode of the kind it touched, read as the kind: ``node: {json}``, with its
    kind conflicts, or the read error."""
    if not isinstance(document, ORMap):
        return []
    tree.merge(document)
    out = []
    for node in sorted(document.store or ()):
        if node not in tree or tree.fields(node).get(KIND_FIELD) != view.info.name:
            continue
        try:
            obj = view.read(tree, node)
        except WorknodeError as exc:
            out.append(f"{view.info.ref} {node}: ! {type(exc).__name__}: {exc}")
            continue
        conflicts = conflicts_of(obj)
        extra = f" conflicts={_jsonable(dict(conflicts))}" if conflicts else ""
        out.append(f"{view.info.ref} {node}: "
                   f"{json.dumps(_jsonable(obj.model_dump()), sort_keys=True)}{extra}")
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bytes):
        return value.hex()
    return value
