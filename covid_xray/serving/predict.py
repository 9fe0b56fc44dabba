"""Predict on a folder of DICOMs (SIIM layout or any) with a registered model; write a CSV."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from covid_xray.config import PredictConfig
from covid_xray.errors import UserError
from covid_xray.evaluation.calibration import predicted_classes
from covid_xray.files import atomic_write
from covid_xray.imaging.dicom import PATIENT_KEY, UID_FIELDS
from covid_xray.imaging.workers import Decoded, start_workers_early
from covid_xray.model.answers import add_flag, flag_rows, has_flag, mixed_patient_studies
from covid_xray.model.dicom_answers import add_film, heatmap_picture, left_out, study_results
from covid_xray.model.dicom_results import StudyResults, as_uid, save
from covid_xray.tracking import mlflow_run, registry

HEX12 = re.compile(r"[0-9a-f]{12}")


def find_dicoms(source: str | Path) -> list[Path]:
    """One file, or every *.dcm under a folder (sorted, so output order is stable)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        # A *.dcm link that leads nowhere (or in a loop) is listed too: it gets a row with its
        # error instead of vanishing from the output.
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() == ".dcm"
                       and (p.is_file() or p.is_symlink()))
        if paths:
            return paths
        raise UserError(f"{source}: no *.dcm files in this folder")
    raise UserError(f"{source}: no such file or folder")


def siim_ids(path: Path) -> tuple[str, str]:
    """(study_id, image_id): the study is known only in SIIM's <study>/<series>/<image>.dcm."""
    parts = path.parts
    in_siim_layout = len(parts) >= 3 and all(HEX12.fullmatch(p) for p in
                                              (parts[-3], parts[-2], path.stem))
    return (parts[-3] if in_siim_layout else "", path.stem)


def predict_files(config: PredictConfig, progress: bool = True) -> pd.DataFrame:
    """Predict every DICOM under `config.input`, write `config.output`, return the table.

    Unreadable files become rows with their `error`; the CSV appears whole or not at all.
    An MLflow run records what was done: which version answered, and how many files got
    which label (not the CSV: its paths are this machine's, and may name patients).
    """
    mlflow_run.check_tracking_server()
    paths = find_dicoms(config.input)
    if config.dicom_out:  # found out now, not after an hour of scoring
        check_writable(Path(config.dicom_out), "dicom_out")
    start_workers_early(config.num_workers, len(paths))
    version, model = registry.load_resolved(config.model_uri)  # the version that answered
    model.to_device(config.device)
    results = study_results(model, "folder")
    table, patients, heatmap_files = _answer_files(model, paths, config, results, progress)
    # A study whose films name different patients (perhaps across batches): each film keeps
    # its own answer, flagged; the study gets no answer and no DICOM report.
    mixed = mixed_patient_studies(table.study_instance_uid, patients)
    flag_rows(table, table.study_instance_uid.isin(list(mixed)), "patient_mismatch")
    for study in mixed:
        results.withhold(as_uid(study), "its films name different patients")
    output = Path(config.output)
    studies = study_answers(table, model)
    study_output = output.with_name(f"{output.stem}.studies.csv")
    reports = _write_reports(results, table, config, heatmap_files) if config.dicom_out else 0
    heatmaps_written = sum(len(files) for files in heatmap_files.values())
    atomic_write(output, lambda file: file.write(table.to_csv(index=False).encode()))
    atomic_write(study_output, lambda file: file.write(studies.to_csv(index=False).encode()))
    run_id = record_scoring("predict", config.experiment_name, config.model_uri, version,
                            table, model.class_names,
                            {"heatmaps": bool(config.heatmaps),
                             "dicom_out": bool(config.dicom_out),
                             "count/dicom_reports": reports,
                             "count/dicom_heatmaps": heatmaps_written})
    print(f"wrote {len(table)} predictions to {output} ({scoring_counts(table)})"
          + f" and {len(studies)} study answers to {study_output}"
          + (f"; {reports} DICOM reports and {heatmaps_written} heatmap"
             f" images in {config.dicom_out}" if config.dicom_out else "")
          + f": run {run_id}")
    return table


def _answer_files(model: Any, paths: list[Path], config: PredictConfig, results: StudyResults,
                  progress: bool) -> tuple[pd.DataFrame, list[str], dict[str, list[Path]]]:
    """Every file's answer row, batch by batch (with its heatmap and DICOM heatmap written
    as it comes, when asked); each file's patient digest (dicom.PATIENT_KEY, never
    written); by study, the Secondary Captures written."""
    heatmap_files: dict[str, list[Path]] = {}
    patients: list[str] = []
    root = Path(config.input) if Path(config.input).is_dir() else Path(config.input).parent
    frames = []
    batches = model.answer_files([str(path) for path in paths], config.batch_size,
                                 config.num_workers)
    for start, (decoded, frame) in zip(
            tqdm(range(0, len(paths), config.batch_size), desc="predicting", unit="batch",
                 disable=not progress), batches, strict=True):
        batch = paths[start : start + config.batch_size]
        ids = [siim_ids(path) for path in batch]
        frame.insert(0, "path", [str(path) for path in batch])
        frame.insert(1, "study_id", [study for study, _ in ids])
        frame.insert(2, "image_id", [image for _, image in ids])
        frames.append(frame)
        patients += [item.uids.get(PATIENT_KEY, "") for item in decoded]
        if config.heatmaps or config.dicom_out:
            _write_film_results(model, results, batch, decoded, frame, root, config,
                                heatmap_files)
    columns = ["path", "study_id", "image_id", *UID_FIELDS, "label",
               *(f"prob_{name}" for name in model.class_names), "ood_score", "in_distribution",
               "reason", "flags", "error"]
    return pd.concat(frames, ignore_index=True)[columns], patients, heatmap_files


def _write_reports(results: StudyResults, table: pd.DataFrame, config: PredictConfig,
                   heatmap_files: dict[str, list[Path]]) -> int:
    """Each study's DICOM report into `dicom_out`; a study that gets none says why, its
    heatmap objects are taken back (all or none) and its films flagged `no_dicom_result`.
    The number of reports written."""
    reports, unreported = results.reports(left_out(table))
    for study, why in unreported.items():
        print(f"study {study}: no DICOM report ({why})")
        for path in heatmap_files.pop(study, []):
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the study's folder, when nothing else is in it
                path.parent.rmdir()
    if unreported:  # its films keep their answers, and say they have no DICOM result
        flag_rows(table, (table.label != "")
                  & table.study_instance_uid.map(as_uid).isin(list(unreported)),
                  "no_dicom_result")
    for study, report in reports.items():
        save(report, Path(config.dicom_out) / study / f"sr-{report.SOPInstanceUID}.dcm")
    return len(reports)


def record_scoring(command: str, experiment_name: str, model_uri: str, version: Any,
                   table: pd.DataFrame, class_names: Sequence[str],
                   extra: dict[str, Any]) -> str:
    """A run named for the command and the version that answered, recording what was scored:
    how many files got which label, how many were unreadable or out of distribution (never
    the paths: they are this machine's, and may name patients). Returns its id."""
    described = f"{version.name}-v{version.version}" if version else "model"
    with mlflow_run.tracked_run(experiment_name, run_name=f"{command}-{described}") as run:
        mlflow.set_tags({"model_uri": model_uri,
                         "model_name": version.name if version else "",
                         "model_version": str(version.version) if version else ""})
        labels = table.label[table.error == ""].value_counts()
        mlflow_run.log_params({"model_uri": model_uri, "count/files": len(table),
                               "count/listed": len(table),
                               "count/scored": int((table.label != "").sum()),
                               "count/refused": int((table.error != "").sum()),
                               "count/unreadable": int((table.reason == "unreadable").sum()),
                               "count/out_of_distribution":
                                   int((table.reason == "out_of_distribution").sum())}
                              | extra
                              | {f"count/{name}": int(labels.get(name, 0))
                                 for name in class_names})
    return run.info.run_id


def scoring_counts(table: pd.DataFrame) -> str:
    """'listed 7, scored 4, refused 3 (unreadable 3), out of distribution 0'."""
    refused = table.reason[(table.error != "")].value_counts()
    by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(refused.items()))
    return (f"listed {len(table)}, scored {int((table.label != '').sum())}, "
            f"refused {int(refused.sum())}" + (f" ({by_reason})" if by_reason else "")
            + f", out of distribution {int((table.reason == 'out_of_distribution').sum())}")


def study_answers(table: pd.DataFrame, model) -> pd.DataFrame:
    """One row per study (its StudyInstanceUID; a file without one is a study of its own):
    the mean of each class probability over the study's scored films, and the label the
    model calls on that mean (at its threshold). A study of a PA and an AP film gets one
    answer; one whose every film was refused (or is out of distribution) gets none, and its
    files' reasons.

    Why the mean: each film is the same question asked again, and averaging probabilities
    is what the model's own test-time augmentation does with two views of one film."""
    columns = [f"prob_{name}" for name in model.class_names]
    keys = table.study_instance_uid.where(table.study_instance_uid != "", "file:" + table.path)
    rows = []
    for key, files in table.groupby(keys, sort=True):
        # A film far from the training films has no label of its own: it does not vote; films
        # of two patients make no study answer.
        scored = files[(files.error == "") & (files.reason == "")]
        two_patients = files["flags"].map(lambda f: has_flag(f, "patient_mismatch")).any()
        if two_patients:
            scored = scored.iloc[:0]
        mean = scored[columns].astype(float).mean().to_numpy() if len(scored) else None
        row = {"study_instance_uid": files.study_instance_uid.iloc[0], "files": len(files),
               "scored": len(scored)}
        row |= dict(zip(columns, mean if mean is not None else [np.nan] * len(columns),
                        strict=True))
        called = predicted_classes(mean[None], model.threshold)[0] if mean is not None else None
        row["label"] = model.class_names[called] if called is not None else ""
        reasons = set(files.reason) - {""} | ({"patient_mismatch"} if two_patients else set())
        row["reasons"] = " ".join(sorted(reasons))
        row["paths"] = " ".join(files.path) if key.startswith("file:") else ""
        rows.append(row)
    return pd.DataFrame(rows)


def check_writable(folder: Path, option: str) -> None:
    """Refuse, in one line, a folder that cannot be made or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{option} {folder}: cannot write there ({error.strerror or error}); "
                        "give a folder you can write to") from None


def _write_film_results(model, results: StudyResults, paths: list[Path],
                        decoded: list[Decoded], frame: pd.DataFrame, root: Path,
                        config: PredictConfig, heatmap_files: dict[str, list[Path]]) -> None:
    """For each file that got a label: its answer kept for its study's report
    (`dicom_out`), its Grad-CAM overlay as a DICOM Secondary Capture filed under its study
    (`dicom_out`) and as a PNG mirroring the input's folder layout (`heatmaps`). A film
    whose header cannot be read gets the flag `no_dicom_result` (its study no report); one
    whose heatmap cannot be drawn keeps its place in the report and gets `no_heatmap`."""
    probabilities = frame[[f"prob_{name}" for name in model.class_names]].to_numpy()
    for row, (path, item, label) in enumerate(zip(paths, decoded, frame.label, strict=True)):
        if (item.model_input is None or not label
                or has_flag(frame["flags"][row], "patient_mismatch")):
            continue
        source = None
        if config.dicom_out:
            source = add_film(results, str(path), item, probabilities[row], label)
            if source is None:
                frame.loc[row, "flags"] = add_flag(frame["flags"][row], "no_dicom_result")
                print(f"{path}: no DICOM result (its header cannot be read)")
                continue
        try:
            picture = heatmap_picture(model, str(path), item, label)
            image = results.heatmap(source, picture, label) if source is not None else None
        except Exception as error:
            frame.loc[row, "flags"] = add_flag(frame["flags"][row], "no_heatmap")
            # The error's type only: its text may quote header values (names).
            print(f"{path}: no heatmap ({type(error).__name__})")
            continue
        if image is not None:
            target = Path(config.dicom_out) / image.StudyInstanceUID / \
                f"sc-{image.SOPInstanceUID}.dcm"
            save(image, target)
            heatmap_files.setdefault(image.StudyInstanceUID, []).append(target)
        if config.heatmaps:
            target = Path(config.heatmaps) / path.relative_to(root).with_suffix(".png")
            _, encoded = cv2.imencode(".png", picture)
            atomic_write(target, lambda file, data=encoded: file.write(data.tobytes()))
