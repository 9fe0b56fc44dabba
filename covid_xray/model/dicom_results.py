"""The model's answers as DICOM objects that a PACS files beside the films.

Per study: one Structured Report (Comprehensive 3D SR holding a TID 1500 Measurement Report),
with a measurement group per scored film (each class probability, the call at the model's
operating point, the film it is about) and one for the study: the mean over exactly the films
reported (what predict's `.studies.csv` says), the call on it, the threshold, the training
prevalence the probabilities are calibrated to, how many of the study's films were scored,
refused (by reason) or out of distribution, and which films the answer covers (`SCOPES`: a
served request may hold part of a study). Per scored film: its Grad-CAM overlay as a
Secondary Capture image, naming the class whose evidence it shows.

Result UIDs are derived, not drawn (`result_uid`): from the kind of object, the model that
answered (name, version, training run) and the UIDs of the films it covers. The same answer
made again (a rerun, a resend after a crash) is the same object, which a PACS keeps once; a
study scored with another film, or by another model version, gets new ones. Each kind goes
into a series of its own in the source study.

Who answered, after the IHE AI Results profile: the Contributing Equipment Sequence names the
model (manufacturer covid-xray, model name = registered name, software versions = version
and training run id, serial number = run id), and so does the report's device observer.
Every object says it is not for diagnostic use: in its series description and in the
contribution description.

The source header is hostile input like the rest. Only the patient and study attributes a
result needs are copied, each only when its value is valid for its VR (SIIM's "62" is not a
valid Patient's Age: it is left out). A source UID that is not a DICOM UID (SIIM writes
12 hex digits where UIDs belong: their anonymisation) is referenced as `2.25.<UUID v5 of
it>`: the same id gives the same UID every time, so the report, the heatmaps and every
rerun agree about which study and film they mean, and the CSV keeps the original id.

Text is copied as the characters it holds, not as its bytes: read in the source's declared
Specific Character Set, written in UTF-8 (`ISO_IR 192`, which holds every repertoire a source
may declare, so one result can cite films in different sets). A source with 8-bit bytes and
no declared set breaks the standard (the default repertoire is ASCII); it is read as Latin-1
(ISO_IR 100), the set of most such films in practice and one that decodes any byte, so a name
arrives as its sender most likely meant it rather than as `?`.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import cv2
import highdicom as hd
import numpy as np
import pydicom
from highdicom.base_content import ContributingEquipment
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pydicom.valuerep import validate_value

from covid_xray.evaluation.calibration import predicted_classes
from covid_xray.files import atomic_write
from covid_xray.imaging import quiet  # noqa: F401 (its warning filters, set once)

NOT_FOR_DIAGNOSTIC_USE = "not for diagnostic use"
MANUFACTURER = "covid-xray"
# Our own codes (DICOM lets a "99"-prefixed private scheme name what no standard one does):
# the model's classes and its call. Described in each report's Coding Scheme Identification.
SCHEME = "99COVIDXRAY"
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")  # a probability is a ratio
MODEL_CALL = hd.sr.CodedConcept("call", SCHEME, "Model call at its operating point")
THRESHOLD = hd.sr.CodedConcept("threshold", SCHEME, "Decision threshold on P(opacity)")
FILMS = hd.sr.CodedConcept("{films}", "UCUM", "films")  # the unit of a count of films
SCORED = hd.sr.CodedConcept("films-scored", SCHEME, "Films scored (in the study's mean)")
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("films-ood", SCHEME,
                                         "Films out of distribution (not in the mean)")
REFUSED = hd.sr.CodedConcept("films-refused", SCHEME, "Films refused (not in the mean)")
SCOPE = hd.sr.CodedConcept("scope", SCHEME, "Films this answer covers")
NOT_SCORED = hd.sr.CodedConcept("not-scored", SCHEME, "Film not scored, for this reason")
NO_ANSWER = hd.sr.CodedConcept("no-answer", SCHEME,
                               "No answer: none of the study's films could be scored")
# Which of a study's films an answer covers: what the model was given, not the whole study.
SCOPES = {"request": "Only the films of one request; the study may hold others",
          "folder": "The films of this study found in the scored folder",
          "study": "Every film of this study that the node received"}
# Series numbers of the result series: high, so viewers list them after the films.
REPORT_SERIES, HEATMAP_SERIES = 9001, 9002
UTF_8 = "ISO_IR 192"  # every result's Specific Character Set
# What a result copies from its source header (patient, study, and the film's own ids).
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
          "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
          "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
          "PatientOrientation", "Modality")
# Of those, the ones a result must carry even when empty (Type 2 in the result IODs).
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
          "PatientOrientation")
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# A heatmap's long side at most: what a reading room's viewer shows of it.
HEATMAP_LONG_SIDE = 1024
# UUID v5 namespace of the UIDs derived from ids that are not UIDs (fixed: derivations agree).
DERIVED_UID_NAMESPACE = uuid.UUID("6f1c7c52-5d0e-4a43-9f5b-3d2f6a1b8e07")
# ... and of the results' own UIDs (`result_uid`).
RESULT_UID_NAMESPACE = uuid.UUID("2b1d0f7e-8c3a-4e59-b6a4-5d9e0c7f1a23")


@dataclass(frozen=True)
class FilmCounts:
    """What became of a study's films: scored (in the mean), out of distribution, and
    refused, by reason code."""

    scored: int = 0
    out_of_distribution: int = 0
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: its registered name and version ("" when not known, e.g. a
    served copy) and the training run that made it."""

    name: str = ""
    version: str = ""
    run_id: str = ""

    def describe(self) -> str:
        name = self.name or "covid-xray model"
        return f"{name} v{self.version}" if self.version else name


@dataclass(frozen=True)
class ReportedModel:
    """What every result says about the model that answered."""

    class_names: tuple[str, ...]
    threshold: float | None = None  # binary: P(opacity) >= threshold -> opacity
    training_prevalence: tuple[float, ...] = ()  # what its probabilities are calibrated to
    identity: ModelIdentity = ModelIdentity()


def as_uid(value: str) -> str:
    """`value` when it is a DICOM UID, else `2.25.<UUID v5 of value>` (always the same)."""
    value = str(value).strip()
    if len(value) <= 64 and UID_PATTERN.fullmatch(value):
        return value
    return f"2.25.{uuid.uuid5(DERIVED_UID_NAMESPACE, value).int}"


def result_uid(kind: str, identity: ModelIdentity, *films: str) -> str:
    """The UID of a result object (or series, or measurement group) of `kind` that the model
    `identity` made about `films` (UIDs; their order does not matter): `2.25.<UUID v5>`."""
    about = "|".join([kind, identity.name, identity.version, identity.run_id, *sorted(films)])
    return f"2.25.{uuid.uuid5(RESULT_UID_NAMESPACE, about).int}"


def read_source(file: str | BinaryIO) -> Dataset:
    """The header a result is filed against: `COPIED`, each value checked for its VR and
    dropped when invalid, UIDs made DICOM UIDs (`as_uid`). The caller has already read the
    film, so the file is known to be DICOM."""
    if hasattr(file, "seek"):
        file.seek(0)
    # A malformed value is checked below (imaging/quiet.py keeps its warning out of the log).
    header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[
        "SpecificCharacterSet", *COPIED])
    if "SpecificCharacterSet" not in header:  # pydicom's default decoding is Latin-1
        header.SpecificCharacterSet = "ISO_IR 100"
    source = Dataset()
    source.SpecificCharacterSet = UTF_8  # highdicom copies it into every result
    for keyword in COPIED:
        element = header.get(keyword) and header.data_element(keyword)
        if not element or element.value in (None, ""):
            continue
        if element.VR == "UI":  # an id that is not a UID is referenced by one derived from it
            setattr(source, keyword, as_uid(element.value))
        elif _valid(element.VR, element.value):
            # A name as its text: a PersonName would write back its source's bytes.
            value = str(element.value) if element.VR == "PN" else element.value
            setattr(source, keyword, value)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword not in source:  # a film without its ids still needs them referenced
            setattr(source, keyword, generate_uid())
    if "SOPClassUID" not in source:
        source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage: what we read
    if source.get("PatientSex") not in ("M", "F", "O"):  # an enumerated value: or unknown
        source.PatientSex = ""
    orientation = source.get("PatientOrientation", [])
    if len(orientation) != 2 or not all(re.fullmatch(r"[APRLHF]+", str(value))
                                        for value in orientation):
        source.PatientOrientation = ""  # two directions of the film, or unknown
    for keyword in TYPE_2:  # present, and empty when unknown, as the result IODs want
        setattr(source, keyword, source.get(keyword, ""))
    return source


def pixel_digest(file: str | BinaryIO) -> str:
    """A digest of the film's pixels as stored: what its results show. A corrected film
    (the same SOP Instance UID, new pixels) gets results of new UIDs, so an archive that keeps
    the first object under a UID does not keep a stale heatmap or report."""
    if hasattr(file, "seek"):
        file.seek(0)
    pixels = pydicom.dcmread(file, specific_tags=["PixelData"]).get("PixelData") or b""
    return hashlib.blake2b(pixels, digest_size=16).hexdigest()


def _valid(vr: str, value: object) -> bool:
    """Whether `value` is one pydicom would write without complaint for `vr`."""
    try:
        for one in (value if isinstance(value, pydicom.multival.MultiValue) else [value]):
            # (a PersonName is checked as the text it is written as)
            validate_value(vr, str(one) if vr == "PN" else one, pydicom_config.RAISE)
    except Exception:
        return False
    return True


def _equipment(identity: ModelIdentity, what: str) -> ContributingEquipment:
    return ContributingEquipment(
        MANUFACTURER, codes.DCM.ProcessingEquipment,
        manufacturer_model_name=(identity.name or "covid-xray model")[:64],
        software_versions=[f"version {identity.version or 'unregistered'}",
                           f"run {identity.run_id or 'unknown'}"],
        device_serial_number=identity.run_id or None,
        contribution_datetime=datetime.now().astimezone(),
        contribution_description=f"{what} by a chest X-ray classifier; "
                                 f"{NOT_FOR_DIAGNOSTIC_USE}")


def _class_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name, SCHEME, name)


def _probabilities(names: Sequence[str], values: Sequence[float],
                   algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    return [hd.sr.Measurement(name=hd.sr.CodedConcept(f"p-{name}", SCHEME,
                                                      f"Probability of {name}"),
                              value=float(value), unit=NO_UNITS, algorithm_id=algorithm)
            for name, value in zip(names, values, strict=True)]


def study_report(sources: Sequence[Dataset], probabilities: np.ndarray, labels: Sequence[str],
                 model: ReportedModel, left_out: FilmCounts = FilmCounts(),
                 scope: str = "folder", predecessor: tuple[str, str] | None = None,
                 pixels: Sequence[str] = (), declined: Sequence[tuple[Dataset, str]] = ()
                 ) -> Dataset:
    """The Structured Report of one study's scored films (`read_source` headers, with their
    calibrated probabilities and labels) and of the study's answer: their mean, called at the
    model's threshold. `left_out` counts the study's films that are not in it. A report that
    replaces an earlier one of the study names it (`predecessor`: its series and SOP Instance
    UIDs) in its Predecessor Documents Sequence, and gets a UID of its own; so does one of
    films with other pixels (`pixels`: their `pixel_digest`s). `declined`: films named in
    the report with the reason code they were not scored for; with no scored film, the
    report says the study has no answer (the model declined; it did run)."""
    identity = model.identity
    algorithm = hd.sr.AlgorithmIdentification(name=identity.name or "covid-xray model",
                                              version=identity.version or "unregistered")
    evidence = [*sources, *(source for source, _ in declined)]
    films = [source.SOPInstanceUID for source in evidence] + list(pixels)
    groups = [_film_group(number, source, values, label, model.class_names, algorithm,
                          result_uid(f"film group {number}", identity, *films))
              for number, (source, values, label) in enumerate(
                  zip(sources, probabilities, labels, strict=True), start=1)]
    groups += [_declined_group(number, source, reason, algorithm,
                               result_uid(f"film group {number}", identity, *films))
               for number, (source, reason) in enumerate(declined, start=len(sources) + 1)]
    groups.append(_study_group(evidence, np.asarray(probabilities, dtype=np.float64), model,
                               replace(left_out, scored=len(sources)), scope, algorithm,
                               result_uid("study group", identity, *films)))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=as_uid(f"model run {identity.run_id}"), name=identity.describe()[:64],
        manufacturer_name=MANUFACTURER, model_name=(identity.name or "covid-xray model")[:64],
        serial_number=identity.run_id or None)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=codes.SCT.ChestImaging, imaging_measurements=groups)
    # highdicom's advice on the source's name format quotes it: imaging/quiet.py silences it.
    document = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report,
        series_instance_uid=result_uid("report series", identity,
                                       evidence[0].StudyInstanceUID),
        series_number=REPORT_SERIES,
        sop_instance_uid=result_uid("report", identity, *films, *(predecessor or ())),
        instance_number=1,
        manufacturer=MANUFACTURER, contributing_equipment=[
            _equipment(identity, "Class probabilities")],
        series_description=f"AI result, {NOT_FOR_DIAGNOSTIC_USE}")
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "covid-xray model outputs: its classes and its call"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    document.CodingSchemeIdentificationSequence = [scheme]
    if predecessor:
        document.PredecessorDocumentsSequence = [
            _reference(evidence[0].StudyInstanceUID, *predecessor, document.SOPClassUID)]
    return document


def _reference(study: str, series: str, sop: str, sop_class: str) -> Dataset:
    """A Hierarchical SOP Instance Reference (PS3.3 C.17.2.1) to one object."""
    instance, in_series, item = Dataset(), Dataset(), Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = sop_class, sop
    in_series.SeriesInstanceUID, in_series.ReferencedSOPSequence = series, [instance]
    item.StudyInstanceUID, item.ReferencedSeriesSequence = study, [in_series]
    return item


def _film_group(number: int, source: Dataset, probabilities: np.ndarray, label: str,
                class_names: Sequence[str], algorithm: hd.sr.AlgorithmIdentification,
                uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One film's measurement group: its probabilities and the model's call on it."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"film {number}"),
        algorithm_id=algorithm, measurements=_probabilities(class_names, probabilities,
                                                            algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(MODEL_CALL, _class_code(label))],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID,
                                                            source.SOPInstanceUID)])


def _declined_group(number: int, source: Dataset, reason: str,
                    algorithm: hd.sr.AlgorithmIdentification,
                    uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A film that was not scored: why (its reason code), and no probabilities."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"film {number}"),
        algorithm_id=algorithm, qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            NOT_SCORED, hd.sr.CodedConcept(reason, SCHEME, f"Not scored: {reason}"))],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID,
                                                            source.SOPInstanceUID)])


def _study_group(sources: Sequence[Dataset], probabilities: np.ndarray, model: ReportedModel,
                 counts: FilmCounts, scope: str, algorithm: hd.sr.AlgorithmIdentification,
                 uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's measurement group: the mean of its films' probabilities and the call on
    it, and what the answer rests on (threshold, training prevalence, films counted); with
    no film scored, no mean and the call "no answer"."""
    measurements, call = [], NO_ANSWER
    if len(probabilities):
        mean = probabilities.mean(axis=0)
        call = _class_code(model.class_names[predicted_classes(mean[None],
                                                               model.threshold)[0]])
        measurements = _probabilities(model.class_names, mean, algorithm)
    if model.threshold is not None:
        measurements.append(hd.sr.Measurement(name=THRESHOLD, value=float(model.threshold),
                                              unit=NO_UNITS, algorithm_id=algorithm))
    for name, share in zip(model.class_names, model.training_prevalence, strict=False):
        measurements.append(hd.sr.Measurement(
            name=hd.sr.CodedConcept(f"tp-{name}", SCHEME, f"Training prevalence of {name}"),
            value=float(share), unit=NO_UNITS, algorithm_id=algorithm))
    counted = [(SCORED, counts.scored), (OUT_OF_DISTRIBUTION, counts.out_of_distribution),
               (REFUSED, sum(counts.refused.values()))]
    counted += [(hd.sr.CodedConcept(reason, SCHEME, f"Films refused: {reason}"), number)
                for reason, number in sorted(counts.refused.items())]
    measurements += [hd.sr.Measurement(name=name, value=number, unit=FILMS,
                                       algorithm_id=algorithm) for name, number in counted]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier="study"),
        algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(MODEL_CALL, call),
            hd.sr.QualitativeEvaluation(SCOPE, hd.sr.CodedConcept(scope, SCHEME,
                                                                  SCOPES[scope]))],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID,
                                                            source.SOPInstanceUID)
                       for source in sources])


def heatmap_capture(source: Dataset, picture: np.ndarray, label: str, series_uid: str,
                    instance: int, identity: ModelIdentity, pixels: str = "") -> Dataset:
    """A Grad-CAM overlay (`gradcam.overlay`'s picture: the film at its own size, BGR) of the
    evidence for class `label`, as a Secondary Capture image in the source's study, at most
    HEATMAP_LONG_SIDE pixels on its long side and JPEG-compressed (the film's own size is in
    its Derivation Description). All heatmaps of one study share `series_uid`; `instance`
    numbers them. Its UID derives from the film's UID and its `pixel_digest` (`pixels`)."""
    rows, columns = picture.shape[:2]
    rgb = np.ascontiguousarray(shrunk(picture, HEATMAP_LONG_SIDE)[..., ::-1])
    image = hd.sc.SCImage.from_ref_dataset(
        source, rgb, "YBR_FULL_422", 8, "PATIENT", series_uid, HEATMAP_SERIES,
        result_uid(f"heatmap of {label}", identity, source.SOPInstanceUID, pixels),
        # highdicom insists on an orientation; the source's (or "unknown") replaces it
        instance, MANUFACTURER, patient_orientation=("L", "F"),
        # JPEG baseline: what every archive and viewer decodes (PS3.5 A.4.1), about 0.5 MB
        # where the raw RGB of a 3000 x 2500 film is 22 MB.
        transfer_syntax_uid=JPEGBaseline8Bit,
        contributing_equipment=[_equipment(identity, "Grad-CAM overlay")],
        series_description=f"AI heatmap (Grad-CAM), {NOT_FOR_DIAGNOSTIC_USE}")
    image.PatientOrientation = source.PatientOrientation  # empty (Type 2) when unknown
    # The gate let only chest films through; a chest is not a paired part: no Laterality.
    image.BodyPartExamined = "CHEST"
    image.BurnedInAnnotation = "NO"
    image.LossyImageCompression = "01"  # a viewer says so (PS3.3 C.7.6.1.1.5)
    image.LossyImageCompressionMethod = "ISO_10918_1"
    image.LossyImageCompressionRatio = f"{rgb.nbytes / len(image.PixelData):.2f}"
    # Which class's evidence the colours show (the model's call on this film).
    image.ImageComments = f"Grad-CAM of class {label}, {NOT_FOR_DIAGNOSTIC_USE}"
    image.DerivationDescription = (
        f"Grad-CAM evidence for class {label} over the film ({columns} x {rows} pixels), "
        f"shown at {image.Columns} x {image.Rows}, JPEG baseline (lossy)")
    derivation = Dataset()  # which film this picture was made from
    derivation.ReferencedSOPClassUID = source.SOPClassUID
    derivation.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.SourceImageSequence = [derivation]
    return image


def shrunk(picture: np.ndarray, long_side: int) -> np.ndarray:
    """`picture` with its long side at most `long_side` pixels (area-averaged), its shape
    kept."""
    rows, columns = picture.shape[:2]
    scale = long_side / max(rows, columns)
    if scale >= 1:
        return picture
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def to_bytes(dataset: Dataset) -> bytes:
    """A result object as a DICOM file's bytes (Part 10, with its file meta)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def save(dataset: Dataset, path: Path) -> None:
    """A result object written whole or not at all."""
    atomic_write(path, lambda file: file.write(to_bytes(dataset)))


class StudyResults:
    """The DICOM results of one batch of predictions, film by film: a heatmap for each scored
    film as it comes (all of one study in one new series), and at the end a report per study
    of the films it was given. Refused films are never given: they get no object, and the
    report counts them (`reports`' `left_out`)."""

    def __init__(self, model: ReportedModel, scope: str,
                 predecessors: dict[str, tuple[str, str]] | None = None,
                 every_study: bool = False,
                 refused_on_arrival: dict[str, dict[str, int]] | None = None):
        self.model = model
        # study -> films that never reached the model, by reason (the node: no_room)
        self.refused_on_arrival = refused_on_arrival or {}
        # Also a report for a study none of whose films was scored, saying why film by film
        # (the PACS node: a reading room must tell "declined" from "never ran").
        self.every_study = every_study
        self.declined: dict[str, list[tuple[Dataset, str]]] = {}  # study -> films, reasons
        self.scope = scope  # a SCOPES key: which of a study's films the answers cover
        self.predecessors = predecessors or {}  # study -> the report a new one replaces
        self.films: dict[str, list[tuple[Dataset, np.ndarray, str]]] = {}
        self.heatmap_series: dict[str, str] = {}  # study -> its heatmap series' UID
        self.heatmaps_made: dict[str, int] = {}  # study -> instance number of the last one
        self.withheld: dict[str, str] = {}  # study -> why it gets no report
        self.pixels: dict[str, str] = {}  # film's SOP Instance UID -> its pixel_digest

    def add(self, source: Dataset, probabilities: np.ndarray, label: str,
            pixels: str = "") -> None:
        """A scored film (its `read_source` header and `pixel_digest`), for its study's
        report and heatmap."""
        self.pixels[source.SOPInstanceUID] = pixels
        if source.StudyInstanceUID not in self.withheld:
            self.films.setdefault(source.StudyInstanceUID, []).append(
                (source, np.asarray(probabilities, dtype=np.float64), label))

    def heatmap(self, source: Dataset, picture: np.ndarray, label: str) -> Dataset:
        """The film's Grad-CAM overlay (of class `label`) as the next image of its study's
        heatmap series."""
        study = source.StudyInstanceUID
        series = self.heatmap_series.setdefault(
            study, result_uid("heatmap series", self.model.identity, study))
        self.heatmaps_made[study] = self.heatmaps_made.get(study, 0) + 1
        return heatmap_capture(source, picture, label, series, self.heatmaps_made[study],
                               self.model.identity, self.pixels.get(source.SOPInstanceUID, ""))

    def decline(self, source: Dataset, reason: str) -> None:
        """A film that was not scored (its header, its reason code), for `every_study`."""
        self.declined.setdefault(source.StudyInstanceUID, []).append((source, reason))

    def _counts(self, study: str, left_out: dict[str, FilmCounts] | None) -> FilmCounts:
        """The study's films not in its answer: `left_out`'s, those refused on arrival, and
        for a report of declined films those declined because the study names two
        patients."""
        counts = (left_out or {}).get(study, FilmCounts())
        refused = Counter(counts.refused) + Counter(self.refused_on_arrival.get(study, {}))
        refused["patient_mismatch"] += sum(
            reason == "patient_mismatch" for _, reason in self.declined.get(study, [])
            if study not in self.films)
        return replace(counts, refused={reason: number for reason, number
                                        in refused.items() if number})

    def withhold(self, study: str, why: str) -> None:
        """No report for `study` (`reports` says why): its films must not be reported on."""
        self.films.pop(study, None)
        self.withheld[study] = why

    def reports(self, left_out: dict[str, FilmCounts] | None = None
                ) -> tuple[dict[str, Dataset], dict[str, str]]:
        """(StudyInstanceUID -> the study's report, StudyInstanceUID -> why it has none).
        `left_out` counts, by study, the films not given (refused, out of distribution). A
        study whose headers defeat the writer gets no report, not a crash."""
        made, failed = {}, dict(self.withheld)
        declined_only = {study: [] for study in self.declined
                         if study not in self.films and study not in self.withheld}
        for study, films in {**self.films, **declined_only}.items():
            try:
                report = study_report([source for source, _, _ in films],
                                      np.array([values for _, values, _ in films]),
                                      [label for _, _, label in films], self.model,
                                      self._counts(study, left_out), self.scope,
                                      self.predecessors.get(study),
                                      [self.pixels[source.SOPInstanceUID]
                                       for source, _, _ in films],
                                      [] if films else self.declined[study])
                to_bytes(report)  # a value the report took may still defeat the encoder
                made[study] = report
            except Exception as error:
                # The error's type only: its text may quote header values (names).
                failed[study] = f"the report could not be written ({type(error).__name__})"
        return made, failed
