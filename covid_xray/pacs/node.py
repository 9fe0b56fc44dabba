"""The PACS node: studies in over C-STORE, the registered model's results out to the PACS.

    PACS --C-STORE--> listener -> spool + ledger --(quiet for study_quiet_s)--> complete
         -> scored (model resolved now; results in state_dir/results) -> sent (STOW-RS and
            found by QIDO-RS, or C-STORE statuses; with no destination: kept, the results
            staying in state_dir/results) -> the study's spooled films deleted

One worker (this thread) takes one study at a time; the listener's threads only receive.
Every step is recorded in the ledger before the next begins, so after a crash the node starts
where the ledger says each study stands (pacs/ledger.py), and a result sent twice is the same
object (its UID is derived from what it is about). A stop (Ctrl-C, SIGTERM) leaves the study
in hand where the ledger says: one being scored is scored again on restart, one being sent
sent again. One MLflow run per session records the settings and, every minute, the counts
and the latency from study-complete to results-confirmed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric

from covid_xray import lifecycle
from covid_xray.config import PACS_ACTIONS, PacsConfig
from covid_xray.credentials import hide_password
from covid_xray.errors import UserError
from covid_xray.files import atomic_write
from covid_xray.pacs import housekeeping, operations
from covid_xray.pacs.destinations import (
    SERIES,
    SOP,
    SOP_CLASS,
    DicomWeb,
    SendError,
    destination,
    error_line,
    json_value,
)
from covid_xray.pacs.intake import take
from covid_xray.pacs.ledger import Ledger, Study
from covid_xray.pacs.listener import CHEST_STORAGE, Counts, Listener, parse_callers
from covid_xray.pacs.scoring import ModelFailed, score_study
from covid_xray.pacs.spool import Spool, file_key
from covid_xray.pseudonyms import pseudonym, pseudonym_key
from covid_xray.tracking import mlflow_run, registry

logger = logging.getLogger("covid_xray.pacs")
METRICS_EVERY_S = 60.0
# MLflow's client tries a request again for minutes before it gives up (a study waited four
# while the tracking server was away): the node asks once, briefly, and goes on with what it
# has (the model in hand; its metrics again in a minute).
MLFLOW_DEADLINES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# After the registry failed to answer, the model in hand scores on without asking it again for
# this long: a tracking server that is away costs one deadline a minute, not one per study.
REGISTRY_PAUSE_S = 60.0
POLL_S = 0.2


class Node:
    def __init__(self, config: PacsConfig):
        self.config = config
        self.callers = parse_callers(config.callers)
        self.destination = destination(config.send_to, config.ae_title)
        if config.pull and not config.pull.startswith("dicomweb:"):
            raise UserError("pull: give dicomweb:URL (a WADO-RS server)")
        if config.pull and not config.study:
            raise UserError("pull needs study=<StudyInstanceUID>: the study to fetch")
        self.source = DicomWeb(config.pull.removeprefix("dicomweb:")) if config.pull else None
        self.state = state = Path(config.state_dir)
        self.held = hold(state)  # before anything here is read or written
        self.key = pseudonym_key(state)  # the log names UIDs by keyed pseudonyms only
        self.ledger = Ledger(state / "ledger.sqlite")
        self.spool = Spool(state / "spool", config.max_spool_gb, config.min_free_gb)
        self.results = state / "results"
        tidied = housekeeping.tidy_at_start(self.ledger, self.results)
        orphans = self.spool.reconcile(self.ledger.spool_paths())
        if tidied or orphans:
            logger.info("at start: %d results folders of confirmed or unknown studies and %d "
                        "spool files the ledger does not name deleted", tidied, orphans)
        self.counts = Counts()
        self.latencies: list[float] = []  # study complete -> results confirmed, seconds
        self.model_key, self.model, self.model_version = "", None, ""
        self.registry_paused_until = 0.0  # time.monotonic()
        self.started = time.monotonic()
        self.stopping = threading.Event()  # the session is ending: metrics stop too

    def name(self, uid: str) -> str:
        return pseudonym(uid, self.key)

    # -- the session -----------------------------------------------------------------------

    def run(self) -> None:
        """Listen and work until stopped (or, with `pull`, handle that one study)."""
        listener = None
        if self.source is None:  # the port first: one that is taken stops us before any run
            listener = Listener(self.config.ae_title, self.config.host, self.config.port,
                                self.callers, self.ledger, self.spool, self.counts, self.name)
            listener.start()
        model_name = registry.model_name(self.config.model_uri)
        try:
            with mlflow_run.tracked_run(self.config.experiment_name, system_metrics=True,
                                        run_name=f"pacs-{self.config.ae_title}-{model_name}"
                                        ) as run:
                self.close_previous_session(run.info.run_id)
                mlflow_run.log_params(self.settings())
                if listener is None:
                    self.pull(run.info.run_id)
                else:
                    self.serve(run.info.run_id)
        finally:
            if listener is not None:
                with lifecycle.stops_quieted():
                    listener.stop()

    def serve(self, run_id: str) -> None:
        """Work until stopped; then the session's last counts and where the ledger stands."""
        print(f"listening as {self.config.ae_title} on {self.config.host}:{self.config.port};"
              f" results to {self.destination.shown if self.destination else self.results}; "
              "Ctrl-C stops", flush=True)
        self.report_every_minute(run_id)
        try:
            self.work()
        except KeyboardInterrupt:
            print("stopping: the study in hand is left as the ledger says", flush=True)
        finally:
            self.stopping.set()
            with lifecycle.stops_quieted():
                self.log_metrics(run_id)
                print(self.summary(), flush=True)

    def report_every_minute(self, run_id: str) -> None:
        """The session's metrics every minute from a thread of their own: a tracking server
        that is away (each try up to MLflow's deadline) never holds up a study."""
        def report() -> None:
            while not self.stopping.wait(METRICS_EVERY_S):
                self.log_metrics(run_id)

        threading.Thread(target=report, name="pacs-metrics", daemon=True).start()

    def close_previous_session(self, run_id: str) -> None:
        """A session killed outright (kill -9, a power cut) could not end its run: the next
        session of this state_dir ends it KILLED, and records its own."""
        marker = self.state / "session-run"
        if marker.exists():
            for problem in lifecycle.end_if_running(
                    [marker.read_text().strip()], "KILLED",
                    {"covid_xray.ended_by": f"the next session of this node, run {run_id}"}):
                logger.warning(problem)
        atomic_write(marker, lambda file: file.write(run_id.encode()))

    def settings(self) -> dict[str, object]:
        """The options as logged: URLs without credentials, a study by its pseudonym."""
        values = {name: getattr(self.config, name) for name in PacsConfig.__dataclass_fields__}
        return values | {"send_to": hide_password(self.config.send_to),
                         "pull": hide_password(self.config.pull),
                         "study": self.name(self.config.study)}

    def work(self, only: str | None = None) -> None:
        """Score and send studies as they fall due, until stopped; with `only` (a pull),
        that study's work until the node owes it nothing (a failed send waits for its next
        try)."""
        next_minute = time.monotonic()
        while only is None or self.ledger.in_hand(only):
            if only is None and time.monotonic() >= next_minute:  # (at once, then a minute)
                self.keep_disk_bounded()
                next_minute += METRICS_EVERY_S
            for study in self.ledger.mark_complete(self.config.study_quiet_s):
                logger.info("study %s complete", self.name(study))
            for study in self.ledger.due():
                if only in (None, study.study):
                    self.handle(study)
            time.sleep(POLL_S)

    def keep_disk_bounded(self) -> None:
        """Failed studies' films and results age out; results kept here stay under their
        cap (pacs/housekeeping.py)."""
        for line in [*housekeeping.age_out_failed(self.ledger, self.spool, self.results,
                                                  self.config.keep_failed_days, self.name),
                     *housekeeping.bound_results(self.ledger, self.results,
                                                 self.config.max_results_gb, self.name)]:
            logger.info(line)

    def pull(self, run_id: str) -> None:
        """Fetch one study by WADO-RS (its chest radiographs), then score and send it."""
        study = self.config.study
        try:
            instances = [item for item in self.source.study_instances(study)
                         if json_value(item, SOP_CLASS) in CHEST_STORAGE]
            for item in instances:
                self.fetch_film(study, json_value(item, SERIES), json_value(item, SOP))
        except (SendError, requests.RequestException, OSError) as error:
            raise UserError(f"could not fetch study {self.name(study)} from "
                            f"{self.source.shown}: {error_line(error)}") from None
        if not instances:
            raise UserError(f"study {self.name(study)}: no CR or DX instance at "
                            f"{self.source.shown}")
        self.ledger.mark_complete(0)
        self.work(only=study)
        current = self.ledger.get(study)
        self.log_metrics(run_id)
        print(self.summary(), flush=True)
        if current.status == "failed":
            raise UserError(f"study {self.name(study)} failed: {current.last_error}")

    def fetch_film(self, study: str, series: str, sop: str) -> None:
        """One instance fetched by WADO-RS into the spool and the ledger (the same bytes
        again are nothing new)."""
        data = self.source.fetch(study, series, sop)
        if data is None:
            raise SendError("WADO-RS: HTTP 404 for an instance its search listed")
        _, no_room = take(self.ledger, self.spool, study, series, sop, data)
        if no_room:
            raise UserError(f"no room for the study: {no_room}")

    # -- one study -------------------------------------------------------------------------

    def handle(self, study: Study) -> None:
        """Score and send one study. Whatever goes wrong with it is its `failed` status and
        reason in the ledger, never the node's end: the other studies go on."""
        try:
            if study.status == "complete":
                self.score(study)
                study = self.ledger.get(study.study)
            if study.status == "scored":
                self.deliver(study)
        except Exception as error:
            # The type only: an error's text may quote header values (names); the ledger,
            # which stays on this machine, has it whole.
            logger.error("study %s failed (%s); the ledger says why", self.name(study.study),
                         type(error).__name__)
            logger.debug("study %s failed", self.name(study.study), exc_info=True)
            self.ledger.failed(study.study, error_line(error))
            self.counts.add("studies/failed")

    def score(self, study: Study) -> None:
        low = self.spool.low_disk()
        if low:  # its results would break the free-disk floor
            self.score_later(study, "no room for its results", low)
            return
        try:
            films, scope = self.films_of(study)
        except SendError as error:  # the destination is away: fetched back on a later try
            self.score_later(study, "its films could not be fetched back", str(error))
            return
        try:
            version, model = self.model_now()
        except Exception as error:  # none in hand: the study waits, its films kept
            self.score_later(study, "the model could not be loaded", error_line(error))
            return
        lifecycle.pause_point("pacs-scoring")
        try:
            outcome = score_study(model, study.study, films, self.spool.folder, self.results,
                                  scope, study.delivered_report,
                                  self.ledger.refusals(study.study))
        except ModelFailed as error:  # out of memory, say: not the films' fault
            self.score_later(study, "the model failed on the study's films", str(error))
            return
        self.counts.add("films/scored", outcome.scored)
        for reason, count in outcome.reasons.items():
            self.counts.add(f"films/refused/{reason}", count)
        left_out = ", ".join(f"{reason} {count}" for reason, count in outcome.reasons.items())
        if not outcome.report:  # not even a header could be read: its films leave the spool
            instances = self.ledger.instances(study.study)
            self.ledger.failed(study.study, f"no film could be scored ({left_out or 'none'})",
                               instances)
            self.spool.delete_unchanged({item.path: item.digest for item in instances})
            self.counts.add("studies/failed")
            logger.warning("study %s: no film could be scored (%s)", self.name(study.study),
                           left_out)
            return
        if self.ledger.scored(study.study, version, outcome.uids, outcome.report):
            self.counts.add("studies/scored")
            logger.info("study %s scored by version %s: %d films%s", self.name(study.study),
                        version or "(unregistered)", outcome.scored,
                        f", left out: {left_out}" if left_out else "")

    def score_later(self, study: Study, what: str, why: str) -> None:
        """`study` cannot be scored now (no model could be loaded, the network failed, its
        films could not be fetched back): it waits and is scored again, as a failed send is
        tried again; failed only past `retry_for_h`, its films kept either way (they may be
        the only copy)."""
        status = self.ledger.score_failed(study.study, f"{what}: {why}",
                                          self.config.retry_for_h * 3600)
        self.counts.add("studies/scoring_postponed")
        if status == "failed":
            self.counts.add("studies/failed")
        logger.warning("study %s: %s (%s); %s", self.name(study.study), what,
                       why.split(":")[0], "given up" if status == "failed"
                       else "it waits and is tried again")

    def films_of(self, study: Study) -> tuple[list[Path], str]:
        """The study's spooled films, and the report's scope. Films whose spool files were
        deleted after an earlier delivery are fetched back by WADO-RS from a DICOMweb
        destination; when they cannot be (a DIMSE destination; films a modality sent straight
        here, which the destination never had), the report covers the films at hand
        ("request")."""
        films, scope = [], "study"
        for instance in self.ledger.instances(study.study):
            if instance.path and Path(instance.path).exists():
                films.append(Path(instance.path))
            elif isinstance(self.destination, DicomWeb):
                data = self.destination.fetch(study.study, instance.series, instance.sop)
                if data is None:  # never there: a modality sent it straight to the node
                    scope = "request"
                    continue
                kept = self.spool.write(study.study, instance.sop, data)
                if isinstance(kept, str):
                    scope = "request"
                    continue
                self.ledger.refetched(study.study, instance.sop, str(kept))
                films.append(kept)
            else:
                scope = "request"
        return films, scope

    def model_now(self) -> tuple[str, object]:
        """The version `model_uri` names now, and its model (loaded again only when the
        version changed). When the registry cannot answer, or the new version cannot be
        loaded, the model in hand scores on, under the version it was loaded as (said in the
        log and counted): a registry away for an hour does not stop a hospital's studies.
        With none in hand, this raises and the study waits."""
        if self.model is not None and time.monotonic() < self.registry_paused_until:
            return self.model_version, self.model  # the registry failed a moment ago
        try:
            version = registry.resolve_version(self.config.model_uri)
            key = registry.version_uri(version) if version else self.config.model_uri
            if key != self.model_key:
                _, model = registry.load_resolved(key)
                model.to_device(self.config.device)
                self.model, self.model_key = model, key
                self.model_version = str(version.version) if version else ""
                logger.info("scoring with %s", key)
        except Exception as error:
            if self.model is None:
                raise
            self.counts.add("registry/unreachable")
            self.registry_paused_until = time.monotonic() + REGISTRY_PAUSE_S
            logger.warning("the model registry cannot be reached or the model loaded (%s): "
                           "scoring with the model in hand, %s; asked again in %g s",
                           type(error).__name__, self.model_key, REGISTRY_PAUSE_S)
        return self.model_version, self.model

    def deliver(self, study: Study) -> None:
        """Send the study's results and confirm them (or keep them here); then its spooled
        films go."""
        folder = self.results / file_key(study.study)
        files = [folder / f"{uid}.dcm" for uid in study.result_uids]
        # The films this scoring saw (one arriving after it re-opens the study and stays).
        covered_films = [instance for instance in self.ledger.instances(study.study)
                        if instance.received <= (study.complete_at or time.time())]
        if self.destination is not None:
            try:
                there = self.destination.already_there(study.study, study.result_uids)
                unsent = [file for uid, file in zip(study.result_uids, files, strict=True)
                          if uid not in there]
                if unsent:
                    self.destination.send(study.study, unsent)
                lifecycle.pause_point("pacs-confirming")  # (tests: killed here, sent again)
                missing = self.destination.missing(study.study, study.result_uids)
                if missing:
                    raise SendError(f"{len(missing)} of {len(files)} results not found by "
                                    "QIDO-RS after the store")
            except (SendError, OSError) as error:
                status = self.ledger.send_failed(study.study, str(error),
                                                 self.config.retry_for_h * 3600)
                self.counts.add("sends/failed")
                if status == "failed":
                    self.counts.add("studies/failed")
                logger.warning("study %s: send %d failed (%s)%s", self.name(study.study),
                               study.attempts + 1, error,
                               f"; failing for {self.config.retry_for_h:g} h: given up"
                               if status == "failed" else "; will retry")
                return
        self.ledger.delivered(study.study, study.report, covered_films,
                              "sent" if self.destination else "kept")
        self.spool.delete_unchanged({item.path: item.digest for item in covered_films})
        if self.destination is not None:  # the archive has them now
            shutil.rmtree(folder, ignore_errors=True)
            self.counts.add("studies/sent")
            self.latencies.append(time.time() - (study.complete_at or time.time()))
            logger.info("study %s: %d results delivered to %s", self.name(study.study),
                        len(files), self.destination.shown)

    # -- what the session reports ----------------------------------------------------------

    def log_metrics(self, run_id: str) -> None:
        """The session's counts and latency into its run: best-effort, since a tracking
        server that is away must not stop the node (the next minute logs them all again).
        By run id, from any thread (the active run is the main thread's)."""
        step, now = int((time.monotonic() - self.started) // 60), int(time.time() * 1000)
        values = {name.replace("/", "_"): float(count)
                  for name, count in self.counts.snapshot().items()}
        latencies = list(self.latencies)  # (appended by the worker meanwhile)
        if latencies:
            values["latency_p50_s"] = float(np.percentile(latencies, 50))
            values["latency_p95_s"] = float(np.percentile(latencies, 95))
        try:
            MlflowClient().log_batch(run_id, metrics=[
                Metric(name, value, now, step) for name, value in values.items()])
        except Exception as error:
            logger.warning("the session's metrics were not logged (%s); they are again in a "
                           "minute", type(error).__name__)

    def summary(self) -> str:
        statuses = Counter(study.status for study in self.ledger.all())
        counts = self.counts.snapshot()
        return ("ledger: " + (", ".join(f"{status} {count}" for status, count
                                        in sorted(statuses.items())) or "no study")
                + f"; this session: {counts.get('instances/received', 0)} instances received, "
                f"{counts.get('studies/scored', 0)} studies scored, "
                f"{counts.get('studies/sent', 0)} sent, {counts.get('studies/failed', 0)} failed")


def hold(state: Path) -> IO[str]:
    """This process's hold on `state` (one node per state_dir, a pull included: two would
    share a ledger and spool, and the second end the first one's run KILLED); kept while the
    returned file is open, and released by the system whenever the process ends."""
    state.mkdir(parents=True, exist_ok=True)
    held = open(state / "node.lock", "a+")  # noqa: SIM115 (open for the node's life)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        holder = held.read().strip() or "?"
        held.close()
        raise UserError(f"{state} is in use by another node (pid {holder}): one node per "
                        "state_dir; stop that one, or give this one its own state_dir (a pull "
                        "beside a running node too)") from None
    held.seek(0)
    held.truncate()
    held.write(f"{os.getpid()}\n")
    held.flush()
    return held


def run_node(config: PacsConfig) -> None:
    """The `pacs` entry point: the node (or, with `pull`, one study), logging to stderr; or
    the operator's `status` and `retry`, which print and start nothing."""
    operator = {"status": lambda: operations.status(config.state_dir),
                "retry": lambda: operations.retry(config.state_dir, config.study)}
    if config.action in operator:
        print("\n".join(operator[config.action]()))
        return
    if config.action != "serve":
        raise UserError(f"action must be one of {', '.join(PACS_ACTIONS)}, got "
                        f"{config.action!r}")
    for name, value in MLFLOW_DEADLINES.items():  # this process is the node's alone
        os.environ.setdefault(name, value)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)  # and its children's (listener)
    logger.setLevel(logging.INFO)
    mlflow_run.check_tracking_server()
    Node(config).run()
