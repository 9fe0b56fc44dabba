"""Get the SIIM data into `data_dir`: from Kaggle, from a zip or folder you have, or synthetic.

Whatever the source, the result is the layout `data/studies.py` reads (both CSVs + train/ DICOMs),
and it appears only when complete: work happens in hidden folders inside `data_dir` and is
renamed into place at the end, so an interrupted run leaves nothing half-done (and the next run
resumes from the files already finished). Archive entries that would land outside `data_dir`
are refused. Kaggle credentials are checked before any request and never printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import requests
from tqdm import tqdm

from covid_xray.config import DownloadConfig
from covid_xray.data import synthetic
from covid_xray.data.studies import IMAGE_CSV, STUDY_CSV, find_studies, read_study_labels
from covid_xray.errors import UserError
from covid_xray.files import atomic_write

CSV_FILES = (STUDY_CSV, IMAGE_CSV)
# What a finished download holds: {"downloaded": "full"} or {"downloaded": "sample",
# "studies": N}. A sample's CSVs are narrowed to its studies, so they verify as a complete
# dataset: only this record tells a later, larger request that there is more to fetch.
RECORD = ".download.json"
RETRIES = 5
RETRY_DELAY = 2.0  # seconds, doubled after each failed attempt
T = TypeVar("T")


def download(config: DownloadConfig) -> Path:
    """Fill `config.data_dir` from `config.source`; return it."""
    data_dir = Path(config.data_dir)
    if config.source == "synthetic":
        return _synthetic(config, data_dir)
    if config.source != "kaggle" and not Path(config.source).exists():
        raise UserError(f"source must be kaggle, synthetic, or an existing zip or folder; "
                        f"{config.source} does not exist")
    wanted = {"downloaded": "sample", "studies": config.limit} if (
        config.source == "kaggle" and config.limit > 0) else {"downloaded": "full"}
    held = downloaded(data_dir)
    if not config.force and _covers(held, wanted) and _is_complete(data_dir):
        print(f"{data_dir} already holds a verified dataset ({_describe(held)}); nothing to do "
              "(force=true redoes it)")
        return data_dir
    if held.get("downloaded") == "sample" and not _covers(held, wanted):
        print(f"{data_dir} holds {_describe(held)}; fetching the rest for {_describe(wanted)}")
    if config.source == "kaggle":
        _from_kaggle(config, data_dir)
    else:
        _from_local(Path(config.source), data_dir)
    report = verify(data_dir)
    if config.source == "kaggle":
        atomic_write(data_dir / RECORD, lambda file: file.write(json.dumps(wanted).encode()))
    else:  # a whole zip or folder of your own: no record is the full set
        (data_dir / RECORD).unlink(missing_ok=True)
    print(f"{data_dir}: {report}")
    return data_dir


def downloaded(data_dir: Path) -> dict:
    """What the last finished download put in `data_dir` (a folder with no record: full)."""
    try:
        return json.loads((data_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {"downloaded": "full"}


def _covers(held: dict, wanted: dict) -> bool:
    """Whether what is there answers the request: the full set answers anything, a sample of
    N studies a request for at most N."""
    if held.get("downloaded") == "full":
        return True
    return wanted.get("downloaded") == "sample" and wanted["studies"] <= held.get("studies", 0)


def _describe(record: dict) -> str:
    if record.get("downloaded") == "sample":
        return f"a sample of {record.get('studies')} studies"
    return "the full set"


# --- what a finished dataset looks like ------------------------------------------------


def verify(data_dir: Path) -> str:
    """Check every labelled study has its DICOM(s); a one-line summary, or UserError."""
    table = find_studies(data_dir)
    total = len(table.studies) + len(table.multi_image) + len(table.missing_files)
    if table.missing_files:
        raise UserError(f"{data_dir}: {len(table.missing_files)} of {total} studies in "
                        f"{STUDY_CSV} have no DICOM under train/ (first: "
                        f"{table.missing_files[0]}); run download again (force=true to start "
                        "over)")
    return (f"{total} studies ({len(table.multi_image)} with several images), every study's "
            "files present")


def _is_complete(data_dir: Path) -> bool:
    try:
        verify(data_dir)
    except UserError:
        return False
    return True


# --- synthetic -----------------------------------------------------------------------


def _synthetic(config: DownloadConfig, data_dir: Path) -> Path:
    if (data_dir / STUDY_CSV).exists() and not config.force:
        print(f"{data_dir} already holds a dataset ({STUDY_CSV}); leaving it as it is")
        return data_dir
    if config.num_studies < 1 or config.image_size < 16:
        raise UserError("synthetic data needs num_studies >= 1 and image_size >= 16")
    if config.force:
        _remove_dataset(data_dir)
    synthetic.make_dataset(data_dir, num_studies=config.num_studies,
                           image_size=config.image_size, seed=config.seed)
    print(f"wrote {config.num_studies} synthetic studies in the SIIM layout to {data_dir}")
    return data_dir


# --- a zip or folder the user already has ---------------------------------------------


def _from_local(source: Path, data_dir: Path) -> None:
    if source.is_file():
        extract_archive(source, data_dir)
    else:
        if not (source / STUDY_CSV).is_file() or not (source / "train").is_dir():
            raise UserError(f"{source}: not a SIIM folder (needs {STUDY_CSV} and train/)")
        data_dir.mkdir(parents=True, exist_ok=True)
        # Link, do not copy, the images: the training set is over 100 GB.
        _replace(data_dir / "train", lambda target: target.symlink_to(
            (source / "train").resolve(), target_is_directory=True))
        for name in CSV_FILES:
            if (source / name).is_file():
                _replace(data_dir / name, lambda target, name=name: shutil.copyfile(
                    source / name, target))


def extract_archive(archive: Path, data_dir: Path) -> dict[str, int]:
    """Extract the CSVs and train/ from a competition zip into `data_dir`, safely.

    Every entry is checked first: absolute paths, `..` and links are refused (the whole archive
    is, since it cannot be trusted). Entries stream into `data_dir/.extract/`, each written to a
    temporary name and renamed when complete, so a rerun after an interruption skips what is
    already there. Returns counts of entries extracted and skipped.
    """
    try:
        archive_file = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{archive}: not a readable zip archive ({error}); download it "
                        "again") from None
    with archive_file:
        members = [m for m in archive_file.infolist() if not m.is_dir()]
        for member in members:
            _check_member(member, archive, data_dir)
        wanted = [m for m in members if m.filename in CSV_FILES
                  or m.filename.startswith("train/")]
        if not any(m.filename == STUDY_CSV for m in wanted):
            raise UserError(f"{archive}: no {STUDY_CSV} inside; is this the SIIM competition "
                            "archive?")
        data_dir.mkdir(parents=True, exist_ok=True)
        _check_free_space(data_dir, sum(m.file_size for m in wanted))
        work = data_dir / ".extract"
        counts = {"extracted": 0, "skipped": 0}
        with tqdm(total=sum(m.file_size for m in wanted), unit="B", unit_scale=True,
                  desc=f"extracting {archive.name}") as bar:
            for member in wanted:
                target = work / member.filename
                if target.is_file() and target.stat().st_size == member.file_size:
                    counts["skipped"] += 1  # finished by an earlier, interrupted run
                    bar.update(member.file_size)
                    continue
                _extract_member(archive_file, member, target, bar, archive)
                counts["extracted"] += 1
    for name in ("train", *CSV_FILES):
        if (work / name).exists():
            _replace(data_dir / name, lambda target, name=name: os.replace(work / name, target))
    shutil.rmtree(work, ignore_errors=True)
    print(f"extracted {counts['extracted']} files ({counts['skipped']} already there) from "
          f"{archive}")
    return counts


def _check_member(member: zipfile.ZipInfo, archive: Path, data_dir: Path) -> None:
    name = member.filename.replace("\\", "/")
    path = PurePosixPath(name)
    is_link = stat.S_ISLNK(member.external_attr >> 16)
    if path.is_absolute() or ".." in path.parts or name[1:3] == ":/" or is_link:
        what = "a link" if is_link else "an absolute path" if path.is_absolute() else "'..'"
        raise UserError(f"{archive}: entry {member.filename!r} is {what} and would land "
                        f"outside {data_dir}; refusing to extract this archive")


def _extract_member(archive_file: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path,
                    bar: tqdm, archive: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with archive_file.open(member) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
                bar.update(len(chunk))
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"{archive}: truncated or corrupt at {member.filename} ({error}); "
                        "download the archive again") from None
    os.replace(partial, target)


# --- Kaggle ----------------------------------------------------------------------------


def find_credentials() -> str:
    """Where the kaggle package will find credentials (its own search order), or UserError.

    Checked before any request, so a missing key costs nothing; the key itself is never read
    into our output.
    """
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        token = Path.home() / ".kaggle" / name
        if token.is_file() and token.read_text().strip():
            return _warn_if_shared(token)
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if (config_dir / "kaggle.json").is_file():
        return _warn_if_shared(config_dir / "kaggle.json")
    raise UserError("no Kaggle credentials found: create a token at "
                    "https://www.kaggle.com/settings/api and put it in KAGGLE_API_TOKEN or "
                    "~/.kaggle/access_token (legacy: ~/.kaggle/kaggle.json, or "
                    "KAGGLE_USERNAME and KAGGLE_KEY)")


def _warn_if_shared(path: Path) -> str:
    """A key file others on the machine can read is a leaked key: say so (kaggle's own
    warning is lost in the stdout it prints at authentication, which we silence)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        print(f"warning: {path} is readable by other users (mode {mode:04o}); anyone on this "
              f"machine can use your Kaggle key: run `chmod 600 {path}`", file=sys.stderr)
    return str(path)


def kaggle_api() -> Any:
    """An authenticated KaggleApi. Imported only here: `import kaggle` authenticates (and
    prints) at import time."""
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:  # the package exits when it finds no usable credentials
            raise UserError("Kaggle rejected the credentials it found; create a new token at "
                            "https://www.kaggle.com/settings/api") from None
    return api


def _from_kaggle(config: DownloadConfig, data_dir: Path) -> None:
    credentials = find_credentials()
    print(f"using Kaggle credentials from {credentials}")
    data_dir.mkdir(parents=True, exist_ok=True)
    work = data_dir / ".download"
    with _kaggle_errors(config.competition):
        api = kaggle_api()
        # Small, and they say which images exist. Always fetched afresh: a sample's are
        # narrowed copies, which a larger request must not start from.
        for name in CSV_FILES:
            _fetch(api, config.competition, name, work, data_dir / name, force=True)
        if config.limit > 0:
            _fetch_sample(api, config, data_dir, work)
        else:
            _fetch_archive(api, config, data_dir, work)
    shutil.rmtree(work, ignore_errors=True)


def _fetch_archive(api: Any, config: DownloadConfig, data_dir: Path, work: Path) -> None:
    """The whole competition zip (the client resumes a partial one), then extraction."""
    files = _list_files(api, config.competition)
    total = sum(size for _, size in files)
    _check_free_space(data_dir, 2 * total)  # the zip plus what is extracted from it
    print(f"downloading the whole {config.competition} archive (~{total / 1e9:.0f} GB; "
          "interrupt and rerun to resume; -P limit=N fetches a sample instead)")
    _retrying(lambda: api.competition_download_files(config.competition, path=str(work),
                                                     quiet=False, force=config.force),
              "the competition archive")
    archive = work / f"{config.competition}.zip"
    extract_archive(archive, data_dir)
    archive.unlink(missing_ok=True)


def _fetch_sample(api: Any, config: DownloadConfig, data_dir: Path, work: Path) -> None:
    """A balanced sample of `limit` studies (half negative), fetched file by file; the CSVs are
    narrowed to those studies so the folder is a consistent small dataset."""
    labels = read_study_labels(data_dir / STUDY_CSV)
    # Each class in one fixed shuffled order, the first k taken: a larger limit's sample holds
    # a smaller one's, so growing a sample only fetches the new studies.
    negatives = np.random.default_rng(0).permutation(
        np.sort(labels.study_id[labels.siim_class == 0].to_numpy()))
    others = np.random.default_rng(1).permutation(
        np.sort(labels.study_id[labels.siim_class > 0].to_numpy()))
    half = min(config.limit // 2, len(negatives))
    chosen = set(negatives[:half]) | set(others[: config.limit - half])
    files = [(name, size) for name, size in _list_files(api, config.competition, "train/")
             if PurePosixPath(name).parts[1] in chosen]
    _check_free_space(data_dir, sum(size for _, size in files))
    for name, size in tqdm(files, desc=f"fetching {len(chosen)} studies", unit="file"):
        target = data_dir / name
        if target.is_file() and target.stat().st_size == size and not config.force:
            continue  # present and complete
        _fetch(api, config.competition, name, work, target, force=True)
    _narrow_csvs(data_dir, chosen)


def _list_files(api: Any, competition: str, prefix: str = "") -> list[tuple[str, int]]:
    files, token = [], None
    while True:
        page = _retrying(lambda token=token: api.competition_list_files(
            competition, page_token=token, page_size=200), "the file list")
        files += [(f.name, int(f.total_bytes or 0)) for f in page.files
                  if f.name.startswith(prefix)]
        token = page.next_page_token
        if not token:
            return files


def _fetch(api: Any, competition: str, name: str, work: Path, target: Path,
           force: bool) -> None:
    """One competition file into `target`, via `work` and an atomic rename."""
    if target.is_file() and not force:
        return
    _retrying(lambda: api.competition_download_file(competition, name, path=str(work),
                                                    quiet=True, force=True), name)
    fetched = work / name
    if not fetched.is_file():  # large files arrive zipped as <name>.zip
        zipped = fetched.with_name(fetched.name + ".zip")
        with zipfile.ZipFile(zipped) as archive:
            archive.extract(PurePosixPath(name).name, fetched.parent)
        zipped.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, target)


def _narrow_csvs(data_dir: Path, studies: set[str]) -> None:
    """Keep only the sample's rows, each CSV replaced whole (never half-written)."""
    study_csv = pd.read_csv(data_dir / STUDY_CSV, dtype=str)
    keep = study_csv.id.str.removesuffix("_study").isin(studies)
    _write_csv(study_csv[keep], data_dir / STUDY_CSV)
    if (data_dir / IMAGE_CSV).is_file():
        image_csv = pd.read_csv(data_dir / IMAGE_CSV, dtype=str, keep_default_na=False)
        _write_csv(image_csv[image_csv.StudyInstanceUID.isin(studies)], data_dir / IMAGE_CSV)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda file: file.write(table.to_csv(index=False).encode()))


@contextlib.contextmanager
def _kaggle_errors(competition: str) -> Iterator[None]:
    """Kaggle's HTTP errors as one line that says what to do."""
    try:
        yield
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise UserError(f"Kaggle refused access ({status}): sign in and accept the rules "
                            f"at https://www.kaggle.com/competitions/{competition}/rules, and "
                            "check your token") from None
        if status == 404:
            raise UserError(f"Kaggle has no competition or file '{competition}' (404)") from None
        raise UserError(f"Kaggle answered HTTP {status}: {error}") from None


def _retrying(call: Callable[[], T], what: str) -> T:
    """Retry network failures and server errors with exponential backoff."""
    delay, attempt = RETRY_DELAY, 1
    while True:
        try:
            return call()
        except (requests.ConnectionError, requests.Timeout) as error:
            failure = f"{type(error).__name__}"
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else 0
            if status < 500 and status != 429:
                raise  # 4xx will not change by asking again
            failure = f"HTTP {status}"
        if attempt == RETRIES:
            raise UserError(f"could not fetch {what} from Kaggle after {RETRIES} attempts "
                            f"({failure}); check your connection and rerun to resume")
        print(f"fetching {what} failed ({failure}); retrying in {delay:.0f} s")
        time.sleep(delay)
        delay, attempt = delay * 2, attempt + 1


# --- shared helpers ----------------------------------------------------------------------


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"{folder}: needs {needed / 1e9:.1f} GB free, has {free / 1e9:.1f} GB; "
                        "free space, choose another data_dir, or use -P limit=N")


def _replace(target: Path, create: Callable[[Path], object]) -> None:
    """Create `target` via a sibling temporary name, then swap it in for what was there."""
    temporary = target.with_name(f".{target.name}.new")
    _remove(temporary)
    create(temporary)
    old = target.with_name(f".{target.name}.old")
    if target.exists() or target.is_symlink():
        _remove(old)
        os.replace(target, old)
    os.replace(temporary, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _remove_dataset(data_dir: Path) -> None:
    for name in ("train", *CSV_FILES):
        _remove(data_dir / name)
