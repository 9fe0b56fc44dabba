"""Entry point `score_spark`: a registered model on a folder (or Hadoop path) of DICOMs, on
Spark -> a Parquet folder."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import ScoreSparkConfig


@click.command()
@options_from(ScoreSparkConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Score every DICOM under INPUT with MODEL_URI as a Spark UDF; one Parquet row per file
    (path, study_id, image_id, the UIDs, label, prob_<class>..., ood_score, in_distribution,
    reason, flags, error), as predict's CSV. Needs `pip install -e '.[spark]'` and Java 17+.
    """
    from covid_xray.serving.score_spark import score_spark  # pyspark + mlflow: not for --help

    score_spark(ScoreSparkConfig(**options))


if __name__ == "__main__":
    main()
