"""Entry point `tune`: Optuna hyperparameter search, each trial a tracked training run."""

import sys

import click


@click.command()
@click.option("--n-trials", type=int, default=30, show_default=True, help="Trials to run.")
def main(n_trials: int) -> None:
    """Search hyperparameters with Optuna (not built yet: tracked as its own issue)."""
    click.echo("error: the tune entry point is not built yet (tracked as its own issue); "
               "use the train entry point", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
