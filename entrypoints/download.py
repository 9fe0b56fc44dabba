"""Entry point `download`: put the SIIM training data (or synthetic data) in data_dir."""

import click

from covid_xray.cli import options_from, user_errors_as_one_line
from covid_xray.config import DownloadConfig
from covid_xray.data.download import download


@click.command()
@options_from(DownloadConfig)
@user_errors_as_one_line
def main(**options: object) -> None:
    """Download the SIIM-FISABIO-RSNA COVID-19 training set, or write synthetic demo data."""
    download(DownloadConfig(**options))


if __name__ == "__main__":
    main()
