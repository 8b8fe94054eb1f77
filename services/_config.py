"""Loading service settings for a command line: every way a setting can be wrong (a missing
or unreadable config file, TOML that does not parse, a value that does not validate, an
unknown key) becomes one :class:`ConfigError` whose message names the file or the environment
variable to fix, on one line, without echoing secrets."""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from broker.errors import InvalidArgumentError
from broker.transport import redact_credentials

__all__ = ["ConfigError", "format_validation_error", "load_settings", "read_toml"]

T = TypeVar("T")

_SECRET_FIELDS = frozenset({"nats_password", "nats_token"})


class ConfigError(InvalidArgumentError):
    """A service's settings are unusable (file, TOML syntax, value or unknown key). The
    message says which setting, file or environment variable to fix; retrying without
    fixing it fails again."""


def read_toml(path: Path) -> dict[str, Any]:
    """The table in the TOML file ``path``; ``ConfigError`` if it is missing or invalid."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None


def format_validation_error(exc: ValidationError, env_prefix: str) -> str:
    """One line for every failed setting: its name, its environment variable, what is wrong
    and (except for secrets) the value given."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        name = loc[0] if loc else "settings"
        where = ".".join(loc) or "settings"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {where!r}")
            continue
        if err["type"] == "missing":
            parts.append(f"setting {where} ({env_prefix}{name.upper()}) is required")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = ""
        if name not in _SECRET_FIELDS and isinstance(given, (str, int, float)):
            text = str(given)
            shown = f" (got {text[:80]!r})"
        parts.append(f"setting {where} ({env_prefix}{name.upper()}): {msg}{shown}")
    return redact_credentials("; ".join(parts))


def load_settings(model: type[BaseSettings], factory: Callable[[], T]) -> T:
    """``factory()`` (which builds a ``model`` settings object), with every configuration
    failure turned into a :class:`ConfigError` naming the ``model``'s environment
    variables."""
    env_prefix = str(model.model_config.get("env_prefix", ""))
    try:
        return factory()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, env_prefix)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file: invalid TOML: {exc}") from None
    except SettingsError:  # an environment value that should be JSON and is not
        raise ConfigError(_not_json(model, env_prefix)) from None


def _not_json(model: type[BaseSettings], env_prefix: str) -> str:
    """Which list or table setting's environment variable does not hold JSON."""
    bad = []
    for name, field in model.model_fields.items():
        if typing.get_origin(field.annotation) not in (list, dict):
            continue
        value = os.environ.get(f"{env_prefix}{name.upper()}")
        if value is None:
            continue
        try:
            json.loads(value)
        except ValueError:
            bad.append(f"{env_prefix}{name.upper()}")
    where = ", ".join(bad) or f"a {env_prefix}* variable"
    return (f"{where}: not valid JSON (lists and tables are JSON in the environment, "
            """e.g. '["a", "b"]')""")
