"""``worknode schema``: the command line of the schema compatibility checker.

A thin adapter over :func:`services.schemacheck.check`: it prints one line per violation on
stdout, errors on stderr, and exits 0 (compatible), 1 (breaking changes) or 2 (usage error or
a schema that does not parse).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import click

from services.schemacheck._check import SchemaLoadError, check, find_releases

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
@click.option("--schemas", "schemas_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory of the current *.capnp schemas.  [default: ./schemas in a "
              "checkout, else the schemas this worknode was installed with]")
@click.option("--releases", "releases_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory of frozen releases (vN/*.capnp).  [default: SCHEMAS/releases]")
@click.option("-v", "--verbose", is_flag=True, help="Also list the compared release pairs.")
def check_command(schemas_dir: Path | None, releases_dir: Path | None, verbose: bool) -> None:
    """Fail on any wire-breaking change between the current schemas and every frozen
    release, and between every release and each later one (FULL_TRANSITIVE)."""
    if schemas_dir is None:
        local = Path("schemas")
        schemas_dir = local if any(local.glob("*.capnp")) else installed_schemas()
    if verbose:
        click.echo(f"schemas: {schemas_dir}", err=True)
    if releases_dir is None:
        releases_dir = schemas_dir / "releases"
    elif not releases_dir.is_dir():
        raise click.BadParameter(f"{releases_dir}: not a directory",
                                 param_hint="'--releases'")
    elif not find_releases(releases_dir):
        raise click.BadParameter(f"{releases_dir}: no release directory (vN/*.capnp) in it",
                                 param_hint="'--releases'")
    try:
        report = check(schemas_dir, releases_dir)
    except SchemaLoadError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    for violation in report.violations:
        click.echo(violation.format())
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    if verbose:
        for pair in report.pairs or ("(no release to compare with)",):
            click.echo(f"compared: {pair}", err=True)
    if report.exit_code == 0:
        click.echo(f"schema check: OK ({len(report.pairs)} release pairs compared)", err=True)
    raise SystemExit(report.exit_code)
