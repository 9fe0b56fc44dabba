"""What every entry point shares: user errors become one line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from covid_xray.errors import UserError

USER_ERROR_EXIT = 2


def user_errors_as_one_line(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Click command body: a `UserError` prints `error: <message>` and exits 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(USER_ERROR_EXIT)

    return wrapper


def options_from(config_class: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for every field of a config dataclass: `--lr`, `--data-dir`, ...

    Types, defaults, help and choices come from the dataclass, so they are written once.
    Booleans take a value (`--hflip true`), which is how `mlflow run -P hflip=true` passes them.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for item in reversed(dataclasses.fields(config_class)):
            kind = {"int": int, "float": float, "bool": click.BOOL, "str": str}[str(item.type)]
            if item.metadata.get("choices"):
                kind = click.Choice(item.metadata["choices"])
            command = click.option(
                f"--{item.name.replace('_', '-')}", item.name, type=kind, default=item.default,
                show_default=True, help=item.metadata.get("help"),
            )(command)
        return command

    return decorate
