"""Download: local zips (good, escaping, truncated), resumed extraction, credentials, and the
Kaggle client against a local stand-in for its API."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kagglesdk import kaggle_env

from covid_xray.config import DownloadConfig
from covid_xray.data import download as download_module
from covid_xray.data.download import download, extract_archive
from covid_xray.data.studies import STUDY_CSV, find_studies, read_study_labels
from covid_xray.errors import UserError
from tests.conftest import ROOT, clean_env
from tests.kaggle_stub import KaggleStub


def competition_zip(dataset: Path, target: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like Kaggle's: CSVs, train/, plus test/ and a submission file we skip."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(dataset.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(dataset).as_posix())
        archive.writestr("test/aaaaaaaaaaaa/bbbbbbbbbbbb/cccccccccccc.dcm", b"not needed")
        archive.writestr("sample_submission.csv", "id,PredictionString\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return target


def test_well_formed_zip(tiny_dataset, tmp_path):
    archive = competition_zip(tiny_dataset, tmp_path / "siim.zip")
    data_dir = tmp_path / "data"
    download(DownloadConfig(source=str(archive), data_dir=str(data_dir)))
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "train", "train_image_level.csv", "train_study_level.csv"]
    assert len(list(data_dir.glob("train/*/*/*.dcm"))) == len(list(tiny_dataset.glob("train/*/*/*.dcm")))
    assert len(find_studies(data_dir).studies) == 48 - 4  # every single-image study usable
    # Idempotent: a second run finds everything verified and does nothing.
    again = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "download.py"),
                            "--source", str(archive), "--data-dir", str(data_dir)],
                           capture_output=True, text=True, env=clean_env(), timeout=300)
    assert again.returncode == 0 and "already holds a verified dataset" in again.stdout


@pytest.mark.parametrize("entry", ["../escape.txt", "/etc/escape.txt", "train/../../escape.txt",
                                   "link"])
def test_escaping_entries_are_refused(tiny_dataset, tmp_path, entry):
    archive = tmp_path / "evil.zip"
    competition_zip(tiny_dataset, archive)
    with zipfile.ZipFile(archive, "a") as handle:
        if entry == "link":
            info = zipfile.ZipInfo("train/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            handle.writestr(info, "/etc/passwd")
        else:
            handle.writestr(entry, b"owned")
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(UserError, match=r"would land outside .*refusing to extract this archive"):
        download(DownloadConfig(source=str(archive), data_dir=str(data_dir)))
    assert not list(tmp_path.rglob("escape.txt"))
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_truncated_zip(tiny_dataset, tmp_path):
    archive = competition_zip(tiny_dataset, tmp_path / "siim.zip")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match=r"siim\.zip: not a readable zip archive .*download it again"):
        download(DownloadConfig(source=str(archive), data_dir=str(data_dir)))
    assert not (data_dir / "train").exists()


def test_corrupt_member_is_reported_and_nothing_is_placed(tiny_dataset, tmp_path):
    archive = competition_zip(tiny_dataset, tmp_path / "siim.zip")
    with zipfile.ZipFile(archive) as handle:
        victim = next(i for i in handle.infolist() if i.filename.endswith(".dcm"))
    data = bytearray(archive.read_bytes())
    start = victim.header_offset + 30 + len(victim.filename) + len(victim.extra)
    data[start + 100 : start + 164] = bytes(64)  # flip payload bytes: CRC mismatch
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"truncated or corrupt at {victim.filename}"):
        extract_archive(archive, tmp_path / "data")
    assert not (tmp_path / "data" / "train").exists()


def test_interrupted_extraction_resumes(tiny_dataset, tmp_path):
    """What an interrupted run leaves (finished files + one partial) is picked up, not redone."""
    archive = competition_zip(tiny_dataset, tmp_path / "siim.zip")
    data_dir = tmp_path / "data"
    with zipfile.ZipFile(archive) as handle:
        dicoms = [i for i in handle.infolist() if i.filename.startswith("train/")]
        for info in dicoms[:10]:  # finished before the interruption
            handle.extract(info, data_dir / ".extract")
        partial = data_dir / ".extract" / (dicoms[10].filename + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half a file")
    counts = extract_archive(archive, data_dir)
    assert counts == {"extracted": len(dicoms) + 2 - 10, "skipped": 10}
    assert not (data_dir / ".extract").exists()
    assert download_module.verify(data_dir).startswith("48 studies")


def test_extracted_folder_source(tiny_dataset, tmp_path):
    data_dir = tmp_path / "data"
    download(DownloadConfig(source=str(tiny_dataset), data_dir=str(data_dir)))
    assert (data_dir / "train").is_symlink()
    assert (data_dir / STUDY_CSV).read_text() == (tiny_dataset / STUDY_CSV).read_text()
    with pytest.raises(UserError, match="does not exist"):
        download(DownloadConfig(source=str(tmp_path / "nowhere"), data_dir=str(data_dir)))


def test_missing_credentials_one_line_before_any_request(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in clean_env(HOME=str(home)).items()
           if not k.startswith("KAGGLE_")}
    result = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "download.py"),
                             "--data-dir", str(tmp_path / "data")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no Kaggle credentials found: create a token at https://www.kaggle.com/settings/"
        "api and put it in KAGGLE_API_TOKEN or ~/.kaggle/access_token (legacy: "
        "~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY)"]
    assert result.stdout == ""


@pytest.fixture
def kaggle_stub(tiny_dataset, tmp_path, monkeypatch):
    """The stub API with the tiny dataset as the competition's files. The kaggle client picks
    its endpoint from a fixed table; we aim its production entry at the stub, which is the one
    place the client meets the network."""
    stub = KaggleStub(root=tiny_dataset)
    server, url = stub.serve()
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, url)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)
    monkeypatch.setattr(download_module, "RETRY_DELAY", 0.01)
    yield stub
    server.shutdown()


def test_kaggle_sample_download(kaggle_stub, tmp_path, capsys):
    data_dir = tmp_path / "data"
    download(DownloadConfig(data_dir=str(data_dir), limit=10))
    calls = [(r["method"], r["body"]) for r in kaggle_stub.requests if r["method"] != "GET"]
    assert calls[:2] == [
        ("DownloadDataFile", {"competitionName": "siim-covid19-detection",
                              "fileName": "train_study_level.csv"}),
        ("DownloadDataFile", {"competitionName": "siim-covid19-detection",
                              "fileName": "train_image_level.csv"}),
    ]
    assert calls[2][0] == "ListDataFiles"
    assert calls[2][1]["competitionName"] == "siim-covid19-detection"
    fetched = [body["fileName"] for method, body in calls if method == "DownloadDataFile"][2:]
    labels = read_study_labels(data_dir / STUDY_CSV)
    assert len(labels) == 10 and (labels.siim_class == 0).sum() == 5  # balanced sample
    on_disk = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.glob("train/*/*/*.dcm"))
    assert sorted(fetched) == on_disk
    assert {Path(name).parts[1] for name in fetched} == set(labels.study_id)
    assert not (data_dir / ".download").exists()
    output = capsys.readouterr()
    assert kaggle_stub.key not in output.out + output.err  # the key is never shown

    # Rerun: everything present and verified, no request made.
    before = len(kaggle_stub.requests)
    download(DownloadConfig(data_dir=str(data_dir), limit=10))
    assert len(kaggle_stub.requests) == before


def test_kaggle_refusal_says_accept_the_rules(kaggle_stub, tmp_path):
    kaggle_stub.refuse = 403
    with pytest.raises(UserError, match=r"Kaggle refused access \(403\): sign in and accept the "
                                        r"rules at https://www.kaggle.com/competitions/"
                                        r"siim-covid19-detection/rules"):
        download(DownloadConfig(data_dir=str(tmp_path / "data"), limit=4))
    assert not (tmp_path / "data" / STUDY_CSV).exists()


def test_kaggle_network_failure_retries_then_says_so(kaggle_stub, tmp_path, monkeypatch):
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD,
                        "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(UserError, match=r"could not fetch train_study_level.csv from Kaggle "
                                        r"after 5 attempts \(ConnectionError\)"):
        download(DownloadConfig(data_dir=str(tmp_path / "data"), limit=4))


def test_whole_archive_path_uses_download_files(kaggle_stub, tiny_dataset, tmp_path, monkeypatch):
    """The no-limit path asks for the competition archive, then extracts it safely."""
    archive = competition_zip(tiny_dataset, tmp_path / "served.zip")
    asked = []

    def fake_download_files(self, competition, path, quiet, force):
        asked.append(competition)
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, Path(path) / f"{competition}.zip")

    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(KaggleApi, "competition_download_files", fake_download_files)
    data_dir = tmp_path / "data"
    download(DownloadConfig(data_dir=str(data_dir)))
    assert asked == ["siim-covid19-detection"]
    assert download_module.verify(data_dir).startswith("48 studies")
    assert not (data_dir / ".download").exists()


def test_a_sample_does_not_block_a_larger_or_full_download(kaggle_stub, tiny_dataset, tmp_path,
                                                           monkeypatch):
    """A sample's CSVs are narrowed copies that verify as a whole dataset: the record of what
    was fetched makes a larger limit fetch only the new studies, and a full request fetch the
    archive, instead of "nothing to do"."""
    import json

    data_dir = tmp_path / "data"
    download(DownloadConfig(data_dir=str(data_dir), limit=6))
    assert json.loads((data_dir / ".download.json").read_text()) == {
        "downloaded": "sample", "studies": 6}
    first = set(read_study_labels(data_dir / STUDY_CSV).study_id)
    before = len(kaggle_stub.requests)
    download(DownloadConfig(data_dir=str(data_dir), limit=4))  # a smaller one: already there
    assert len(kaggle_stub.requests) == before

    download(DownloadConfig(data_dir=str(data_dir), limit=12))
    grown = set(read_study_labels(data_dir / STUDY_CSV).study_id)
    assert len(grown) == 12 and first < grown  # a larger sample holds the smaller one
    fetched = [r["body"]["fileName"] for r in kaggle_stub.requests[before:]
               if r["method"] == "DownloadDataFile" and r["body"]["fileName"].endswith(".dcm")]
    assert {Path(name).parts[1] for name in fetched} == grown - first  # only the new studies

    archive = competition_zip(tiny_dataset, tmp_path / "served.zip")

    def whole_archive(self, competition, path, quiet, force):
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, Path(path) / f"{competition}.zip")

    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(KaggleApi, "competition_download_files", whole_archive)
    download(DownloadConfig(data_dir=str(data_dir)))
    assert len(read_study_labels(data_dir / STUDY_CSV)) == 48
    assert json.loads((data_dir / ".download.json").read_text()) == {"downloaded": "full"}


def test_a_key_file_others_can_read_is_warned_about(tmp_path, monkeypatch, capsys):
    """kaggle's own warning about a world-readable key is lost in the output it prints at
    authentication, which we silence: we say it ourselves, naming the fix, before any
    request."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    key_file = tmp_path / ".kaggle" / "kaggle.json"
    key_file.parent.mkdir()
    key_file.write_text('{"username": "tester", "key": "secret-key-123"}')
    key_file.chmod(0o644)
    assert download_module.find_credentials() == str(key_file)
    err = capsys.readouterr().err
    assert err == (f"warning: {key_file} is readable by other users (mode 0644); anyone on "
                   f"this machine can use your Kaggle key: run `chmod 600 {key_file}`\n")
    key_file.chmod(0o600)
    assert download_module.find_credentials() == str(key_file)
    assert capsys.readouterr().err == ""
