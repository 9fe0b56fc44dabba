"""Entry point `promote`: move a registered version to a stage and/or alias."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import PromoteConfig


@click.command()
@options_from(PromoteConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Promote VERSION of NAME to STAGE and/or ALIAS, optionally only if it is better."""
    from covid_xray.registry import promote

    config = PromoteConfig(**options)
    if not config.version:
        raise click.UsageError("--version is required")
    print(promote(config.name, config.version, stage=config.stage, alias=config.alias,
                  if_better=config.if_better).message)


if __name__ == "__main__":
    main()
