"""Entry point `promote`: move a registered version to a stage and/or alias."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import PromoteConfig


@click.command()
@options_from(PromoteConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Promote VERSION of NAME to STAGE and/or ALIAS; with IF_BETTER, only if it beats every
    current holder on an evaluation of the same data (EVALUATE_ON makes that evaluation)."""
    from covid_xray.serving.promotion import promote

    config = PromoteConfig(**options)
    if not config.version:
        raise click.UsageError("--version is required")
    print(promote(config).message)


if __name__ == "__main__":
    main()
