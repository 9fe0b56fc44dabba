"""Entry point `train` (and `main`): train a DenseNet, log it to MLflow, register it."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import TrainConfig


@click.command()
@options_from(TrainConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Train a chest X-ray COVID-19 classifier on data_dir and track it in MLflow.

    Logs every option as a param, per-epoch metrics, test metrics and figures, the split
    manifest as the dataset input, and the model, which is registered as
    registered_model_name (moved to `stage` / given `alias` when asked). With nproc > 1,
    that many processes train together (torchrun; or start this under `torchrun` yourself).
    """
    from covid_xray.training.run import train  # torch + mlflow: ~5 s, not for --help

    train(TrainConfig(**options))


if __name__ == "__main__":
    main()
