"""Entry point `pacs`: a DICOM node that scores arriving studies and sends the results back."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import PacsConfig


@click.command()
@options_from(PacsConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Receive chest X-ray studies (C-STORE), score each complete one with MODEL_URI, send
    the report and heatmaps to SEND_TO; or, with PULL and STUDY, fetch one study and do the
    same. docs/pacs.md says how to route studies to it."""
    from covid_xray.pacs.node import run_node  # torch + mlflow: ~5 s, not for --help

    run_node(PacsConfig(**options))


if __name__ == "__main__":
    main()
