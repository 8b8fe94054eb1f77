"""``worknode schema``: the command line of the schema compatibility checker.

A thin adapter over :func:`services.schemacheck.check` and
:func:`services.schemacheck.check_directories`. Two forms:

- ``worknode schema check`` — the project's ``schemas/`` against every frozen release;
- ``worknode schema check OLD_DIR NEW_DIR [-I PATH ...]`` — any two schema directories.

Text output: one line per breaking finding on stdout (``file:line: RULE: message
[releases]``), lint warnings (with ``--lint``) as ``warning: ...`` lines, errors on stderr.
``--format json`` prints one JSON object on stdout instead. Exit codes: 0 compatible, 1
breaking findings, 2 usage error or a schema that does not parse, 3 (only with ``--lint``)
lint warnings and nothing breaking.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import click

from services.schemacheck._check import (
    EXIT_INCOMPLETE,
    CheckReport,
    SchemaLoadError,
    check,
    check_directories,
    find_releases,
)

__all__ = ["installed_schemas", "schema"]


def installed_schemas() -> Path:
    """The directory of the ``schemas`` package this worknode runs with (package data, found
    through importlib.resources), so ``schema check`` works from any directory."""
    root = importlib.resources.files("schemas")
    if not isinstance(root, Path):  # a zip import: capnp needs real files
        raise click.ClickException(
            f"the installed schemas are not files on disk ({root}); pass --schemas"
        )
    return root


@click.group()
def schema() -> None:
    """Cap'n Proto wire contract tools."""


@schema.command("check")
@click.argument("dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--schemas", "schemas_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory of the current *.capnp schemas.  [default: ./schemas in a "
              "checkout, else the schemas this worknode was installed with]")
@click.option("--releases", "releases_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory of frozen releases (vN/*.capnp).  [default: SCHEMAS/releases]")
@click.option("-I", "--import-path", "imports", multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Extra import path for `import \"/x.capnp\"` (OLD NEW form; repeatable).")
@click.option("--lint", is_flag=True,
              help="Also report lint warnings (missing @0x ids); exit 3 if they are all.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
@click.option("-v", "--verbose", is_flag=True, help="Also list the compared release pairs.")
def check_command(dirs: tuple[Path, ...], schemas_dir: Path | None, releases_dir: Path | None,
                  imports: tuple[Path, ...], lint: bool, fmt: str, verbose: bool) -> None:
    """Fail on any wire-breaking change.

    Without arguments: between the current schemas and every frozen release, and between
    every release and each later one (FULL_TRANSITIVE). With OLD_DIR NEW_DIR: between those
    two directories of *.capnp files, in both reader directions.
    """
    if len(dirs) not in (0, 2):
        raise click.UsageError("give no directories, or exactly two: OLD_DIR NEW_DIR")
    if dirs and releases_dir is not None:
        raise click.UsageError("--releases applies only without OLD_DIR NEW_DIR")
    if schemas_dir is None:
        local = Path("schemas")
        schemas_dir = local if any(local.glob("*.capnp")) else installed_schemas()
    if verbose and not dirs:
        click.echo(f"schemas: {schemas_dir}", err=True)
    if releases_dir is None:
        releases_dir = schemas_dir / "releases"
    elif not releases_dir.is_dir():
        raise click.BadParameter(f"{releases_dir}: not a directory",
                                 param_hint="'--releases'")
    elif not find_releases(releases_dir):
        raise click.BadParameter(f"{releases_dir}: no release directory (vN/*.capnp) in it",
                                 param_hint="'--releases'")
    for path in imports:
        if not path.is_dir():
            raise click.BadParameter(f"{path}: not a directory", param_hint="'-I'")
    try:
        if dirs:
            report = check_directories(dirs[0], dirs[1], imports)
        else:
            report = check(schemas_dir, releases_dir)
    except SchemaLoadError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_INCOMPLETE) from None
    code = report.exit_code_with_lint() if lint else report.exit_code
    if fmt == "json":
        _print_json(report, lint, code)
    else:
        _print_text(report, lint, verbose, code)
    raise SystemExit(code)


def _print_text(report: CheckReport, lint: bool, verbose: bool, code: int) -> None:
    for violation in report.violations:
        click.echo(violation.format())
    if lint:
        for warning in report.warnings:
            click.echo(f"warning: {warning.format()}")
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    if verbose:
        for pair in report.pairs or ("(nothing to compare with)",):
            click.echo(f"compared: {pair}", err=True)
    if code == 0:
        click.echo(f"schema check: OK ({len(report.pairs)} pairs compared)", err=True)
    elif report.violations:
        click.echo(f"schema check: {len(report.violations)} breaking change(s)", err=True)


def _print_json(report: CheckReport, lint: bool, code: int) -> None:
    out = {
        "exit_code": code,
        "findings": [v.to_json() for v in report.violations],
        "warnings": [v.to_json() for v in report.warnings] if lint else [],
        "errors": list(report.errors),
        "pairs": list(report.pairs),
    }
    click.echo(json.dumps(out, indent=1, ensure_ascii=False))
