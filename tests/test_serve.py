"""`mlflow models serve` on the registered model answers a base64 DICOM over REST."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from covid_xray.pyfunc import encode_dicom
from covid_xray.synthetic import write_dicom
from tests.conftest import REAL_DICOM, clean_env, free_port, serving


@pytest.fixture
def served_model(store, tmp_path):
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve",
               "-m", "models:/covid-xray-densenet/Production", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with serving(command, f"http://127.0.0.1:{port}", "/ping", tmp_path / "serve.log",
                 env=clean_env(MLFLOW_TRACKING_URI=store["uri"])) as url:
        yield url


def test_serve_answers_a_real_dicom(served_model, tmp_path):
    write_dicom(tmp_path / "mr.dcm", np.full((64, 64), 900), modality="MR")
    body = {"dataframe_split": {"columns": ["dicom_base64"],
                                "data": [[encode_dicom(str(REAL_DICOM))], ["bm90IGEgZGljb20="],
                                         [encode_dicom(str(tmp_path / "mr.dcm"))]]}}
    response = requests.post(f"{served_model}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == 3
    good, bad, mr = rows
    assert good["error"] == "" and good["label"] in ("negative", "positive")
    assert abs(good["prob_negative"] + good["prob_positive"] - 1) < 1e-5
    assert bad["error"] == "row 1: not a DICOM file (no 'DICM' marker)" and bad["label"] == ""
    # A chest X-ray model refuses an MR image, naming its modality, instead of scoring it.
    assert mr["error"] == ("row 2: modality MR is not a radiograph (CR, DX); this model reads "
                           "chest X-rays only") and mr["label"] == ""
