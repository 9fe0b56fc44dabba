"""The tracking store check every entry point runs first: an HTTPS server signed by a private
CA (behind a real TLS proxy on 127.0.0.1), and a local store that cannot be written."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from covid_xray.errors import UserError
from covid_xray.tracking.mlflow_run import check_tracking_server
from tests.conftest import ROOT, clean_env

TINY = ["--model", "none", "--img-size", "32", "--epochs", "1", "--num-workers", "0",
        "--batch-size", "16", "--device", "cpu", "--dataset-size", "40",
        "--system-metrics", "false"]


def private_ca(folder: Path) -> dict[str, Path]:
    """A certificate authority of our own and a certificate it signed for 127.0.0.1."""
    def openssl(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=covid-xray test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")
    return {name: folder / f"{name}.pem" for name in ("ca", "server")} | {
        "key": folder / "server.key"}


@contextlib.contextmanager
def tls_proxy(upstream: str, certificates: dict[str, Path]) -> Iterator[str]:
    """An HTTPS front for a plain-HTTP server, as a hospital's reverse proxy would be; yields
    its https:// URL."""
    dropped = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            answer = requests.request(
                self.command, upstream + self.path, timeout=120, allow_redirects=False,
                data=self.rfile.read(length) if length else None,
                headers={k: v for k, v in self.headers.items() if k.lower() not in dropped})
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in dropped:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates["server"], certificates["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_an_https_server_with_a_private_ca_is_reached_as_mlflow_reaches_it(
        mlflow_server, demo_dataset, tmp_path, monkeypatch):
    """The probe trusts what MLflow's client trusts: without the CA it says why in one line,
    with MLFLOW_TRACKING_SERVER_CERT_PATH (or MLFLOW_TRACKING_INSECURE_TLS) it passes, and a
    training run goes through the proxy end to end."""
    certificates = private_ca(tmp_path)
    with tls_proxy(mlflow_server, certificates) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(UserError, match=rf"MLflow tracking server {url} is unreachable "
                                            r"\(TLS certificate not trusted; set "
                                            r"MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle"):
            check_tracking_server()
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        assert check_tracking_server() == url
        monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS")
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certificates["ca"]))
        assert check_tracking_server() == url
        mlflow.set_tracking_uri(None)

        trained = subprocess.run(
            [sys.executable, str(ROOT / "entrypoints" / "train.py"), "--data-dir",
             str(demo_dataset), "--cache-dir", str(tmp_path / "cache"), *TINY,
             "--experiment-name", "behind-tls", "--registered-model-name", "tls-model"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env=clean_env(MLFLOW_TRACKING_URI=url,
                          MLFLOW_TRACKING_SERVER_CERT_PATH=str(certificates["ca"])))
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("behind-tls")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name='tls-model'")] in (["1"], [1])


@pytest.mark.parametrize(("read_only", "why"), [
    ("file", "attempt to write a readonly database"),
    ("folder", "Permission denied"),
])
def test_a_store_that_cannot_be_written_is_one_line_before_any_work(demo_dataset, tmp_path,
                                                                    read_only, why):
    """A read-only mlflow.db (or folder) used to fail at the run's first write, after the data
    work, in five chained tracebacks. Root ignores file modes, so as root the command runs
    without the capability that lets it (CAP_DAC_OVERRIDE), as any other user would."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create the store
    (store / "mlflow.db").chmod(0o444)
    if read_only == "folder":
        store.chmod(0o555)
    as_any_user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs util-linux's setpriv to drop root's file-mode override")
        as_any_user = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                       "--bounding-set=-dac_override,-dac_read_search"]
    try:
        done = subprocess.run(
            [*as_any_user, sys.executable, str(ROOT / "entrypoints" / "train.py"),
             "--data-dir", str(demo_dataset), "--cache-dir", str(tmp_path / "cache"), *TINY],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env=clean_env(MLFLOW_TRACKING_URI=uri))
    finally:
        store.chmod(0o755)
        (store / "mlflow.db").chmod(0o644)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: the MLflow tracking store {store / 'mlflow.db'} cannot be written ({why}); make "
        "it and its folder writable, or point MLFLOW_TRACKING_URI at a store you can write"]
    assert not (tmp_path / "cache").exists()  # nothing was decoded
