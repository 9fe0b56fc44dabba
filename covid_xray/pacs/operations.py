"""The operator's commands on a node's state_dir, instead of SQL by hand: where its studies
stand (`status`), and its failed studies queued again (`retry`).

Neither starts an MLflow run or takes the node's lock: both are safe while the node runs. A
retry is one ledger transaction that the running node's worker then picks up like any study.
Studies are named by their keyed pseudonyms, as in the node's log.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

from covid_xray.errors import UserError
from covid_xray.pacs.ledger import STATUSES, Ledger, Study
from covid_xray.pacs.spool import GB, file_key
from covid_xray.pseudonyms import pseudonym, pseudonym_key


def open_state(state_dir: str) -> tuple[Path, Ledger, bytes]:
    """The state_dir, its ledger and the key its pseudonyms are made with; one line when
    there is no node state there (nothing is created)."""
    state = Path(state_dir)
    if not (state / "ledger.sqlite").is_file():
        raise UserError(f"{state_dir}: no node's state here (no ledger.sqlite); give the "
                        "state_dir the node runs with")
    return state, Ledger(state / "ledger.sqlite"), pseudonym_key(state)


def status(state_dir: str) -> list[str]:
    """Studies per state, the oldest still owed work, each failed study (pseudonym, reason,
    sends tried), the bytes in the spool and the results, and the free disk."""
    state, ledger, key = open_state(state_dir)
    studies = ledger.all()
    counts = Counter(study.status for study in studies)
    lines = ["studies: " + ", ".join(f"{name} {counts.get(name, 0)}" for name in STATUSES)]
    owed = [study for study in studies if _owed(study)]
    if owed:
        oldest = min(study.complete_at or study.last_arrival for study in owed)
        lines.append(f"waiting: {len(owed)}, the oldest for {_age(time.time() - oldest)}")
    for study in sorted(studies, key=lambda item: item.last_arrival):
        if study.status == "failed":
            lines.append(f"failed {pseudonym(study.study, key)}: {study.last_error} "
                         f"({study.attempts} sends)")
    lines.append(f"spool {_bytes(state / 'spool')}, results {_bytes(state / 'results')}, "
                 f"free disk {shutil.disk_usage(state).free / GB:.2f} GB")
    return lines


def retry(state_dir: str, study: str = "") -> list[str]:
    """Queue the failed studies (or the one `study` names, by UID or pseudonym) again: sent
    again when sending failed and its results are still here, scored again when its films
    are; one line each, saying which, or why it cannot be."""
    state, ledger, key = open_state(state_dir)
    failed = [item for item in ledger.all() if item.status == "failed"]
    if study:
        failed = [item for item in failed if study in (item.study, pseudonym(item.study, key))]
        if not failed:
            raise UserError(f"no failed study {study} in {state_dir} (`status` lists them)")
    if not failed:
        return ["no failed study"]
    lines = []
    for item in failed:
        name, again = pseudonym(item.study, key), _what_again(state, ledger, item)
        if again and ledger.requeue(item.study, again):
            lines.append(f"{name}: queued to be {'sent' if again == 'scored' else 'scored'} "
                         "again")
        else:
            lines.append(f"{name}: cannot be retried: its films are no longer in the spool "
                         "(a new film of the study re-opens it)")
    return lines


def _what_again(state: Path, ledger: Ledger, study: Study) -> str:
    """The status a failed study goes back to: scored (send again) when it failed sending
    results all still here (a report not yet delivered), complete (score again) when any of
    its films is; else ""."""
    folder = state / "results" / file_key(study.study)
    results_here = bool(study.result_uids) and all(
        (folder / f"{uid}.dcm").is_file() for uid in study.result_uids)
    if results_here and study.report and study.report != study.delivered_report:
        return "scored"
    if any(instance.path and Path(instance.path).is_file()
           for instance in ledger.instances(study.study)):
        return "complete"
    return ""


def _owed(study: Study) -> bool:
    """Whether the node still owes the study work: receiving, to score, or to send."""
    return study.status in ("receiving", "complete", "scored")


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _bytes(folder: Path) -> str:
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) \
        if folder.is_dir() else 0
    return f"{total / GB:.3f} GB"
