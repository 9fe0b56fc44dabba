"""Shared fixtures: tiny SIIM-layout datasets and the real reference files the tests carry.

Nothing here reads outside the repository (tests/data/README.md says where each file comes
from); `.ci/run` proves it by running the suite from a copy with no sibling folders.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from covid_xray.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
# `pytest -m "not slow"` is the quick check while editing: a test is slow when it trains a
# model, starts a server or a database, or runs an entry point in a new interpreter (those
# are marked by hand, @pytest.mark.slow), and every test using one of these fixtures is.
SLOW_FIXTURES = {"demo_dataset", "trained_store", "store", "mlflow_server", "team_server",
                 "postgres"}


# The suite runs on both cores (pytest-xdist, pyproject.toml): tests that start a PostgreSQL
# server share one worker, so one server is started per run, not one per worker.
SHARED_SERVER_FIXTURES = {"postgres", "team_server"}


def pytest_configure(config: pytest.Config) -> None:
    """One pseudonym key for the whole suite (and every process it starts), as a team sets
    COVID_XRAY_PSEUDONYM_KEY: a model trained with one cache folder is evaluated with
    another, and patients match only under the key they were named with (tests of the key
    itself unset it). Under pytest-xdist, each worker (and every process it starts) uses one
    thread for torch and OpenCV: two workers on two cores, not four threads fighting."""
    os.environ.setdefault("COVID_XRAY_PSEUDONYM_KEY", "covid-xray test suite key " + "0" * 40)
    # A test that unsets that variable gets a key file in the user's config folder: here a
    # folder of the run's own, never the user's ~/.config.
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="covid-xray-config-")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if SHARED_SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.xdist_group("postgres"))
    # The longest tests first (each builds a whole environment with torch), so that neither
    # worker is left running one of them alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """In each xdist worker: a test marked xdist_group must carry its group in its node id,
    which is how xdist keeps a group on one worker. pytest 9.2 ignores xdist's write
    (pytest-xdist #1386) and the groups silently fall apart: stop instead."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group is not applied ({lost[0]} has no @group): "
                                "pytest-xdist #1386; install pytest < 9.2 (pyproject.toml)")


@pytest.fixture(autouse=True)
def no_experiment_carried_over() -> Iterator[None]:
    """mlflow.set_experiment (every run this process starts) leaves its experiment id in
    MLflow's module state and in MLFLOW_EXPERIMENT_ID: forget it after each test, so that a
    test's runs land where it says whichever tests ran before it in this worker."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


TEST_DATA = ROOT / "tests" / "data"
REAL_DICOM = TEST_DATA / "siim-acr-sample-cr-jpeg-baseline.dcm"
# The real SIIM label file may not be redistributed (tests/data/README.md): the one test that
# needs it reads the user's own copy, named by this variable, and checks it is the real one.
REAL_LABELS_VARIABLE = "COVID_XRAY_SIIM_LABELS"
REAL_LABELS_SHA256 = "8ea7cad42f16ee7c666ca35b0b1e4af7a12cfbc43d56365fa3fb83437ec26f64"


@pytest.fixture(scope="session")
def real_study_csv() -> Path:
    """The user's copy of SIIM's train_study_level.csv; skips (saying how to run it) when none
    is given, fails when the file given is not the published one."""
    import hashlib

    value = os.environ.get(REAL_LABELS_VARIABLE, "")
    if not value:
        pytest.skip(f"the real SIIM label file cannot be shipped (Kaggle competition data); set "
                    f"{REAL_LABELS_VARIABLE}=path/to/train_study_level.csv to run this test")
    path = Path(value)
    assert path.is_file(), f"{REAL_LABELS_VARIABLE}={value}: no such file"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == REAL_LABELS_SHA256, f"{path} is not SIIM's published label file ({digest})"
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 studies of 48 px films, 4 of them with two images; read-only by convention."""
    data_dir = tmp_path_factory.mktemp("siim") / "data"
    return synthetic.make_dataset(data_dir, num_studies=48, image_size=48,
                                  multi_image_studies=4, seed=7, progress=False)


def clean_env(**overrides: str) -> dict[str, str]:
    """A user's shell with this venv activated: this environment without MLflow run state (an
    in-process run leaves MLFLOW_EXPERIMENT_ID behind), plus `overrides`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | overrides


def uv_sources_like_pip() -> dict[str, str]:
    """uv reads no pip configuration: give it the package sources pip has (on these machines
    torch 2.14.1 lies in a local index), and pip's rule of the best version across them."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True).stdout
    pip = {key.split(".", 1)[1]: value.strip("'") for key, _, value in
           (line.partition("=") for line in listing.splitlines()) if key.startswith("global.")}
    names = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_EXTRA_INDEX_URL",
             "find-links": "UV_FIND_LINKS"}
    return {names[key]: value for key, value in pip.items() if key in names} | {
        "UV_INDEX_STRATEGY": "unsafe-best-match"}


def no_internet() -> dict[str, str]:
    """Environment that makes every download fail at once, as it does on these machines,
    whether or not the machine running the tests has internet: all traffic to other hosts goes
    through a proxy on a closed local port (requests and urllib both honour these)."""
    proxy = f"http://127.0.0.1:{free_port()}"
    return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy,
            "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def empty_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite tracking store, created and migrated once per session (migrating a new
    store takes seconds, and dozens of tests each need a fresh one)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_store(empty_store_template: Path, tmp_path: Path) -> str:
    """A fresh, empty sqlite tracking store in this test's folder (tmp_path/mlflow.db, where
    a command run there would create it): a copy of the migrated template, its Default
    experiment's artifacts placed where a store created in tmp_path would place them."""
    import shutil
    import sqlite3

    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store_template, path)
    with contextlib.closing(sqlite3.connect(path)) as database, database:
        database.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                         (str(tmp_path / "mlruns" / "0"),))
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serving(command, f"http://127.0.0.1:{port}", "/health", root / "server.log",
                 cwd=root) as url:
        yield url


@contextlib.contextmanager
def serving(command: list[str], url: str, probe: str, log_path: Path,
            **popen: object) -> Iterator[str]:
    """Run a server process until `url + probe` answers 200; yield `url`; stop it after."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"{command[0]} did not start: {log_path.read_text()}")
            time.sleep(0.5)
        try:
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough synthetic studies for a model to learn something in a few CPU epochs."""
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    return synthetic.make_dataset(data_dir, num_studies=200, image_size=64,
                                  multi_image_studies=2, seed=11, progress=False)


@pytest.fixture(scope="session")
def trained_store(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sqlite tracking store holding one small trained model, registered as
    `covid-xray-densenet` version 1 in Production with alias champion; it applies flip
    test-time augmentation, so predict and serve are seen to apply it too."""
    import mlflow

    from covid_xray.config import TrainConfig
    from covid_xray.training.run import run_training

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        outcome = run_training(TrainConfig(
            data_dir=str(demo_dataset), cache_dir=str(root / "cache"), model="none",
            img_size=32, epochs=3, batch_size=16, num_workers=0, device="cpu",
            stage="Production", alias="champion", tta="flip"), progress=False)
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "root": root, "outcome": outcome, "name": "covid-xray-densenet"}


@pytest.fixture
def store(trained_store: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """`trained_store` as this test's tracking store (env, working dir, mlflow client)."""
    import mlflow

    monkeypatch.chdir(trained_store["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_store["uri"])
    mlflow.set_tracking_uri(trained_store["uri"])
    yield trained_store
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql, installed by .ci/run);
    yields a URL without password (trust authentication) to an empty database `optuna`."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        message = "PostgreSQL server binaries not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing server there is a real failure
        pytest.skip(message)
    bin_dir = Path(found[-1]).parent
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="covid-xray-postgres-"))
    # initdb refuses to run as root: run the server as Debian's postgres user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust",
                    "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l",
                    str(data / "server.log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*as_user, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "optuna"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# Secrets the team-server tests hunt for in everything logged; made up per session.
TEAM_SECRETS = {name: f"{name}-{os.urandom(6).hex()}" for name in ("alice", "admin", "database")}


@pytest.fixture(scope="session")
def team_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The README's team setup, started for real by deploy/team-server.sh: MLflow on 127.0.0.1
    with a PostgreSQL backend store (database `mlflow`, beside the Optuna database `optuna` in
    the same PostgreSQL), proxied artifacts and basic-auth logins, plus a user `alice`."""
    host_port = postgres.split("@", 1)[1].split("/", 1)[0]
    for database in ("mlflow", "mlflow_auth"):
        subprocess.run(["createdb", "-h", "127.0.0.1", "-p", host_port.split(":")[1],
                        "-U", "postgres", database], check=True, capture_output=True,
                       env={**os.environ, "PATH": os.environ["PATH"] + ":" + str(
                           sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])})
    root = tmp_path_factory.mktemp("team-server")
    port = free_port()
    env = clean_env(
        MLFLOW_BACKEND_URI=f"postgresql+psycopg://postgres@{host_port}/mlflow",
        MLFLOW_AUTH_DB_URI=f"postgresql+psycopg://postgres@{host_port}/mlflow_auth",
        MLFLOW_ARTIFACTS=str(root / "artifacts"), MLFLOW_AUTH_ADMIN_PASSWORD=TEAM_SECRETS["admin"],
        PGPASSWORD=TEAM_SECRETS["database"], PORT=str(port), WORKERS="1")
    url = f"http://127.0.0.1:{port}"
    with serving(["bash", str(ROOT / "deploy" / "team-server.sh")], url, "/health",
                 root / "server.log", env=env, cwd=root):
        created = requests.post(f"{url}/api/2.0/mlflow/users/create", timeout=30,
                                json={"username": "alice", "password": TEAM_SECRETS["alice"]},
                                auth=("admin", TEAM_SECRETS["admin"]))
        assert created.status_code == 200, created.text
        yield {"url": url, "log": root / "server.log", "postgres": postgres,
               "optuna_url": f"postgresql://postgres:{TEAM_SECRETS['database']}@{host_port}/optuna"}
