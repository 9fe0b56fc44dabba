"""Get the SIIM data into `data_dir`: from Kaggle, or synthetic data for demos and tests."""

from __future__ import annotations

from pathlib import Path

from covid_xray import synthetic
from covid_xray.config import DownloadConfig
from covid_xray.data import STUDY_CSV
from covid_xray.errors import UserError


def download(config: DownloadConfig) -> Path:
    """Fill `config.data_dir`; return it. A dataset already there is kept, not overwritten."""
    data_dir = Path(config.data_dir)
    if config.source == "synthetic":
        if (data_dir / STUDY_CSV).exists():
            print(f"{data_dir} already holds a dataset ({STUDY_CSV}); leaving it as it is")
            return data_dir
        if config.num_studies < 1 or config.image_size < 16:
            raise UserError("synthetic data needs num_studies >= 1 and image_size >= 16")
        synthetic.make_dataset(data_dir, num_studies=config.num_studies,
                               image_size=config.image_size, seed=config.seed)
        print(f"wrote {config.num_studies} synthetic studies in the SIIM layout to {data_dir}")
        return data_dir
    if config.source == "kaggle":
        raise UserError("the Kaggle download is not built yet (tracked as its own issue); "
                        "use `-P source=synthetic` for demo data, or place the competition's "
                        f"train/ folder and {STUDY_CSV} in {data_dir}")
    raise UserError(f"source must be kaggle or synthetic, got {config.source!r}")
