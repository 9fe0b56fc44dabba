"""External validation: a registered model on another labelled set, logged with CIs and
calibration; promotion on evaluations of the same files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from covid_xray.config import EvaluateConfig, PromoteConfig, TrainConfig
from covid_xray.data.studies import STUDY_CSV
from covid_xray.data.synthetic import chest_image
from covid_xray.errors import UserError
from covid_xray.evaluation.calibration import uncalibrated
from covid_xray.evaluation.metrics import batched_ece
from covid_xray.imaging.writer import write_dicom
from covid_xray.serving.evaluate import FINGERPRINT_TAG, evaluate_model, read_labelled_set
from covid_xray.serving.promotion import find_evaluations, promote
from covid_xray.tracking.registry import logged_model_id
from covid_xray.training.run import run_training
from tests.conftest import ROOT, clean_env

CHAMPION = "models:/covid-xray-densenet@champion"


@pytest.fixture
def hospital(tiny_dataset, tmp_path):
    """Another site's labelled set: tiny_dataset (44 usable studies) plus an MR study and an
    unreadable file, both labelled."""
    data_dir = tmp_path / "hospital"
    shutil.copytree(tiny_dataset, data_dir)
    image, _ = chest_image(np.random.default_rng(0), label=1, rows=48, cols=48)
    mr = data_dir / "train" / "00000000000a" / "00000000000b" / "00000000000c.dcm"
    mr.parent.mkdir(parents=True)
    write_dicom(mr, np.round(image * 4095), modality="MR")
    broken = data_dir / "train" / "00000000000d" / "00000000000e" / "00000000000f.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a dicom" * 20)
    with open(data_dir / STUDY_CSV, "a") as labels:
        labels.write("00000000000a_study,0,1,0,0\n00000000000d_study,1,0,0,0\n")
    return data_dir


def test_evaluate_logs_cis_calibration_figures_and_links_to_the_model(store, hospital, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    outcome = evaluate_model(EvaluateConfig(
        model_uri=CHAMPION, data_dir=str(hospital), resamples=200, output=str(output),
        cache_dir=str(tmp_path / "cache")), progress=False)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "evaluate-covid-xray-densenet-v1"
    assert run.data.tags["model_uri"] == CHAMPION
    assert run.data.tags["eval_model_version"] == "1"
    assert run.data.tags[FINGERPRINT_TAG] == outcome.fingerprint
    assert run.data.params["count/studies"] == "46"
    assert run.data.params["count/scored"] == "44" and run.data.params["count/unreadable"] == "2"
    # No absolute path of this machine in the record (#31): params and our tags by folder
    # name, the dataset source too, and the model card (checked below).
    ours = {key: value for key, value in run.data.tags.items() if not key.startswith("mlflow.")}
    for value in [*run.data.params.values(), *ours.values(),
                  *(item.dataset.source for item in run.inputs.dataset_inputs)]:
        assert str(tmp_path) not in value and not value.startswith("/"), value
    assert run.data.params["scored_data_dir"] == run.data.params["data_dir"] == hospital.name

    # Unreadable files are rows with their error, counted, never scored.
    predictions = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert len(predictions) == 46
    errors = predictions.set_index("study_id").error
    assert "modality MR is not a radiograph" in errors["00000000000a"]
    assert "not a DICOM file" in errors["00000000000d"]
    scored = predictions[predictions.error == ""]
    truth = (scored.truth == "opacity").to_numpy()
    expected_auc = roc_auc_score(truth, scored.prob_opacity.astype(float))
    metrics = run.data.metrics
    assert metrics["eval_roc_auc"] == pytest.approx(expected_auc)
    for name in ("roc_auc", "accuracy", "balanced_accuracy", "map", "sensitivity",
                 "specificity", "ece", "brier"):
        assert 0 <= metrics[f"eval_{name}_ci_low"] <= metrics[f"eval_{name}_ci_high"] <= (
            2 if name == "brier" else 1), name
    assert {"eval_ap_negative", "eval_ap_opacity"} <= set(metrics)
    assert metrics["eval_map"] == pytest.approx(
        (metrics["eval_ap_negative"] + metrics["eval_ap_opacity"]) / 2)

    # Calibration before and after the model's temperature, both from the same answers.
    temperature = store["outcome"].model.temperature
    raw = uncalibrated(scored[["prob_negative", "prob_opacity"]].astype(float).to_numpy(),
                       temperature)
    assert metrics["eval_ece_uncalibrated"] == pytest.approx(
        batched_ece(truth.astype(int)[None], raw[None])[0], abs=1e-6)

    artifacts = {item.path for item in client.list_artifacts(outcome.run_id, "figures")}
    assert artifacts == {f"figures/{name}.png" for name in
                         ("confusion_matrix", "per_class_prf1", "roc_curves", "reliability",
                          "subgroups")}
    subgroups = pd.read_csv(client.download_artifacts(outcome.run_id, "subgroups.csv"))
    assert list(subgroups.columns[:9]) == ["attribute", "value", "n", "prevalence", "roc_auc",
                                           "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity",
                                           "specificity"]
    assert set(subgroups.attribute) == {"PatientSex", "age_band", "ViewPosition",
                                        "Manufacturer"}
    for attribute, rows in subgroups.groupby("attribute"):
        assert rows.n.sum() == 44, attribute  # every scored study in one group of each
    logged = pd.read_csv(client.download_artifacts(outcome.run_id, "predictions.csv"), dtype=str,
                         keep_default_na=False)
    pd.testing.assert_frame_equal(logged, predictions)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == outcome.fingerprint[:16]
    assert {tag.value for tag in dataset_input.tags} == {"evaluation"}
    # MLflow 3: the numbers appear on the registered version's logged model.
    model_id = logged_model_id(client.get_model_version("covid-xray-densenet", "1"))
    linked = {metric.key: metric.value for metric in client.get_logged_model(model_id).metrics}
    assert linked["eval_roc_auc"] == pytest.approx(expected_auc)
    # The version's model card now lists this evaluation as external evidence.
    card = client.get_model_version("covid-xray-densenet", "1").description
    assert f"run `{outcome.run_id}`" in card and f"({44} studies)" in card
    assert str(tmp_path.parent) not in card and f"the folder `{hospital.name}`" in card
    assert f"- roc_auc: {metrics['eval_roc_auc']:.3f} (95% CI" in card


def test_fingerprint_follows_files_and_labels_not_the_model(hospital, tmp_path):
    first = read_labelled_set(hospital, tmp_path / "cache", progress=False).fingerprint
    assert read_labelled_set(hospital, tmp_path / "cache", progress=False).fingerprint == first
    labels = (hospital / STUDY_CSV).read_text()
    (hospital / STUDY_CSV).write_text(labels.replace("00000000000d_study,1,0,0,0",
                                                     "00000000000d_study,0,1,0,0"))
    relabelled = read_labelled_set(hospital, tmp_path / "cache", progress=False).fingerprint
    assert relabelled != first
    broken = next(hospital.glob("train/00000000000d/*/*.dcm"))
    broken.write_bytes(b"other bytes" * 20)
    assert read_labelled_set(hospital, tmp_path / "cache", progress=False).fingerprint not in (
        first, relabelled)


def test_promote_evaluates_on_one_set_and_reuses_evaluations(store, hospital):
    client = MlflowClient()
    source = client.get_model_version("covid-xray-densenet", "1").source
    name = f"external-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(2):  # the same weights twice: equal evidence, so no promotion
        client.create_model_version(name, source)
    promote(PromoteConfig(name, "1", alias="champion"))
    config = PromoteConfig(name, "2", alias="champion", if_better="roc_auc",
                           evaluate_on=str(hospital))
    refused = promote(config, progress=False)
    assert not refused.promoted
    assert refused.message.startswith("not promoted: version 2 vs version 1: roc_auc "
                                      "difference +0.0000 (95% CI +0.0000 to +0.0000, paired "
                                      "over ")
    assert refused.message.endswith("; the interval includes 0, so the difference may be chance")
    evaluations = {version: find_evaluations(name, version) for version in ("1", "2")}
    assert [len(found) for found in evaluations.values()] == [1, 1]
    first, second = (found[0] for found in evaluations.values())
    assert first.data.metrics["eval_roc_auc"] == second.data.metrics["eval_roc_auc"]
    assert first.data.tags[FINGERPRINT_TAG] == second.data.tags[FINGERPRINT_TAG]
    parent = client.get_run(first.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == f"promote-{name}-v2"
    # Asked again, the evaluations of the same files are reused, not repeated.
    assert not promote(config, progress=False).promoted
    assert [len(find_evaluations(name, version)) for version in ("1", "2")] == [1, 1]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_evaluate_cli_through_mlflow_run(store, hospital, tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT),
         "-e", "evaluate", "--env-manager", "local", "-P", f"data_dir={hospital}",
         "-P", "resamples=100", "-P", f"cache_dir={tmp_path / 'cache'}"],
        cwd=store["root"], env=clean_env(MLFLOW_TRACKING_URI=store["uri"]), capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluated covid-xray-densenet version 1 on 44 studies" in done.stdout
    assert "roc_auc" in done.stdout and "95% CI" in done.stdout
    run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.eval_model_version = '1'",
                             order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED" and "eval_ece" in run.data.metrics

    bad = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "evaluate.py"),
                          "--model-uri", "models:/covid-xray-densenet@nobody",
                          "--data-dir", str(hospital)],
                         cwd=store["root"], env=clean_env(MLFLOW_TRACKING_URI=store["uri"]),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: cannot load model 'models:/covid-xray-densenet@nobody'")


def test_the_alias_is_resolved_once_and_that_version_is_scored(store, hospital, tmp_path,
                                                                monkeypatch):
    """If @champion moved between loading the model and naming its version, the run would be
    tagged with a version it never scored: the alias is resolved once, and the model loaded
    is that version by number."""
    from covid_xray.tracking import registry

    loaded = []
    real_load = registry.load
    monkeypatch.setattr(registry, "load", lambda uri: loaded.append(uri) or real_load(uri))
    outcome = evaluate_model(EvaluateConfig(model_uri=CHAMPION, data_dir=str(hospital),
                                            resamples=0, cache_dir=str(tmp_path / "cache")),
                             progress=False)
    version = MlflowClient().get_run(outcome.run_id).data.tags["eval_model_version"]
    assert loaded == [f"models:/covid-xray-densenet/{version}"]


def learned_studies(run_id: str) -> pd.DataFrame:
    manifest = pd.read_csv(MlflowClient().download_artifacts(run_id, "data/manifest.csv"),
                           dtype=str, keep_default_na=False)
    return manifest[manifest.split.isin(["train", "val"])]


def runs_in_store() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


def test_the_training_folder_is_refused_and_overlap_drop_scores_only_unseen_studies(
        store, demo_dataset, tmp_path):
    outcome = store["outcome"]
    learned = learned_studies(outcome.run_id)
    usable = read_labelled_set(demo_dataset, tmp_path / "cache", progress=False).studies
    before = runs_in_store()
    config = EvaluateConfig(model_uri=CHAMPION, data_dir=str(demo_dataset), resamples=50,
                            cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=rf"^{len(learned)} of the {len(usable)} studies in "
                       rf"{demo_dataset} are ones the model was trained or validated on"):
        evaluate_model(config, progress=False)
    assert runs_in_store() == before  # refused before anything was logged

    dropped = evaluate_model(EvaluateConfig(**vars(config) | {"overlap": "drop"}),
                             progress=False)
    run = MlflowClient().get_run(dropped.run_id)
    assert run.data.params["count/dropped_overlap"] == str(len(learned))
    assert set(dropped.predictions.study_id) == set(usable.study_id) - set(learned.study_id)


def test_a_renamed_copy_and_a_re_exported_film_of_a_training_study_are_found(store, tmp_path):
    """Overlap is found by content too: the same file under new ids, and the same pixels in a
    new file (new UIDs, other bytes)."""
    import pydicom
    from pydicom.uid import generate_uid

    outcome = store["outcome"]
    learned = learned_studies(outcome.run_id).iloc[:2]
    data_dir = tmp_path / "elsewhere"
    source_dir = Path(outcome.test_paths[0]).parents[3]
    rows = ["id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,"
            "Atypical Appearance"]
    for index, study in enumerate(learned.itertuples()):
        study_id, image_id = f"{index + 1:012x}", f"{index + 11:012x}"
        target = data_dir / "train" / study_id / f"{index + 21:012x}" / f"{image_id}.dcm"
        target.parent.mkdir(parents=True)
        if index == 0:
            shutil.copy(source_dir / study.path, target)  # the same bytes
        else:
            dataset = pydicom.dcmread(source_dir / study.path)
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.StudyInstanceUID = generate_uid()
            dataset.save_as(target)
            assert target.read_bytes() != (source_dir / study.path).read_bytes()
        onehot = ["0"] * 4
        onehot[int(study.siim_class)] = "1"
        rows.append(f"{study_id}_study,{','.join(onehot)}")
    (data_dir / STUDY_CSV).write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"^2 of the 2 studies in .* trained or validated on"):
        evaluate_model(EvaluateConfig(model_uri=CHAMPION, data_dir=str(data_dir),
                                      cache_dir=str(tmp_path / "cache")), progress=False)


def test_without_data_dir_the_models_own_test_split_is_rescored_exactly(
        store, demo_dataset, tmp_path, capsys, monkeypatch):
    """From the folder training ran in (the record names the data folder, not its path)."""
    outcome = store["outcome"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError, match=rf"^the model was trained on the folder "
                                        rf"{demo_dataset.name}, which is not at "):
        evaluate_model(EvaluateConfig(model_uri=CHAMPION, cache_dir=str(tmp_path / "cache")),
                       progress=False)
    monkeypatch.chdir(demo_dataset.parent)
    rescored = evaluate_model(EvaluateConfig(model_uri=CHAMPION,
                                             cache_dir=str(tmp_path / "cache")),
                              progress=False)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"no data_dir: rescoring the model's own test split "
                              f"({len(outcome.test_paths)} studies of ")
    training = MlflowClient().get_run(outcome.run_id).data.metrics
    evaluated = MlflowClient().get_run(rescored.run_id).data.metrics
    tested = {key.removeprefix("test_"): value for key, value in training.items()
              if key.startswith("test_")}
    assert len(tested) >= 30  # every metric with its CI, per-class P/R/F1 and AP
    for key, value in tested.items():
        assert evaluated[f"eval_{key}"] == pytest.approx(value, abs=1e-6), key
    logged = MlflowClient().download_artifacts
    pd.testing.assert_frame_equal(pd.read_csv(logged(rescored.run_id, "subgroups.csv")),
                                  pd.read_csv(logged(outcome.run_id, "subgroups.csv")))


def test_four_class_models_evaluate_and_promote_end_to_end(store, demo_dataset, hospital,
                                                           tmp_path):
    name = f"four-{uuid.uuid4().hex[:8]}"
    run_training(TrainConfig(
        data_dir=str(demo_dataset), cache_dir=str(tmp_path / "cache"), num_classes=4,
        balance="weights", split="50,25,25", model="none", img_size=32, epochs=1,
        batch_size=16, num_workers=0, device="cpu", registered_model_name=name,
        experiment_name=name), progress=False)
    client = MlflowClient()
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert info.metadata["threshold"] is None and info.metadata["operating_point"] == "argmax"

    evaluated = evaluate_model(EvaluateConfig(model_uri=f"models:/{name}/1",
                                              data_dir=str(hospital), resamples=100,
                                              cache_dir=str(tmp_path / "cache")),
                               progress=False)
    metrics = client.get_run(evaluated.run_id).data.metrics
    classes = ("negative", "typical", "indeterminate", "atypical")
    assert {f"eval_ap_{name}" for name in classes} <= set(metrics)
    assert "eval_sensitivity" not in metrics
    scored = evaluated.predictions[evaluated.predictions.error == ""]
    # 4-class calls are the most probable class (after temperature scaling); a film far from
    # the training films keeps its probabilities but is called nothing.
    probabilities = scored[[f"prob_{name}" for name in classes]].to_numpy(dtype=float)
    inside = scored.in_distribution.astype(bool).to_numpy()
    assert scored.predicted[inside].tolist() == [classes[i] for i in
                                                 probabilities[inside].argmax(axis=1)]
    assert (scored.predicted[~inside] == "").all()

    client.create_model_version(name, client.get_model_version(name, "1").source)
    promote(PromoteConfig(name, "1", alias="champion"))
    refused = promote(PromoteConfig(name, "2", alias="champion", if_better="map",
                                    evaluate_on=str(hospital)), progress=False)
    assert not refused.promoted
    assert refused.message.startswith("not promoted: version 2 vs version 1: map difference "
                                      "+0.0000 (95% CI +0.0000 to +0.0000")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def filed_anew(source: Path, target: Path, **header) -> Path:
    """`source`'s film saved as `target` under new UIDs (a new study, series and image), with
    `header` set: what a later study, or a copy passed through another system, looks like."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def test_a_training_patients_follow_up_and_a_near_copy_of_a_training_film_are_refused(
        store, demo_dataset, tmp_path, monkeypatch):
    """Evaluate matched study and image ids and exact digests only: a training patient's new
    study (new UIDs, another film) and a training film with +-1 noise under new UIDs passed as
    unseen. Now the first is found by the patient's keyed pseudonym, the second as a
    near-duplicate; two films of one patient the model never saw are scored. Under another
    pseudonym key, patients cannot be matched: one line, unless overlap=ignore_patients."""
    import pydicom

    from covid_xray.serving.evaluate import logged_manifest
    from tests.test_likeness import re_encoded

    manifest = logged_manifest(store["outcome"].run_id)
    train, test = (manifest[manifest.split == split] for split in ("train", "test"))
    data_dir = tmp_path / "hospital"
    films = {  # name -> (film, siim class)
        "follow-up": (filed_anew(demo_dataset / test.path.iloc[0], tmp_path / "a.dcm",
                                 PatientID=pydicom.dcmread(demo_dataset / train.path.iloc[0])
                                 .PatientID), test.siim_class.iloc[0]),
        "near copy": (filed_anew(re_encoded(demo_dataset / train.path.iloc[1],
                                            tmp_path / "noisy.dcm", "noise +-1"),
                                 tmp_path / "b.dcm", PatientID="NEVER-SEEN-1"),
                      train.siim_class.iloc[1]),
        **{f"unseen {index}": (filed_anew(demo_dataset / test.path.iloc[index],
                                          tmp_path / f"c{index}.dcm", PatientID="NEVER-SEEN-2"),
                               test.siim_class.iloc[index]) for index in (1, 2)},
        # An anonymiser's placeholder names no one: this film is compared by film only.
        "anonymised": (filed_anew(demo_dataset / test.path.iloc[3], tmp_path / "d.dcm",
                                  PatientID="ANONYMOUS"), test.siim_class.iloc[3]),
    }
    rows = ["id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,"
            "Atypical Appearance"]
    study_of = {}
    for index, (name, (film, siim_class)) in enumerate(films.items()):
        study_id = f"{index + 1:012x}"
        target = data_dir / "train" / study_id / f"{index + 21:012x}" / f"{index + 41:012x}.dcm"
        target.parent.mkdir(parents=True)
        shutil.copy(film, target)
        onehot = ["0"] * 4
        onehot[int(siim_class)] = "1"
        rows.append(f"{study_id}_study,{','.join(onehot)}")
        study_of[name] = study_id
    (data_dir / STUDY_CSV).write_text("\n".join(rows) + "\n")
    config = EvaluateConfig(model_uri=CHAMPION, data_dir=str(data_dir), resamples=50,
                            cache_dir=str(tmp_path / "cache"))

    refused = (r"^2 of the 5 studies in .* trained or validated on \(1 by patient, 1 by "
               r"near-duplicate film; 1 of the 5 had no usable PatientID and were compared by "
               r"film only\)")
    with pytest.raises(UserError, match=refused):
        evaluate_model(config, progress=False)
    dropped = evaluate_model(EvaluateConfig(**vars(config) | {"overlap": "drop"}),
                             progress=False)
    assert set(dropped.predictions.study_id) == {study_of["unseen 1"], study_of["unseen 2"],
                                                 study_of["anonymised"]}

    suite_key = os.environ["COVID_XRAY_PSEUDONYM_KEY"]
    monkeypatch.setenv("COVID_XRAY_PSEUDONYM_KEY", "another machine's key " + "1" * 40)
    with pytest.raises(UserError, match=r"^this machine's pseudonym key \(\$COVID_XRAY_PSEUDONYM"
                       r"_KEY, fingerprint \w+\) is not the one the model's training named "
                       r"patients with"):
        evaluate_model(config, progress=False)
    with pytest.raises(UserError, match=r"^1 of the 5 studies .* \(1 by near-duplicate film\)"):
        evaluate_model(EvaluateConfig(**vars(config) | {"overlap": "ignore_patients"}),
                       progress=False)

    # The key is the user's, not a cache's: the training key an earlier version kept in its
    # cache is adopted once, and another cache, or that one deleted, still finds the patient
    # (before: a new key appeared in the other cache, and evaluate refused).
    monkeypatch.delenv("COVID_XRAY_PSEUDONYM_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    old_cache = tmp_path / "old-cache"
    old_cache.mkdir()
    (old_cache / "pseudonym.key").write_text(suite_key + "\n")
    with pytest.raises(UserError, match=refused):
        evaluate_model(EvaluateConfig(**vars(config) | {"cache_dir": str(old_cache)}),
                       progress=False)
    shutil.rmtree(old_cache)
    with pytest.raises(UserError, match=refused):
        evaluate_model(config, progress=False)
    # Another user's key: the refusal names the key file, the fingerprint it needs, and a
    # cache that still holds that key.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-2"))
    (tmp_path / "config-2" / "covid-xray").mkdir(parents=True)
    (tmp_path / "config-2" / "covid-xray" / "pseudonym.key").write_text("c" * 64)
    (old_cache / "pseudonym.key").parent.mkdir()
    (old_cache / "pseudonym.key").write_text(suite_key + "\n")
    recorded = MlflowClient().get_run(store["outcome"].run_id).data.tags[
        "pseudonym_key_fingerprint"]
    with pytest.raises(UserError, match=(
            rf"^this machine's pseudonym key \({tmp_path}/config-2/covid-xray/pseudonym.key, "
            rf"fingerprint \w+\) is not the one the model's training named patients with "
            rf"\(fingerprint {recorded}\), so a training patient's new study cannot be "
            rf"recognised; {old_cache}/pseudonym.key holds it")):
        evaluate_model(EvaluateConfig(**vars(config) | {"cache_dir": str(old_cache)}),
                       progress=False)


def test_a_placeholder_in_an_older_models_manifest_matches_no_one():
    """A model trained before placeholders counted as no patient has one pseudonym on many of
    its manifest's studies: every evaluation study carrying it was refused as a follow-up."""
    from covid_xray.tracking.manifests import learned_from

    manifest = pd.DataFrame({"study_id": [f"s{index}" for index in range(60)],
                             "image_id": [f"i{index}" for index in range(60)],
                             "patient_id": ["placeholder"] * 51 + [f"p{i}" for i in range(9)],
                             "split": ["train"] * 60})
    studies = pd.DataFrame({"study_id": ["n1", "n2", "n3"], "image_id": ["m1", "m2", "m3"]})
    found = learned_from(studies, manifest, patients=["placeholder", "p3", "unseen"])
    assert found["patient"].tolist() == [False, True, False]
