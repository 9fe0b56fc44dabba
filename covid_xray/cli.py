"""What every entry point shares: user errors become one line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

import click

from covid_xray import lifecycle
from covid_xray.errors import UserError

USER_ERROR_EXIT = 2


def user_errors_as_one_line(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Click command body: a `UserError` prints `error: <message>` and exits 2; a stop
    (Ctrl-C, SIGTERM, the parent `mlflow run` dying) ends the run KILLED and exits 128+signal.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        lifecycle.handle_stops()  # first: before any data, file or run is touched
        credentials_out_of_uri()
        try:
            return command(*args, **kwargs)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            lifecycle.end_started_run("FAILED")
            sys.exit(USER_ERROR_EXIT)
        except BaseException as error:
            # After a stop signal, whatever comes out (KeyboardInterrupt, or torch's
            # "DataLoader worker killed" RuntimeError raised mid-cleanup) is that stop.
            if not (isinstance(error, KeyboardInterrupt) or lifecycle.stopping()):
                raise
            if isinstance(error, SystemExit):
                raise
            run_id = lifecycle.end_started_run()
            click.echo("stopped" + (f"; run {run_id} ended KILLED" if run_id else ""), err=True)
            sys.exit(lifecycle.exit_code())

    return wrapper


def credentials_out_of_uri() -> None:
    """`MLFLOW_TRACKING_URI=https://user:password@host` works, but MLflow prints the URI in
    every "View run ... at:" line. Move the login into MLFLOW_TRACKING_USERNAME / _PASSWORD
    (which MLflow sends the same way) and keep the URI without it, for this process and its
    children, before anything prints or logs the URI.

    Under `mlflow run` the parent process keeps the URI it was given and prints it once more
    when the run ends (MLflow re-ends every run it started): only the user can stop that, so
    say how."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    if os.environ.get("MLFLOW_RUN_ID"):
        click.echo("warning: MLFLOW_TRACKING_URI holds a login, and `mlflow run` prints that URI "
                   "when the run ends; give the login in MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD instead", err=True)
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    host = parts.netloc.rsplit("@", 1)[1]
    os.environ["MLFLOW_TRACKING_URI"] = urllib.parse.urlunsplit(parts._replace(netloc=host))


def click_type(field: dataclasses.Field) -> click.ParamType:
    """The Click type of a config field: its choices, else its annotation."""
    if field.metadata.get("choices"):
        return click.Choice(field.metadata["choices"])
    return {"int": click.INT, "float": click.FLOAT, "bool": click.BOOL,
            "str": click.STRING}[str(field.type)]


def options_from(config_class: type, *, unset_default: bool = False
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for every field of a config dataclass: `--lr`, `--data-dir`, ...

    Types, defaults, help and choices come from the dataclass, so they are written once.
    Booleans take a value (`--hflip true`), which is how `mlflow run -P hflip=true` passes them.
    With `unset_default` every option is a string defaulting to "" (= not given), for commands
    that must tell a value the user fixed from a default (tune's train options), and answers
    to `--data_dir` as well as `--data-dir`.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for item in reversed(dataclasses.fields(config_class)):
            name = f"--{item.name.replace('_', '-')}"
            if unset_default:
                # Also `--data_dir`: how `mlflow run` passes a -P name the entry point does
                # not declare (tune declares none of train's).
                spellings = dict.fromkeys([name, f"--{item.name}"])
                option = click.option(*spellings, item.name, default="", help=(
                    f"{item.metadata.get('help')} [train default: {item.default!r}]"))
            else:
                option = click.option(name, item.name, type=click_type(item),
                                      default=item.default, show_default=True,
                                      help=item.metadata.get("help"))
            command = option(command)
        return command

    return decorate


def as_arguments(config: object) -> list[str]:
    """The command-line options that recreate `config` (`options_from`'s spelling)."""
    arguments = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        arguments += [f"--{item.name.replace('_', '-')}", text]
    return arguments


def given_values(config_class: type, raw: dict[str, str]) -> dict[str, Any]:
    """The options of `options_from(..., unset_default=True)` that were given, typed."""
    values = {}
    for item in dataclasses.fields(config_class):
        if raw.get(item.name, "") != "":
            try:
                values[item.name] = click_type(item).convert(raw[item.name], None, None)
            except click.BadParameter as error:
                raise UserError(f"{item.name}: {error.message}") from None
    return values
