"""The input gate: each refusal has its stable reason code, before any pixel is decoded."""

from __future__ import annotations

import re

import numpy as np
import pytest

from covid_xray.errors import DicomError
from covid_xray.imaging.dicom import read_film
from covid_xray.imaging.gate import REASONS, check
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import decode
from covid_xray.imaging.writer import write_dicom

FILM = np.tile(np.arange(32, dtype=np.uint16) * 100, (32, 1))


@pytest.mark.parametrize(("view", "body_part", "flags"), [
    ("PA", "CHEST", ()), ("AP", "", ()), ("AP SUPINE", "THORAX", ()),
    ("", "TORAX", ("view_unknown",)), ("pa", "2- PECHO", ()), ("", "", ("view_unknown",)),
])
def test_frontal_chest_films_pass(view, body_part, flags):
    assert check(view, body_part, "x.dcm") == flags


@pytest.mark.parametrize(("view", "body_part", "reason", "words"), [
    ("LL", "CHEST", "view", "x.dcm: view LL is not frontal (AP or PA)"),
    ("LATERAL", "", "view", "x.dcm: view LATERAL is not frontal"),
    ("RLD", "CHEST", "view", "x.dcm: view RLD is not frontal"),
    ("PA", "ABDOMEN", "body_part", "x.dcm: body part ABDOMEN is not the chest"),
    ("", "HAND", "body_part", "x.dcm: body part HAND is not the chest"),
])
def test_other_views_and_body_parts_are_refused_with_their_code(view, body_part, reason, words):
    with pytest.raises(DicomError, match=re.escape(words)) as caught:
        check(view, body_part, "x.dcm")
    assert caught.value.reason == reason and reason in REASONS


@pytest.mark.parametrize(("header", "modality", "photometric", "reason"), [
    ({"ViewPosition": "LL"}, "CR", "MONOCHROME2", "view"),
    ({"BodyPartExamined": "SKULL"}, "DX", "MONOCHROME2", "body_part"),
    ({}, "MR", "MONOCHROME2", "modality"),
    ({}, "CR", "PALETTE COLOR", "photometric"),
])
def test_decode_gives_each_refused_file_its_reason(tmp_path, header, modality, photometric,
                                                   reason):
    path = tmp_path / "film.dcm"
    write_dicom(path, FILM, header=header, modality=modality, photometric=photometric)
    decoded = decode(Preprocessing(img_size=16), str(path))
    assert decoded.model_input is None and decoded.reason == reason
    assert decoded.error.startswith(str(path))
    if reason in ("view", "body_part"):  # refused after reading: still keyed to its study
        assert decoded.uids["study_instance_uid"].startswith("1.2.")


def test_a_film_that_passes_carries_its_uids_and_flags(tmp_path):
    path = tmp_path / "film.dcm"
    write_dicom(path, FILM, study_uid="1.2.3", series_uid="1.2.3.4")
    film = read_film(str(path), gate=True)
    assert film.uids["study_instance_uid"] == "1.2.3"
    assert film.uids["series_instance_uid"] == "1.2.3.4"
    assert film.uids["sop_instance_uid"].startswith("1.2.")
    assert film.flags == ("view_unknown",)
    decoded = decode(Preprocessing(img_size=16), str(path))
    assert decoded.reason == "" and decoded.error == "" and decoded.uids == film.uids
    assert decoded.model_input.shape == (1, 16, 16)
