"""Entry point `predict`: a registered model on a folder of DICOMs -> predictions CSV."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import PredictConfig


@click.command()
@options_from(PredictConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Predict every DICOM under INPUT with MODEL_URI; one CSV row per file.

    Columns: path, study_id, image_id, label, prob_<class>..., error (empty when fine).
    """
    from covid_xray.serving.predict import predict_files  # torch + mlflow: ~5 s, not for --help

    predict_files(PredictConfig(**options))


if __name__ == "__main__":
    main()
