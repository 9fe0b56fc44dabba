"""Entry point `evaluate`: a registered model on any labelled SIIM-layout set, with 95% CIs
and calibration, logged as its own MLflow run."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import EvaluateConfig


@click.command()
@options_from(EvaluateConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Score MODEL_URI on every usable study of DATA_DIR (train/ + train_study_level.csv)
    that it was not trained or validated on; without DATA_DIR, on its own logged test split.

    Logs eval_roc_auc, eval_accuracy, eval_balanced_accuracy, eval_map and per-class AP,
    sensitivity / specificity at the model's stored threshold (binary), eval_ece and
    eval_brier (and their _uncalibrated twins), each with its 95% bootstrap interval, the
    figures, subgroups.csv and a per-study predictions CSV.
    """
    from covid_xray.serving.evaluate import evaluate_model  # torch + mlflow: ~5 s, not for --help

    evaluate_model(EvaluateConfig(**options))


if __name__ == "__main__":
    main()
