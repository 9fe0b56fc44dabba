"""The PACS node against a real PACS: Orthanc (Debian's, with its DICOMweb plugin) pushes
studies to the node by C-STORE, the node sends its results back by STOW-RS, and the tests
read them from Orthanc's DICOMweb. The ledger and the listener are also checked in process."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import mlflow
import pandas as pd
import pydicom
import pytest
import requests
import torch
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    MRImageStorage,
    Verification,
)

from covid_xray.config import PredictConfig
from covid_xray.errors import UserError
from covid_xray.pacs.destinations import destination
from covid_xray.pacs.ledger import Ledger
from covid_xray.pacs.listener import TRANSFER_SYNTAXES, Counts, Listener, parse_callers
from covid_xray.pacs.spool import Spool, file_key
from covid_xray.pseudonyms import pseudonym, pseudonym_key
from covid_xray.serving.predict import predict_files
from tests.conftest import ROOT, clean_env, free_port
from tests.orthanc import Orthanc
from tests.test_dicom_results import dciodvfy_errors

QUIET_S = 3  # a study complete after 3 s without a film: two pushes 1 s apart are one study
pytestmark = pytest.mark.xdist_group("pacs")  # one worker: one Orthanc, one node


# -- in process: the ledger and the listener ------------------------------------------------

def test_the_ledger_moves_a_study_through_its_states_and_reopens_it(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.receive("1.2.3", "1.2.3.1", "1.2.3.9", "d1", "/spool/a") == "new"
    assert ledger.mark_complete(60) == []  # not quiet yet
    assert ledger.mark_complete(0) == ["1.2.3"]
    assert [study.status for study in ledger.due()] == ["complete"]
    assert ledger.scored("1.2.3", "4", ["9.1", "9.2"], ["9.0", "9.1"])
    assert ledger.send_failed("1.2.3", "STOW-RS failed", retry_for_s=3600) == "scored"
    assert ledger.due() == []  # waiting 1 s before the next try
    assert ledger.get("1.2.3").attempts == 1
    assert ledger.in_hand("1.2.3")  # results still to deliver
    ledger.delivered("1.2.3", ["9.0", "9.1"], ledger.instances("1.2.3"), "sent")
    study = ledger.get("1.2.3")
    assert (study.status, study.model_version, study.delivered_report) == ("sent", "4",
                                                                          ["9.0", "9.1"])
    assert ledger.instances("1.2.3")[0].path == ""  # its spool file is forgotten
    assert not ledger.in_hand("1.2.3")
    assert ledger.known("1.2.3", "1.2.3.1", "d1") and not ledger.known("1.2.3", "1.2.3.1", "d2")
    # A new film re-opens it; scoring that started before it arrived is not recorded.
    assert ledger.receive("1.2.3", "1.2.3.2", "1.2.3.9", "d3", "/spool/b") == "reopened"
    assert ledger.get("1.2.3").status == "receiving"
    assert not ledger.scored("1.2.3", "4", ["9.3"], ["9.0", "9.3"])
    # A send that keeps failing past the horizon ends failed, with its reason.
    ledger.mark_complete(0)
    assert ledger.scored("1.2.3", "5", ["9.3"], ["9.0", "9.3"])
    assert ledger.send_failed("1.2.3", "try 1", retry_for_s=0) == "failed"
    assert (ledger.get("1.2.3").status, ledger.get("1.2.3").last_error) == ("failed", "try 1")
    ledger.receive("1.2.4", "1.2.4.1", "1.2.4.9", "d4", "/spool/c")
    ledger.mark_complete(0)
    ledger.failed("1.2.4", "no film could be scored (view 1)", ledger.instances("1.2.4"))
    assert (ledger.get("1.2.4").status, ledger.instances("1.2.4")[0].path) == ("failed", "")
    # Films refused for room are counted until they are received after all.
    ledger.refuse("1.2.5", "1.2.5.1", "no_room")
    ledger.refuse("1.2.5", "1.2.5.2", "no_room")
    ledger.refuse("1.2.5", "1.2.5.2", "no_room")  # sent again, refused again: one film
    assert ledger.refusals("1.2.5") == {"no_room": 2}
    ledger.receive("1.2.5", "1.2.5.1", "1.2.5.9", "d5", "/spool/d")
    assert ledger.refusals("1.2.5") == {"no_room": 1} and ledger.refusals("1.2.3") == {}
    # Delivered with no destination: kept, owed nothing. An earlier version called it
    # `scored` (with its sent_at), as one to send: a ledger it made is read so.
    ledger.receive("1.2.6", "1.2.6.1", "1.2.6.9", "d6", "/spool/e")
    ledger.mark_complete(0)
    assert ledger.scored("1.2.6", "5", ["9.6"], ["9.0", "9.6"])
    ledger.delivered("1.2.6", ["9.0", "9.6"], ledger.instances("1.2.6"), "kept")
    assert ledger.get("1.2.6").status == "kept" and not ledger.in_hand("1.2.6")
    ledger.connection.execute("update studies set status='scored' where study='1.2.6'")
    assert Ledger(tmp_path / "ledger.sqlite").get("1.2.6").status == "kept"


def test_a_pacs_down_for_hours_is_waited_out_and_then_the_study_fails(tmp_path, monkeypatch):
    """retries=5 waited 1+2+4+8 s and failed the study for good: a 15-second PACS restart
    lost it. Now sends are tried again for retry_for (waits doubling to at most 10 min)."""
    from covid_xray.pacs import ledger as ledger_module

    clock = [1000.0]
    monkeypatch.setattr(ledger_module.time, "time", lambda: clock[0])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.receive("1.2.3", "1.2.3.1", "1.2.3.9", "d1", "/spool/a")
    ledger.mark_complete(0)
    ledger.scored("1.2.3", "4", ["9.1"], ["9.0", "9.1"])
    waits = []
    while (status := ledger.send_failed("1.2.3", "STOW-RS failed: ConnectionError",
                                        retry_for_s=24 * 3600)) == "scored":
        waits.append(ledger.due() == [])  # not due before its wait is over
        clock[0] = ledger._rows("select next_try from studies")[0][0]
        assert [study.study for study in ledger.due()] == ["1.2.3"]
    assert status == "failed" and all(waits)
    # Waits of 1, 2, ... 512 s (1,023 s in all), then 600 s each, until a try comes 24 h
    # after the first: 10 + 143 waits, the 154th try fails the study. (Before: the 5th, 15 s
    # after the first.)
    assert ledger.get("1.2.3").attempts == 154 and len(waits) == 153
    assert clock[0] - 1000.0 == 1023 + 143 * 600 >= 24 * 3600


def test_the_operator_sees_where_studies_stand_and_retries_failed_ones(tmp_path, capsys):
    """status and retry instead of an sqlite line: one line each, pseudonyms only, nothing
    started; a study failed sending goes back to be sent, one failed scoring to be scored,
    one whose films are gone says so."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs.node import run_node
    from covid_xray.pacs.operations import retry, status
    from covid_xray.pacs.spool import file_key

    a, b, c, d = (f"1.2.826.0.1.3680043.8.498.{number}" for number in (71, 72, 73, 74))
    state = tmp_path / "state"
    with pytest.raises(UserError, match=r"state: no node's state here \(no ledger.sqlite\)"):
        status(str(state))
    assert not state.exists()
    ledger = Ledger(state / "ledger.sqlite")
    film = state / "spool" / "a.dcm"
    film.parent.mkdir(parents=True)
    film.write_bytes(b"x" * 1000)
    for study, path in ((a, str(film)), (b, ""), (c, ""), (d, "")):
        ledger.receive(study, f"{study}.1", f"{study}.9", "d", path)
    ledger.mark_complete(0)
    ledger.failed(a, "the model could not be loaded: MlflowException")  # its film is here
    ledger.scored(b, "4", ["9.2"], ["9.0", "9.2"])
    (state / "results" / file_key(b)).mkdir(parents=True)
    (state / "results" / file_key(b) / "9.2.dcm").write_bytes(b"y" * 500)
    ledger.send_failed(b, "STOW-RS failed: HTTPError: HTTP 503", retry_for_s=0)
    ledger.failed(c, "no film could be scored (view 1)", ledger.instances(c))  # films gone
    key = pseudonym_key(state)
    names = {study: pseudonym(study, key) for study in (a, b, c)}

    lines = status(str(state))
    assert lines[0] == "studies: receiving 0, complete 1, scored 0, sent 0, kept 0, failed 3"
    assert lines[1].startswith("waiting: 1, the oldest for 0 min")
    assert lines[2:5] == [
        f"failed {names[a]}: the model could not be loaded: MlflowException (0 sends)",
        f"failed {names[b]}: STOW-RS failed: HTTPError: HTTP 503 (1 sends)",
        f"failed {names[c]}: no film could be scored (view 1) (0 sends)"]
    assert lines[5].startswith("spool 0.000 GB, results 0.000 GB, free disk ")
    assert "1.2.826" not in "\n".join(lines)

    with pytest.raises(UserError, match=rf"^no failed study {d} in .*state \(`status` lists"):
        retry(str(state), d)
    assert retry(str(state), names[b]) == [f"{names[b]}: queued to be sent again"]
    run_node(PacsConfig(state_dir=str(state), action="retry"))
    assert capsys.readouterr().out == (
        f"{names[a]}: queued to be scored again\n{names[c]}: cannot be retried: its "
        "films are no longer in the spool (a new film of the study re-opens it)\n")
    assert {study: ledger.get(study).status for study in (a, b, c)} == {
        a: "complete", b: "scored", c: "failed"}
    assert {study.study for study in ledger.due()} == {a, b, d}
    assert not (state / "node.lock").exists()  # status and retry take no node's place


def test_one_node_per_state_dir_and_no_uid_in_what_it_records(tmp_path, monkeypatch):
    """A second node (or a pull) on a held state_dir shared the ledger and ended the first
    one's run KILLED; now it is one line before it touches anything. A failed send's error
    quoted requests' text, whose URL names the study by its UID; the pull's study was a
    param as typed."""
    import http.server
    import threading

    from covid_xray.config import PacsConfig
    from covid_xray.pacs.destinations import DicomWeb, SendError
    from covid_xray.pacs.node import Node

    first = Node(PacsConfig(state_dir=str(tmp_path / "state")))
    ledger_bytes = (tmp_path / "state" / "ledger.sqlite").read_bytes()
    with pytest.raises(UserError, match=rf"^{tmp_path}/state is in use by another node \(pid "
                       rf"{os.getpid()}\): one node per state_dir"):
        Node(PacsConfig(state_dir=str(tmp_path / "state"), pull="dicomweb:http://127.0.0.1:1",
                        study="1.2.3"))
    assert (tmp_path / "state" / "ledger.sqlite").read_bytes() == ledger_bytes
    first.held.close()  # the first one ends: the state_dir is free
    pull = Node(PacsConfig(state_dir=str(tmp_path / "state"),
                           pull="dicomweb:http://127.0.0.1:1", study="1.2.840.77.5"))
    assert pull.settings()["study"] == pseudonym("1.2.840.77.5", pull.key)

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(503)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        web = DicomWeb(f"http://127.0.0.1:{server.server_port}/dicom-web")
        with pytest.raises(SendError) as refused:
            web.missing("1.2.840.77.5", ["9.1"])
        down = DicomWeb(f"http://127.0.0.1:{free_port()}/dicom-web")
        with pytest.raises(SendError) as unreachable:
            down.missing("1.2.840.77.5", ["9.1"])
    finally:
        server.shutdown()
    assert str(refused.value) == "QIDO-RS failed: HTTPError: HTTP 503"
    assert str(unreachable.value) == "QIDO-RS failed: ConnectionError"


def test_bad_settings_are_one_line_each():
    with pytest.raises(UserError, match="not AET@HOST"):
        parse_callers("ORTHANC")
    with pytest.raises(UserError, match="dicomweb:URL or dimse:AET@HOST:PORT"):
        destination("ftp://x", "COVIDXRAY")
    with pytest.raises(UserError, match="not AET@HOST:PORT"):
        destination("dimse:ORTHANC@host", "COVIDXRAY")
    with pytest.raises(UserError, match="not an http"):
        destination("dicomweb:127.0.0.1:8042", "COVIDXRAY")
    shown = destination("dicomweb:http://user:secret@127.0.0.1:8042/dicom-web", "X").shown
    assert shown == "dicomweb:http://127.0.0.1:8042/dicom-web"  # no password to log


@pytest.fixture(scope="module")
def films(tiny_dataset: Path) -> list[Path]:
    """The demo generator's films: the kind the session's model was trained on."""
    return sorted((tiny_dataset / "train").rglob("*.dcm"))


def test_a_study_that_breaks_the_node_is_failed_with_its_reason_and_the_node_goes_on(
        tmp_path, monkeypatch, caplog):
    """Fault injection: scoring one study raises (a defect of ours, a PACS gone while its
    films are fetched back): that study is failed, with the reason, and nothing escapes."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs import node as node_module

    node = node_module.Node(PacsConfig(state_dir=str(tmp_path / "state")))
    node.ledger.receive("1.2.3", "1.2.3.1", "1.2.3.9", "d1", str(tmp_path / "missing.dcm"))
    node.ledger.mark_complete(0)
    monkeypatch.setattr(node, "model_now", lambda: ("3", object()))

    def broken(*args, **kwargs):
        raise RuntimeError("injected: Doe^Jane")

    monkeypatch.setattr(node_module, "score_study", broken)
    (study,) = node.ledger.due()
    node.handle(study)  # does not raise
    failed = node.ledger.get("1.2.3")
    assert (failed.status, failed.last_error) == ("failed", "RuntimeError: injected: Doe^Jane")
    assert {name: count for name, count in node.counts.snapshot().items() if count} == {
        "studies/failed": 1}
    assert "RuntimeError" in caplog.text and "Doe^" not in caplog.text  # the log: no names


def test_the_node_keeps_its_disk_bounded(tmp_path, caplog):
    """Results were never deleted and a failed study's films stayed for ever. Now: results
    kept here (no send_to) stay under max_results_gb, oldest delivered first; a failed
    study's films and results go after keep_failed_days (a film written anew meanwhile is
    kept); a restart deletes the results of confirmed or unknown studies; and scoring waits
    while the disk is below its floor."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs.node import Node

    state = tmp_path / "state"
    node = Node(PacsConfig(state_dir=str(state), max_results_gb=2500e-9))  # 2,500 bytes

    def delivered_here(study: str) -> None:
        node.ledger.receive(study, f"{study}.1", f"{study}.9", "d", "")
        node.ledger.mark_complete(0)
        node.ledger.scored(study, "1", [f"{study}.7"], [f"{study}.8", f"{study}.7"])
        node.ledger.delivered(study, [f"{study}.8", f"{study}.7"], [], "kept")
        (node.results / file_key(study)).mkdir(parents=True)
        (node.results / file_key(study) / "report.dcm").write_bytes(bytes(1000))

    def failed(study: str, days_ago: float, films: int = 1) -> list[Path]:
        paths = []
        for number in range(films):
            sop, data = f"{study}.{number}", f"{study} film {number}".encode()
            paths.append(node.spool.write(study, sop, data))
            node.ledger.receive(study, sop, f"{study}.9", hashlib.sha256(data).hexdigest(),
                                str(paths[-1]))
        node.ledger.mark_complete(0)
        node.ledger.failed(study, "no film could be scored")
        with sqlite3.connect(state / "ledger.sqlite") as connection:
            connection.execute("update studies set failed_at=? where study=?",
                               (time.time() - days_ago * 86400, study))
        return paths

    for study in ("1.1", "1.2", "1.3"):
        delivered_here(study)
    old_film, new_film = failed("2.1", days_ago=15, films=2)
    recent = failed("2.2", days_ago=1)
    node.spool.write("2.1", "2.1.1", b"new pixels")  # arriving now: its ledger row is next
    caplog.set_level(logging.INFO, "covid_xray.pacs")
    node.keep_disk_bounded()
    assert [(node.results / file_key(study)).exists() for study in ("1.1", "1.2", "1.3")] == [
        False, True, True]
    assert not old_film.exists() and new_film.read_bytes() == b"new pixels"
    assert [item.path for item in node.ledger.instances("2.1")] == ["", str(new_film)]
    assert recent[0].exists()
    assert "failed over 14 days ago; its 1 spooled films and its results deleted" in caplog.text
    assert "its results deleted, the oldest kept here past max_results_gb" in caplog.text

    with sqlite3.connect(state / "ledger.sqlite") as connection:  # as if sent, confirmed,
        connection.execute("update studies set status='sent' where study='1.2'")  # then killed
    (node.results / ("0" * 32)).mkdir()  # a study the ledger never recorded
    node.held.close()
    node = Node(PacsConfig(state_dir=str(state), min_free_gb=1e9))  # and the disk is full
    assert sorted(folder.name for folder in node.results.iterdir()) == [file_key("1.3")]
    node.ledger.receive("3.1", "3.1.1", "3.1.9", "d", "")
    node.ledger.mark_complete(0)
    (study,) = node.ledger.due()
    node.handle(study)
    waiting = node.ledger.get("3.1")
    assert (waiting.status, waiting.attempts) == ("complete", 1)
    assert waiting.last_error.startswith("no room for its results: ")


def test_no_film_is_lost_to_a_race(tmp_path, caplog):
    """A film arriving between the quiet check's select and its update completed its study
    early; two associations sending one SOP Instance UID with other bytes could leave one's
    file under the other's digest; a crash between the ledger's move and the spool delete (or
    in a write) left files counted for ever. Each checked against what it must be."""
    import threading

    from covid_xray.config import PacsConfig
    from covid_xray.pacs.intake import take
    from covid_xray.pacs.node import Node

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.receive("1.1", "1.1.1", "1.1.9", "d1", "")
    time.sleep(0.05)
    select = ledger._rows

    def film_arrives_after_the_select(sql: str, values: tuple = ()) -> list[tuple]:
        rows = select(sql, values)
        if sql.startswith("select study from studies where status='receiving'"):
            ledger.receive("1.1", "1.1.2", "1.1.9", "d2", "")
        return rows

    ledger._rows = film_arrives_after_the_select
    assert ledger.mark_complete(0.01) == []
    assert ledger.get("1.1").status == "receiving"
    ledger._rows = select

    node = Node(PacsConfig(state_dir=str(tmp_path / "state")))
    first, second = b"first bytes" * 100, b"second bytes" * 100
    second_recorded, receive = threading.Event(), node.ledger.receive

    def first_recorded_last(study, sop, series, digest, path):  # the race's bad order
        if digest == hashlib.sha256(first).hexdigest():
            second_recorded.wait(timeout=1)  # (with the instance's lock held, it never comes)
        what = receive(study, sop, series, digest, path)
        second_recorded.set()
        return what

    node.ledger.receive = first_recorded_last
    senders = [threading.Thread(target=take, args=(node.ledger, node.spool, "2.1", "2.1.9",
                                                   "2.1.1", data)) for data in (first, second)]
    senders[0].start()
    wait_until(node.spool.path("2.1", "2.1.1").exists, timeout=10, what="the first file")
    senders[1].start()
    for thread in senders:
        thread.join()
    (instance,) = node.ledger.instances("2.1")
    assert hashlib.sha256(Path(instance.path).read_bytes()).hexdigest() == instance.digest

    orphan = node.spool.path("2.1", "2.1.404")
    orphan.write_bytes(b"delivered, then the node was killed before the delete")
    (orphan.parent / ".cut.dcm.x.tmp").write_bytes(b"killed mid-write")
    node.held.close()
    caplog.set_level(logging.INFO, "covid_xray.pacs")
    node = Node(PacsConfig(state_dir=str(tmp_path / "state")))
    assert sorted(path.name for path in orphan.parent.iterdir()) == [Path(instance.path).name]
    assert node.spool.size == Path(instance.path).stat().st_size
    assert "and 2 spool files the ledger does not name deleted" in caplog.text


def test_a_film_sent_anew_during_the_send_is_kept_and_the_next_report_names_this_one(
        tmp_path):
    """The PACS sends a film again with new bytes while its study's results are being sent:
    the delivery cleared and deleted it with the old ones (the same SOP, the same spool
    path), and, the study being open again, did not record the delivered report, so the next
    one named no predecessor and the PACS's resend was answered 'duplicate'."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs.intake import take
    from covid_xray.pacs.node import Node

    node = Node(PacsConfig(state_dir=str(tmp_path / "state")))
    take(node.ledger, node.spool, "4.1", "4.1.9", "4.1.1", b"first pixels")
    # A film delivered before, its spool file forgotten (path ''): the delivery raised
    # IsADirectoryError on it ('' is the working folder) after recording the study sent.
    node.ledger.receive("4.1", "4.1.2", "4.1.9", "d-earlier", "")
    node.ledger.mark_complete(0)
    node.ledger.scored("4.1", "1", ["4.1.81"], ["4.1.80", "4.1.81"])

    class ArchiveWhileTheFilmIsResent:
        shown = "dicomweb:http://archive"

        def send(self, study: str, files: list[Path]) -> None:
            take(node.ledger, node.spool, "4.1", "4.1.9", "4.1.1", b"corrected pixels")

        def missing(self, study: str, uids: list[str]) -> list[str]:
            return []

        def already_there(self, study: str, uids: list[str]) -> set[str]:
            return set()

    node.destination = ArchiveWhileTheFilmIsResent()
    node.deliver(node.ledger.get("4.1"))
    instance = next(item for item in node.ledger.instances("4.1") if item.sop == "4.1.1")
    assert Path(instance.path).read_bytes() == b"corrected pixels"
    study = node.ledger.get("4.1")
    assert (study.status, study.delivered_report) == ("receiving", ["4.1.80", "4.1.81"])
    assert take(node.ledger, node.spool, "4.1", "4.1.9", "4.1.1", b"corrected pixels") == (
        "duplicate", "")


def test_a_session_of_duplicates_only_logs_every_count_zeros_included(tmp_path, monkeypatch):
    """Zeros are counts: a session that received only duplicates logged instances_duplicate
    and nothing else, so its run could not say that nothing was scored, sent or failed."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs.node import Node

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        node = Node(PacsConfig(state_dir=str(tmp_path / "state")))
        node.counts.add("instances/duplicate", 3)
        with mlflow.start_run() as run:
            node.log_metrics(run.info.run_id)
        metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    assert metrics["instances_duplicate"] == 3.0
    for name in ("instances_received", "studies_received", "studies_scored", "studies_sent",
                 "studies_failed", "films_scored", "films_refused_view", "sends_failed"):
        assert metrics[name] == 0.0, name
    assert len(metrics) == 20 and sum(metrics.values()) == 3.0


def test_a_taken_port_is_one_line_before_any_run(tmp_path, monkeypatch):
    """The port is bound before the session's MLflow run starts: a taken one leaves no run."""
    import socket

    from covid_xray.config import PacsConfig
    from covid_xray.pacs.node import Node

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = Node(PacsConfig(port=taken.getsockname()[1], state_dir=str(tmp_path / "s")))
        try:
            with pytest.raises(UserError, match=r"cannot listen on 127\.0\.0\.1:\d+ \(Address already in use\)"):
                node.run()
            client = mlflow.MlflowClient()
            assert client.search_runs([e.experiment_id for e in client.search_experiments()]
                                      ) == []
        finally:
            mlflow.set_tracking_uri(None)


def film(source: Path, path: Path, study: str, modality: str = "CR") -> Path:
    """`source` as a film of `study` with new UIDs (from `path`'s name), a patient name for
    the log check, and `modality` (MR: an MR SOP class)."""
    dataset = pydicom.dcmread(source)
    number = sum(map(ord, path.stem))  # a UID component from the file's name
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID = f"{study}.{number}"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = \
        f"{study}.{number}.1"
    dataset.PatientID, dataset.PatientName = "patient-7", "Doe^Jane"
    if modality == "MR":
        dataset.Modality = "MR"
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    dataset.save_as(path, enforce_file_format=True)
    return path


def scu(ae_title: str, *sop_classes: str) -> AE:
    """A sender proposing each class in every syntax the node takes, one context each."""
    ae = AE(ae_title=ae_title)
    for sop_class in sop_classes:
        for syntax in TRANSFER_SYNTAXES if sop_class != Verification else [None]:
            ae.add_requested_context(sop_class, *([syntax] if syntax else []))
    return ae


def test_the_listener_rejects_strangers_other_classes_and_fills_no_disk(films, tmp_path):
    """Unknown caller: rejected at association. MR: refused at negotiation. A file whose UIDs
    cannot be read: 0xC000, counted. Past the spool's cap: 0xA700, nothing written."""
    counts, ledger = Counts(), Ledger(tmp_path / "ledger.sqlite")
    port = free_port()
    spool = Spool(tmp_path / "spool", max_gb=30e-6, min_free_gb=0)  # room for ~30 kB
    listener = Listener("COVIDXRAY", "127.0.0.1", port, parse_callers("TESTSCU@127.0.0.1"),
                        ledger, spool, counts, name=lambda uid: "p")
    listener.start()
    try:
        stranger = scu("STRANGER", Verification).associate("127.0.0.1", port,
                                                           ae_title="COVIDXRAY")
        assert stranger.is_rejected
        association = scu("TESTSCU", Verification, MRImageStorage,
                          ComputedRadiographyImageStorage).associate(
            "127.0.0.1", port, ae_title="COVIDXRAY")
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        accepted = {context.abstract_syntax for context in association.accepted_contexts}
        assert MRImageStorage not in accepted and ComputedRadiographyImageStorage in accepted
        first = pydicom.dcmread(film(films[0], tmp_path / "a.dcm", "1.2.826.0.1.3680043.8.498.1"))
        assert association.send_c_store(first).Status == 0x0000
        no_uids = pydicom.dcmread(tmp_path / "a.dcm")
        del no_uids.StudyInstanceUID
        no_uids.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        assert association.send_c_store(no_uids).Status == 0xC000
        big = pydicom.dcmread(tmp_path / "a.dcm")
        big.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
        big.PixelData = bytes(40_000)  # past the cap: refused before anything is written
        assert association.send_c_store(big).Status == 0xA700
        association.release()
    finally:
        listener.stop()
    assert [instance.sop for instance in ledger.instances("1.2.826.0.1.3680043.8.498.1")] == [
        first.SOPInstanceUID]
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1
    # The free-disk floor refuses as the cap does (no disk this small to fill in a test).
    assert "floor" in Spool(tmp_path / "other", max_gb=10, min_free_gb=1e9).no_room(1)
    assert {name: count for name, count in counts.snapshot().items() if count} == {
        "associations/rejected": 1, "instances/received": 1, "studies/received": 1,
        "instances/refused/unreadable": 1, "instances/refused/out_of_resources": 1}


# -- against Orthanc ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pacs_store(trained_store: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the session's tracking store (its registry moves @champion here without
    touching the other tests'), the model's artifacts read where they are."""
    root = tmp_path_factory.mktemp("pacs-store")
    shutil.copy(trained_store["root"] / "mlflow.db", root / "mlflow.db")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "root": root}


class Node:
    """`python -m entrypoints.pacs` as a service: started, stopped, killed."""

    def __init__(self, store: dict, state: Path, port: int, send_to: str, **options: str):
        self.store, self.state, self.port = store, state, port
        self.log = state.with_suffix(".log")
        self.command = [sys.executable, "-m", "entrypoints.pacs", "--port", str(port),
                        "--state-dir", str(state), "--study-quiet-s", str(QUIET_S),
                        "--send-to", send_to, "--experiment-name", "pacs", "--device", "cpu",
                        *(item for name, value in options.items()
                          for item in (f"--{name.replace('_', '-')}", value))]
        self.process: subprocess.Popen | None = None

    def start(self, until: str = "listening as", **env: str) -> Node:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env=clean_env(MLFLOW_TRACKING_URI=self.store["uri"], **env))
        self.wait_for(until)
        return self

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert self.process.poll() is None or text in self.log.read_text(), \
                self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {text!r}: {self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def ledger(self) -> dict[str, dict]:
        with sqlite3.connect(self.state / "ledger.sqlite") as connection:
            connection.row_factory = sqlite3.Row
            return {row["study"]: dict(row) for row in connection.execute(
                "select * from studies")}


@pytest.fixture(scope="module")
def pacs(pacs_store: dict, tmp_path_factory: pytest.TempPathFactory):
    """Orthanc, and a node it routes to (callers: Orthanc and the tests' own SCU)."""
    folder = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(folder / "orthanc", free_port(), free_port(),
                      {"node": ["COVIDXRAY", "127.0.0.1", node_port]}).start()
    node = Node(pacs_store, folder / "state", node_port, f"dicomweb:{orthanc.dicomweb}",
                callers="ORTHANC@127.0.0.1,TESTSCU@127.0.0.1")
    try:
        node.start()
        yield {"orthanc": orthanc, "node": node, "folder": folder, "store": pacs_store}
    finally:
        if node.process is not None and node.process.poll() is None:
            node.stop()
        orthanc.stop()


def wait_until(check, timeout: float = 90, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return found


def reports(orthanc: Orthanc, study: str, count: int = 1) -> list[pydicom.Dataset]:
    """The study's SRs in Orthanc, once there are `count`."""
    wait_until(lambda: sum(item.get("00080060", {}).get("Value", [""])[0] == "SR"
                           for item in orthanc.instances(study)) >= count,
               what=f"{count} report(s) of study {study}")
    return orthanc.results(study, "SR")


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def film_values(report: pydicom.Dataset) -> dict[str, dict[str, float]]:
    """Film SOP UID -> its probabilities, as the report states them."""
    document = hd.sr.srread(io.BytesIO(dicom_bytes(report)))
    values = {}
    for group in document.content.get_image_measurement_groups():
        if group.tracking_identifier.startswith("film"):
            (source,) = group.source_images
            values[source.referenced_sop_instance_uid] = {
                item.name.meaning: item.value for item in group.get_measurements()}
    return values


@pytest.mark.slow
def test_studies_pushed_by_orthanc_come_back_as_a_report_and_heatmaps_equal_to_predict(
        pacs, store, tiny_dataset, tmp_path):
    """Two studies (one of two films, pushed in two associations a second apart: one study):
    one SR each and a heatmap per film in Orthanc, dciodvfy-clean as Orthanc returns them,
    probabilities equal to `-e predict`'s on the same files."""
    orthanc, node = pacs["orthanc"], pacs["node"]
    two_films = next(path for path in sorted((tiny_dataset / "train").iterdir())
                     if len(list(path.rglob("*.dcm"))) == 2)
    one_film = next(path for path in sorted((tiny_dataset / "train").iterdir())
                    if len(list(path.rglob("*.dcm"))) == 1)
    first, second = sorted(two_films.rglob("*.dcm"))
    orthanc_ids = [orthanc.upload(path) for path in (first, second, *one_film.rglob("*.dcm"))]
    instances = {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in
                 requests_json(f"{orthanc.url}/studies/{orthanc_ids[0]}/instances")}
    orthanc.push("node", [instances[pydicom.dcmread(first).SOPInstanceUID]])
    time.sleep(1)  # a second association, a second later: the same study
    orthanc.push("node", [instances[pydicom.dcmread(second).SOPInstanceUID], orthanc_ids[2]])

    studies = [pydicom.dcmread(path).StudyInstanceUID
               for path in (first, next(one_film.rglob("*.dcm")))]
    # predict on each study's files: the node scores a study in one batch, and a batch's
    # size changes oneDNN's sums in the last bit (batch 1 vs 3: 3e-8), so this is the same run
    predicted = pd.concat([predict_files(PredictConfig(
        input=str(folder), output=str(tmp_path / f"{folder.name}.csv"), num_workers=0,
        device="cpu"), progress=False) for folder in (two_films, one_film)])
    for study in studies:
        (report,) = reports(orthanc, study)
        heatmaps = wait_until(lambda study=study: orthanc.results(study, "OT"),
                              what="heatmaps")
        films = predicted[predicted.study_instance_uid == study]
        assert len(heatmaps) == len(films) == len(film_values(report))
        for row in films.itertuples():
            stated = film_values(report)[row.sop_instance_uid]
            assert stated["Probability of negative"] == row.prob_negative  # exactly
            assert stated["Probability of opacity"] == row.prob_opacity
        for dataset in (report, *heatmaps):
            path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == []
        for heatmap in heatmaps:  # JPEG baseline: Orthanc decodes and renders it
            (found,) = requests.post(f"{orthanc.url}/tools/lookup", timeout=10,
                                     data=heatmap.SOPInstanceUID).json()
            preview = requests.get(f"{orthanc.url}/instances/{found['ID']}/preview", timeout=30)
            assert preview.status_code == 200 and preview.content[:4] == b"\x89PNG"
    ledger = node.ledger()
    assert {ledger[study]["status"] for study in studies} == {"sent"}
    champion = mlflow.MlflowClient(pacs["store"]["uri"]).get_model_version_by_alias(
        "covid-xray-densenet", "champion").version  # (1, unless a test moved it before)
    assert {ledger[study]["model_version"] for study in studies} == {str(champion)}
    # Confirmed, so the spool has let their films go, and the results are the archive's.
    assert not list((pacs["folder"] / "state" / "spool").rglob("*.dcm"))
    assert not any((pacs["folder"] / "state" / "results" / file_key(study)).exists()
                   for study in studies)
    log = node.log.read_text()
    assert "Doe^" not in log and not any(study in log for study in studies)


def requests_json(url: str):
    return requests.get(url, timeout=30).json()


@pytest.mark.slow
def test_a_late_film_reopens_its_study_and_the_new_report_names_the_first(pacs, films, tmp_path):
    orthanc, node = pacs["orthanc"], pacs["node"]
    study = "1.2.826.0.1.3680043.8.498.77001"
    first_id = orthanc.upload(film(films[0], tmp_path / "1.dcm", study))
    orthanc.push("node", [first_id])
    (earlier,) = reports(orthanc, study)
    late = film(films[1], tmp_path / "2.dcm", study)
    orthanc.upload(late)
    late_instance = [item["ID"] for item in requests_json(
        f"{orthanc.url}/studies/{first_id}/instances")
        if item["MainDicomTags"]["SOPInstanceUID"] == pydicom.dcmread(late).SOPInstanceUID]
    orthanc.push("node", late_instance)  # only the late film: the node fetches the first back
    both = reports(orthanc, study, count=2)
    (newer,) = [report for report in both if report.SOPInstanceUID != earlier.SOPInstanceUID]
    predecessor = newer.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == study
    referenced = predecessor.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == earlier.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        earlier.SOPInstanceUID
    assert len(film_values(newer)) == 2 and len(film_values(earlier)) == 1
    assert len(orthanc.results(study, "OT")) == 2  # the first film's heatmap is the same object
    path = tmp_path / "newer.dcm"
    newer.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert node.ledger()[study]["status"] == "sent"
    assert orthanc.refused_known() == []  # the unchanged heatmap was not sent again


def modality_sends(node: Node, path: Path) -> None:
    """`path` sent straight to the node, as a modality's storescu would."""
    association = scu("TESTSCU", ComputedRadiographyImageStorage).associate(
        "127.0.0.1", node.port, ae_title="COVIDXRAY")
    assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    association.release()


@pytest.mark.slow
def test_a_late_film_of_a_study_sent_straight_from_a_modality_is_reported_on_what_is_at_hand(
        pacs, films, tmp_path):
    """Films a modality sends straight to the node were never at the destination: a late
    film made the node fetch the first back by WADO-RS, get 404, and fail the study, so its
    second report never went out. Now that report covers the films at hand and says so."""
    orthanc, node = pacs["orthanc"], pacs["node"]
    study = "1.2.826.0.1.3680043.8.498.77010"
    modality_sends(node, film(films[0], tmp_path / "1.dcm", study))
    (earlier,) = reports(orthanc, study)
    wait_until(lambda: node.ledger()[study]["status"] == "sent", what="the first delivery")
    modality_sends(node, film(films[2], tmp_path / "2.dcm", study))
    both = reports(orthanc, study, count=2)
    (newer,) = [report for report in both if report.SOPInstanceUID != earlier.SOPInstanceUID]
    assert newer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    assert list(film_values(newer)) == [pydicom.dcmread(tmp_path / "2.dcm").SOPInstanceUID]
    document = hd.sr.srread(io.BytesIO(dicom_bytes(newer)))
    scope = document.content.get_image_measurement_groups()[-1].get_qualitative_evaluations()
    assert scope[1].value.value == "request"
    assert node.ledger()[study]["status"] == "sent"


@pytest.mark.slow
def test_a_corrected_film_gets_a_new_heatmap_and_a_report_naming_the_first(
        pacs, films, tmp_path):
    """A correction: the same SOP Instance UID with new pixels. Its heatmap's UID came from
    the film's UID, label and model only, so the new picture went out under the old UID, the
    archive kept the stale one, and QIDO-RS found it: 'sent'. Now it is a new object."""
    orthanc, node = pacs["orthanc"], pacs["node"]
    study = "1.2.826.0.1.3680043.8.498.77011"
    first = film(films[0], tmp_path / "first.dcm", study)
    modality_sends(node, first)
    (earlier,) = reports(orthanc, study)
    wait_until(lambda: node.ledger()[study]["status"] == "sent", what="the first delivery")
    (tmp_path / "corrected").mkdir()  # the same name: the same UIDs; another film's pixels
    corrected = pydicom.dcmread(film(films[1], tmp_path / "corrected" / "first.dcm", study))
    assert corrected.SOPInstanceUID == pydicom.dcmread(first).SOPInstanceUID
    modality_sends(node, tmp_path / "corrected" / "first.dcm")
    both = reports(orthanc, study, count=2)
    (newer,) = [report for report in both if report.SOPInstanceUID != earlier.SOPInstanceUID]
    assert list(film_values(newer)) == [corrected.SOPInstanceUID]
    assert newer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    heatmaps = orthanc.results(study, "OT")
    assert len(heatmaps) == 2 and len({image.SOPInstanceUID for image in heatmaps}) == 2
    wait_until(lambda: node.ledger()[study]["status"] == "sent", what="the second delivery")


@pytest.mark.slow
def test_a_study_with_no_scorable_film_gets_a_report_that_says_why(pacs, films, tmp_path):
    """A study none of whose films could be scored (a lateral film only), and one whose films
    name two patients, got nothing back ('failed', films deleted): the reading room could
    not tell "the model declined" from "the model never ran". Each now gets a report with no
    answer, each film with its reason, and no heatmap."""
    orthanc, node = pacs["orthanc"], pacs["node"]
    lateral_study, two_patients = ("1.2.826.0.1.3680043.8.498.77012",
                                   "1.2.826.0.1.3680043.8.498.77013")
    lateral = pydicom.dcmread(film(films[0], tmp_path / "lateral.dcm", lateral_study))
    lateral.ViewPosition = "LL"
    lateral.save_as(tmp_path / "lateral.dcm", enforce_file_format=True)
    modality_sends(node, tmp_path / "lateral.dcm")
    for number in (1, 2):
        mixed = pydicom.dcmread(film(films[number], tmp_path / f"p{number}.dcm", two_patients))
        mixed.PatientID = f"patient-{number}"
        mixed.save_as(tmp_path / f"p{number}.dcm", enforce_file_format=True)
        modality_sends(node, tmp_path / f"p{number}.dcm")
    for study, reasons in ((lateral_study, ["view"]),
                           (two_patients, ["patient_mismatch", "patient_mismatch"])):
        (report,) = reports(orthanc, study)
        groups = hd.sr.srread(io.BytesIO(dicom_bytes(report))).content \
            .get_image_measurement_groups()
        said = [group.get_qualitative_evaluations()[0] for group in groups]
        assert [(item.name.value, item.value.value) for item in said] == [
            *(("not-scored", reason) for reason in reasons), ("call", "no-answer")]
        counted = {item.name.meaning: item.value for item in groups[-1].get_measurements()}
        assert counted["Films scored (in the study's mean)"] == 0
        assert counted[f"Films refused: {reasons[0]}"] == len(reasons)
        assert not any(item.name.meaning.startswith("Probability") for item in
                       groups[-1].get_measurements())
        assert orthanc.results(study, "OT") == []
        assert dciodvfy_errors(_file(report, tmp_path)) == []
        wait_until(lambda study=study: node.ledger()[study]["status"] == "sent",
                   what="the delivery")


@pytest.mark.slow
def test_hostile_films_are_counted_and_the_rest_of_their_study_is_scored(pacs, films, tmp_path):
    """One study: a good film, one cut off mid-transfer, a lateral one and a bomb (a tiny file
    claiming 60000 x 60000 pixels), sent by the tests' SCU; and an MR pushed by Orthanc,
    refused at negotiation. The report has the good film and counts each refusal."""
    orthanc, node = pacs["orthanc"], pacs["node"]
    study = "1.2.826.0.1.3680043.8.498.77002"
    good = pydicom.dcmread(film(films[0], tmp_path / "good.dcm", study))
    broken = pydicom.dcmread(film(films[1], tmp_path / "broken.dcm", study))
    broken.PixelData = broken.PixelData[:100]  # a cut-off transfer: the header is fine
    lateral = pydicom.dcmread(film(films[2], tmp_path / "lateral.dcm", study))
    lateral.ViewPosition = "LL"
    bomb = pydicom.dcmread(film(films[3], tmp_path / "bomb.dcm", study))
    bomb.Rows = bomb.Columns = 60000
    association = scu("TESTSCU", ComputedRadiographyImageStorage).associate(
        "127.0.0.1", node.port, ae_title="COVIDXRAY")
    assert [association.send_c_store(item).Status for item in (good, broken, lateral, bomb)
            ] == [0, 0, 0, 0]
    association.release()
    mr = orthanc.upload(film(films[4], tmp_path / "mr.dcm", "1.2.826.0.1.3680043.8.498.77006",
                             modality="MR"))
    with pytest.raises(requests.HTTPError):
        orthanc.push("node", [mr])  # no presentation context for MR: Orthanc's job fails
    (report,) = reports(orthanc, study)
    assert list(film_values(report)) == [good.SOPInstanceUID]
    counted = {item.name.meaning: item.value for item in hd.sr.srread(
        _file(report, tmp_path)).content.get_image_measurement_groups()[-1].get_measurements()}
    assert counted["Films scored (in the study's mean)"] == 1
    refused = {name: value for name, value in counted.items() if name.startswith("Films refused")}
    assert refused == {"Films refused (not in the mean)": 3, "Films refused: unreadable": 2,
                       "Films refused: view": 1}
    assert "1.2.826.0.1.3680043.8.498.77006" not in node.ledger()
    assert "SOP classes refused" in node.log.read_text()


def _file(dataset: pydicom.Dataset, tmp_path: Path) -> Path:
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_moving_champion_mid_session_scores_the_next_study_with_the_new_version(
        pacs, pacs_store, films, tmp_path):
    orthanc, node = pacs["orthanc"], pacs["node"]
    mlflow.set_tracking_uri(pacs_store["uri"])  # (the registry resolves sources from here)
    try:
        client = mlflow.MlflowClient()
        first = client.get_model_version("covid-xray-densenet", "1")
        moved = client.create_model_version("covid-xray-densenet", first.source, first.run_id)
        client.set_registered_model_alias("covid-xray-densenet", "champion", moved.version)
    finally:
        mlflow.set_tracking_uri(None)
    study = "1.2.826.0.1.3680043.8.498.77003"
    orthanc.push("node", [orthanc.upload(film(films[0], tmp_path / "f.dcm", study))])
    (report,) = reports(orthanc, study)
    assert node.ledger()[study]["model_version"] == str(moved.version) == "2"
    # The report names who answered (its observer device, the algorithm's version).
    stated = {str(element.value) for element in report.iterall() if element.VR != "SQ"}
    assert "covid-xray-densenet v2" in stated


@pytest.mark.slow
def test_kill_9_and_a_pacs_that_goes_away_still_deliver_each_report_once(
        pacs_store, films, tmp_path):
    """Killed while scoring, then restarted while the PACS is down: the node retries, the PACS
    comes back, the results arrive; killed again right after a store but before the ledger
    recorded it: sent again on restart, the same objects. One SR in the end, which counts
    the study's second film, refused for room (0xA700) on the way in (it was not counted)."""
    study = "1.2.826.0.1.3680043.8.498.77004"
    first, big = film(films[0], tmp_path / "f.dcm", study), film(films[1], tmp_path / "b.dcm",
                                                                  study)
    large = pydicom.dcmread(big)
    large.Rows = large.Columns = 1024
    large.PixelData = bytes(1024 * 1024 * large.BitsAllocated // 8)
    large.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    large.save_as(big, enforce_file_format=True)
    room = first.stat().st_size + big.stat().st_size // 2  # the first film fits, not both
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                      {"node": ["COVIDXRAY", "127.0.0.1", node_port]}).start()
    login = orthanc.dicomweb.replace("//", "//nodeuser:s3cret@")  # (Orthanc ignores it)
    node = Node(pacs_store, tmp_path / "state", node_port, f"dicomweb:{login}",
                callers="ORTHANC@127.0.0.1", max_spool_gb=str(room / 1e9))
    try:
        node.start(COVID_XRAY_PAUSE_AT="pacs-scoring")
        with pytest.raises(requests.HTTPError):  # Orthanc's job fails on the refused film
            orthanc.push("node", [orthanc.upload(first, "ID"), orthanc.upload(big, "ID")])
        node.wait_for("paused at pacs-scoring")
        node.kill()
        assert node.ledger()[study]["status"] == "complete"
        orthanc.stop()
        node.start(COVID_XRAY_PAUSE_AT="pacs-confirming")
        node.wait_for("send 1 failed")
        assert node.ledger()[study]["status"] == "scored"
        orthanc.start()
        node.wait_for("paused at pacs-confirming")  # stored in Orthanc, not yet in the ledger
        node.kill()
        assert node.ledger()[study]["status"] == "scored"
        node.start()
        wait_until(lambda: node.ledger()[study]["status"] == "sent", what="sent")
        kinds = [item["00080060"]["Value"][0] for item in orthanc.instances(study)]
        assert sorted(kinds) == ["CR", "CR", "OT", "SR"]
        assert orthanc.refused_known() == []  # what Orthanc had was asked for, not resent
        (report,) = orthanc.results(study, "SR")
        counted = {item.name.meaning: item.value for item in hd.sr.srread(_file(
            report, tmp_path)).content.get_image_measurement_groups()[-1].get_measurements()}
        assert (counted["Films scored (in the study's mean)"],
                counted["Films refused: no_room"]) == (1, 1)
        assert node.ledger()[study]["attempts"] >= 1
        assert node.stop() == 0  # SIGTERM: a clean stop
    finally:
        if node.process.poll() is None:
            node.kill()
        orthanc.stop()
    # Its last session, stopped by SIGTERM: FINISHED, with the settings (no login) and what it
    # did (it sent the study the killed sessions had received and scored); each killed
    # session's run ended KILLED by the session after it.
    client = mlflow.MlflowClient(pacs_store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("pacs").experiment_id],
                              f"params.port = '{node_port}'", order_by=["start_time DESC"])
    assert [run.info.status for run in runs] == ["FINISHED", "KILLED", "KILLED"]
    last = runs[0]
    assert last.info.run_name == "pacs-COVIDXRAY-covid-xray-densenet"
    assert last.data.params["send_to"] == f"dicomweb:{login.replace('s3cret', '***')}"
    assert last.data.params["callers"] == "ORTHANC@127.0.0.1"
    assert "s3cret" not in node.log.read_text()
    metrics = last.data.metrics
    assert (metrics["studies_sent"], metrics.get("studies_scored", 0)) == (1, 0)
    assert 0 < metrics["latency_p50_s"] <= metrics["latency_p95_s"]


@pytest.mark.slow
def test_pull_fetches_one_study_by_wado_rs_scores_and_sends_it(pacs_store, films, tmp_path):
    """`mlflow run . -e pacs -P pull=dicomweb:URL -P study=UID`, end to end, the results sent
    back by C-STORE (`send_to=dimse:...`): its chest film scored, the MR left alone."""
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    study = "1.2.826.0.1.3680043.8.498.77005"
    try:
        orthanc.upload(film(films[0], tmp_path / "f.dcm", study))
        orthanc.upload(film(films[1], tmp_path / "mr.dcm", study, modality="MR"))
        done = subprocess.run(
            [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "pacs",
             "--env-manager", "local", "--experiment-name", "covid-xray",  # as docs/pacs.md
             "-P", f"pull=dicomweb:{orthanc.dicomweb}", "-P", f"study={study}",
             "-P", f"send_to=dimse:ORTHANC@127.0.0.1:{orthanc.dicom_port}",
             "-P", f"state_dir={tmp_path / 's'}",
             "-P", "device=cpu"],
            cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=pacs_store["uri"]),
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        kinds = sorted(item["00080060"]["Value"][0] for item in orthanc.instances(study))
        assert kinds == ["CR", "MR", "OT", "SR"]
        assert "sent 1" in done.stdout + done.stderr
        client = mlflow.MlflowClient(pacs_store["uri"])
        (session,) = client.search_runs(
            [client.get_experiment_by_name("covid-xray").experiment_id],
            "attributes.run_name LIKE 'pacs-%'")
        assert (session.data.metrics["studies_sent"], session.data.metrics["studies_failed"],
                session.data.metrics["instances_duplicate"]) == (1.0, 0.0, 0.0)
        # No send_to: the results stay in state_dir, and the pull ends (it looped before).
        kept = subprocess.run(
            [sys.executable, "-m", "entrypoints.pacs", "--pull", f"dicomweb:{orthanc.dicomweb}",
             "--study", study, "--state-dir", str(tmp_path / "kept"), "--device", "cpu",
             "--experiment-name", "pacs-pull"], cwd=ROOT, timeout=120,
            env=clean_env(MLFLOW_TRACKING_URI=pacs_store["uri"]), capture_output=True, text=True)
        assert kept.returncode == 0, kept.stderr[-3000:]
        results = list((tmp_path / "kept" / "results").rglob("*.dcm"))
        assert sorted(pydicom.dcmread(path).Modality for path in results) == ["OT", "SR"]
    finally:
        orthanc.stop()


def test_a_spooled_film_is_on_disk_before_the_store_is_answered(tmp_path, monkeypatch):
    """The spool wrote by rename without fsync, and C-STORE success was answered after it: a
    power cut could leave the ledger (synchronous=full) pointing at an empty file the PACS
    will not send again. The film's bytes and its folder's entry are now fsynced first."""
    synced: list[int] = []  # inodes handed to fsync, calling the real one
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.fstat(descriptor).st_ino)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = Spool(tmp_path / "spool", max_gb=1, min_free_gb=0)
    path = spool.write("1.2.3", "1.2.3.4", b"DICM film bytes")
    assert path.read_bytes() == b"DICM film bytes"
    assert synced == [path.stat().st_ino, path.parent.stat().st_ino]


@pytest.mark.slow
def test_a_registry_that_goes_away_leaves_the_model_in_hand_scoring(
        pacs_store, films, tmp_path, monkeypatch, caplog):
    """A real tracking server stopped mid-session: the registry's error was read as "no
    version", the node reloaded by alias, failed, and failed the study (after minutes of
    MLflow's own retries); the report named "unregistered". Now the model in hand scores on
    under the version it was loaded as, within the node's deadlines; a node with no model yet
    keeps the study (and its film) to score later, never failing or deleting it. So does a
    network that fails on a study's films (out of memory)."""
    from covid_xray.config import PacsConfig
    from covid_xray.pacs import node as node_module
    from tests.conftest import serving

    for name, value in node_module.MLFLOW_DEADLINES.items():  # as run_node sets them
        monkeypatch.setenv(name, value)
    shutil.copy(pacs_store["root"] / "mlflow.db", tmp_path / "mlflow.db")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
               str(port), "--workers", "1"]

    def arrives(node: node_module.Node, study: str) -> None:
        sop = f"{study}.1"
        node.ledger.receive(study, sop, f"{study}.9", "d", str(node.spool.write(
            study, sop, films[0].read_bytes())))
        node.ledger.mark_complete(0)
        (due,) = [item for item in node.ledger.due() if item.study == study]
        node.handle(due)

    with serving(command, f"http://127.0.0.1:{port}", "/health", tmp_path / "server.log",
                 cwd=tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        champion = mlflow.MlflowClient(url).get_model_version_by_alias(
            "covid-xray-densenet", "champion").version  # (another test of the module moves it)
        node = node_module.Node(PacsConfig(state_dir=str(tmp_path / "a"), device="cpu"))
        arrives(node, "1.2.840.1")
        assert (node.ledger.get("1.2.840.1").status,
                node.ledger.get("1.2.840.1").model_version) == ("kept", champion)
    try:  # the server is stopped
        started = time.monotonic()
        arrives(node, "1.2.840.2")
        assert time.monotonic() - started < 30
        second = node.ledger.get("1.2.840.2")
        assert (second.status, second.model_version) == ("kept", champion)
        assert node.counts.snapshot()["registry/unreachable"] == 1
        assert ("scoring with the model in hand, models:/covid-xray-densenet/"
                f"{champion}") in caplog.text
        fresh = node_module.Node(PacsConfig(state_dir=str(tmp_path / "b"), device="cpu"))
        arrives(fresh, "1.2.840.3")
        waiting = fresh.ledger.get("1.2.840.3")
        assert (waiting.status, waiting.attempts) == ("complete", 1)
        assert waiting.last_error.startswith("the model could not be loaded: UserError: the "
                                             "model registry cannot resolve")
        assert fresh.ledger.due() == []  # tried again after its wait, not at once
        assert Path(fresh.ledger.instances("1.2.840.3")[0].path).is_file()

        def out_of_memory(batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        # The network itself fails: the study waits and is scored again, its film kept (it
        # was failed as "no film could be scored (model_error 1)" and its film deleted).
        with monkeypatch.context() as patched:
            patched.setattr(node.model, "forward_with_features", out_of_memory)
            arrives(node, "1.2.840.4")
        broken = node.ledger.get("1.2.840.4")
        assert (broken.status, broken.attempts, broken.last_error) == (
            "complete", 1, "the model failed on the study's films: OutOfMemoryError")
        assert Path(node.ledger.instances("1.2.840.4")[0].path).is_file()
        assert not (node.results / file_key("1.2.840.4")).exists()  # nothing half-made
        counts = node.counts.snapshot()
        assert counts["studies/scoring_postponed"] == 1 and "films/refused/model_error" not in counts
        # ... with the model in hand, the registry not asked again for a minute (no storm)
        assert counts["registry/unreachable"] == 1 and "asked again in 60 s" in caplog.text
        # The model recovers (the patch is gone): the study's next try scores it.
        time.sleep(1.1)  # its first wait: 1 s
        (due,) = node.ledger.due()
        node.handle(due)
        assert node.ledger.get("1.2.840.4").status == "kept"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_confirmation_finds_every_result_past_the_archives_search_limit(films, tmp_path):
    """QIDO-RS confirmation read the study's search answer, which an archive cuts at its
    result limit (Orthanc's LimitFindInstances): a result stored but past the limit counted as
    missing, and the study's sends failed until it was failed. Each result is now searched
    for by its own UID. A pull lists a study's films by WADO-RS metadata, not cut either."""
    import json

    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    config = json.loads(orthanc.config.read_text())
    orthanc.config.write_text(json.dumps(config | {"LimitFindInstances": 1}))
    study = "1.2.826.0.1.3680043.8.498.77009"
    orthanc.start()
    try:
        uids = []
        for index, source in enumerate(films[:3]):
            stored = film(source, tmp_path / f"f{index}.dcm", study)
            orthanc.upload(stored)
            uids.append(pydicom.dcmread(stored).SOPInstanceUID)
        web = destination(f"dicomweb:{orthanc.dicomweb}", "COVIDXRAY")
        assert len(web.client.search_for_instances(study_instance_uid=study)) < 3  # the cut
        assert web.missing(study, uids) == []
        assert web.missing(study, [*uids, f"{study}.404"]) == [f"{study}.404"]
        # ... and a pull lists the whole study (its QIDO search listed 1 of 3 films)
        assert sorted(item["00080018"]["Value"][0] for item in web.study_instances(study)) == \
            sorted(uids)
    finally:
        orthanc.stop()
