"""What the node keeps on disk, bounded for a node that runs for months.

- Results (`state_dir/results/<study>/`): deleted once a destination confirmed them (the
  archive holds them now; `Node.deliver`, and `tidy_at_start` for a crash in between). With no
  destination they are the node's only output: kept, the oldest delivered deleted first past
  `max_results_gb`.
- A failed study's spooled films and results: kept `keep_failed_days` for `action=retry`, then
  deleted, each study with a line. A film received anew meanwhile is kept (its digest differs
  from the ledger's: `Spool.delete_unchanged`).
- Folders of studies the ledger does not know (a crash between writing and recording): deleted
  at start.

Runs in the node's worker thread, the only one that writes results: nothing races it there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from covid_xray.pacs.ledger import Ledger
from covid_xray.pacs.spool import GB, Spool, file_key

DAY_S = 86400.0


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def tidy_at_start(ledger: Ledger, results: Path) -> int:
    """Delete the results of studies whose results are confirmed at a destination, or that
    the ledger does not know; the number of folders deleted."""
    owned = {file_key(study.study): study.status for study in ledger.all()}
    deleted = 0
    for folder in results.iterdir() if results.is_dir() else []:
        if owned.get(folder.name, "sent") == "sent":
            shutil.rmtree(folder, ignore_errors=True)
            deleted += 1
    return deleted


def age_out_failed(ledger: Ledger, spool: Spool, results: Path, keep_failed_days: float,
                   name: Callable[[str], str]) -> list[str]:
    """Delete the spooled films and results of studies failed more than `keep_failed_days`
    ago; a line for each."""
    lines = []
    for study, instances in ledger.failed_before(time.time() - keep_failed_days * DAY_S).items():
        deleted = set(spool.delete_unchanged({item.path: item.digest for item in instances}))
        ledger.forget(study, [item for item in instances if item.path in deleted])
        shutil.rmtree(results / file_key(study), ignore_errors=True)
        lines.append(f"study {name(study)}: failed over {keep_failed_days:g} days ago; its "
                     f"{len(deleted)} spooled films and its results deleted (keep_failed_days)")
    return lines


def bound_results(ledger: Ledger, results: Path, max_results_gb: float,
                  name: Callable[[str], str]) -> list[str]:
    """Past `max_results_gb`, delete the results kept here (no destination) of the studies
    delivered longest ago, until under it; a line for each."""
    total, lines = folder_bytes(results) if results.is_dir() else 0, []
    if total <= max_results_gb * GB:
        return lines
    for study in ledger.delivered_here():
        if total <= max_results_gb * GB:
            break
        folder = results / file_key(study)
        if folder.is_dir():
            total -= folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            lines.append(f"study {name(study)}: its results deleted, the oldest kept here past "
                         f"max_results_gb {max_results_gb:g}")
    return lines
