"""Entry point `tune`: Optuna hyperparameter search, each trial a tracked training run."""

import click

from covid_xray.cli import given_values, options_from, user_errors_as_one_line
from covid_xray.config import TrainConfig, TuneConfig


@click.command()
@options_from(TuneConfig)
@options_from(TrainConfig, unset_default=True)
@user_errors_as_one_line
def main(**options: str) -> None:
    """Search hyperparameters with Optuna; every trial is a nested MLflow training run.

    Train options given here are fixed for every trial and leave the search space; the rest
    of the space (tune.DEFAULT_SPACE, or --space FILE) is searched.
    """
    from covid_xray.training.tune import run_study
    from covid_xray.training.tune_workers import (
        run_workers,  # torch + mlflow + optuna: not for --help
    )

    tune_names = TuneConfig.__dataclass_fields__
    tune_config = TuneConfig(**{k: v for k, v in options.items() if k in tune_names})
    fixed = given_values(TrainConfig, {k: v for k, v in options.items() if k not in tune_names})
    (run_study if tune_config.workers == 1 else run_workers)(tune_config, fixed)


if __name__ == "__main__":
    main()
