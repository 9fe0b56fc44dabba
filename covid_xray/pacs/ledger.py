"""The node's memory: one sqlite file saying, for every study it was sent, which instances
arrived (UID, digest, spool file) and where the study stands.

A study moves receiving -> complete (quiet for study_quiet_s) -> scored (its results written
to state_dir/results, to be sent) -> sent (every result found at the destination), or kept
(no destination: the results stay in state_dir/results), or ends failed with the reason.
Each move is one transaction, so a node killed at any moment restarts from a state that is
true: a complete study is scored again, a scored one sent again, and since a result's UID is
a function of what it is about, the second copy is the same object.

A new instance (one not seen, or different bytes under a known UID) for a study already
scored, sent, kept or failed re-opens it: receiving again, scored again with all its films; the
report it last delivered becomes the next report's predecessor.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("receiving", "complete", "scored", "sent", "kept", "failed")
# The longest wait between two tries of a send: a PACS back from an outage is used within it.
MAX_WAIT_S = 600.0
# A new instance re-opens these (one arriving while its study is scored or sent is seen by
# `scored` and `delivered`, which move only a study still where they left it).
REOPENED_BY_A_FILM = ("scored", "sent", "kept", "failed")

SCHEMA = """
create table if not exists studies (
    study text primary key,        -- StudyInstanceUID (as the results name it)
    status text not null,
    last_arrival real not null,    -- time.time() of its newest instance
    complete_at real,              -- when it was found quiet (the latency clock starts)
    sent_at real,
    model_version text not null default '',
    attempts integer not null default 0,   -- failed tries (to score or send) since its last move
    next_try real not null default 0,
    failing_since real,            -- when its first failed send since it was scored failed
    failed_at real,                -- when it was failed (its spooled films age out from then)
    last_error text not null default '',
    result_uids text not null default '[]',  -- SOP Instance UIDs of its results
    report text not null default '',        -- [series UID, SOP UID] of its last report
    delivered_report text not null default ''  -- the same, of the last one confirmed sent
);
create table if not exists instances (
    study text not null,
    sop text not null,
    series text not null,
    digest text not null,          -- sha256 of the received bytes
    path text not null,            -- its spool file ('' once deleted)
    received real not null,
    primary key (study, sop)
);
create table if not exists refused (   -- films answered 0xA700: no room to keep them
    study text not null,
    sop text not null,
    reason text not null,          -- a report's reason code (no_room)
    at real not null,
    primary key (study, sop)
);
"""


@dataclass(frozen=True)
class Study:
    study: str
    status: str
    last_arrival: float
    complete_at: float | None
    model_version: str
    attempts: int
    last_error: str
    result_uids: list[str]
    report: list[str]
    delivered_report: list[str]
    failing_since: float | None = None  # its first failed send since it was scored
    sent_at: float | None = None  # when its results were delivered (or kept, with no send_to)


@dataclass(frozen=True)
class Instance:
    sop: str
    series: str
    digest: str
    path: str
    received: float


class Ledger:
    """The ledger in `state_dir/ledger.sqlite`, shared by the listener's threads and the
    worker (one connection, one lock: writes are a few rows each)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.connection.execute("pragma journal_mode=wal")
        self.connection.execute("pragma synchronous=full")  # a move survives a power cut
        self.connection.executescript(SCHEMA)
        columns = {row[1] for row in self.connection.execute("pragma table_info(studies)")}
        for column in ("failing_since", "failed_at"):  # a ledger an earlier version made
            if column not in columns:
                self.connection.execute(f"alter table studies add column {column} real")
        # ... which called a study whose results were kept here `scored`, as one to send
        self.connection.execute("update studies set status='kept' where status='scored' "
                                "and sent_at is not null")
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, whole or not at all, one thread at a time."""
        with self.lock:
            self.connection.execute("begin immediate")
            try:
                yield self.connection
                self.connection.execute("commit")
            except BaseException:
                self.connection.execute("rollback")
                raise

    def _write(self, statements: list[tuple[str, tuple]]) -> int:
        """Run `statements` as one transaction; the rows the first one changed."""
        with self._transaction() as connection:
            changed = [connection.execute(sql, values).rowcount for sql, values in statements]
        return changed[0]

    def _rows(self, sql: str, values: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.connection.execute(sql, values).fetchall()

    def known(self, study: str, sop: str, digest: str) -> bool:
        """Whether exactly these bytes were received before (a resend: nothing to do)."""
        return bool(self._rows("select 1 from instances where study=? and sop=? and digest=?",
                               (study, sop, digest)))

    def receive(self, study: str, sop: str, series: str, digest: str, path: str) -> str:
        """Record an instance written to the spool; what it did to its study: "new",
        "reopened" or ""."""
        now = time.time()
        with self._transaction() as connection:
            row = connection.execute("select status from studies where study=?",
                                     (study,)).fetchone()
            what = "new" if row is None else "reopened" if row[0] in REOPENED_BY_A_FILM else ""
            if row is None:
                connection.execute(
                    "insert into studies (study, status, last_arrival) values (?, ?, ?)",
                    (study, "receiving", now))
            else:  # (complete: the quiet period starts again; scoring will see it)
                connection.execute(
                    "update studies set status='receiving', last_arrival=?, attempts=0, "
                    "next_try=0, failing_since=null, last_error='' where study=?",
                    (now, study))
            connection.execute("insert or replace into instances values (?, ?, ?, ?, ?, ?)",
                               (study, sop, series, digest, path, now))
            connection.execute("delete from refused where study=? and sop=?", (study, sop))
        return what

    def refuse(self, study: str, sop: str, reason: str) -> None:
        """An instance the node could not keep (`reason`: no_room): its study's next report
        counts it, unless it is received after all."""
        self._write([("insert or replace into refused values (?, ?, ?, ?)",
                      (study, sop, reason, time.time()))])

    def refusals(self, study: str) -> dict[str, int]:
        """The study's films refused on arrival and never received since, by reason."""
        return dict(self._rows("select reason, count(*) from refused where study=? "
                               "group by reason", (study,)))

    def mark_complete(self, quiet_s: float) -> list[str]:
        """Studies none of whose instances arrived for `quiet_s`: complete now."""
        now = time.time()
        quiet = [study for (study,) in self._rows(
            "select study from studies where status='receiving' and last_arrival<=?",
            (now - quiet_s,))]
        # The update asks again: a film that arrived since the select keeps its study open.
        return [study for study in quiet if self._write([(
            "update studies set status='complete', complete_at=? where study=? and "
            "status='receiving' and last_arrival<=?", (now, study, now - quiet_s))])]

    def due(self) -> list[Study]:
        """Complete studies to score and scored ones to send whose next try is due, oldest
        first."""
        return [self._study(row) for row in self._rows(
            f"select {COLUMNS} from studies where status in ('complete', 'scored') and "
            "next_try<=? order by complete_at", (time.time(),))]

    def in_hand(self, study: str) -> bool:
        """Whether the node still owes `study` work: to score, or results to deliver."""
        return bool(self._rows("select 1 from studies where study=? and status in "
                               "('complete', 'scored')", (study,)))

    def get(self, study: str) -> Study | None:
        rows = self._rows(f"select {COLUMNS} from studies where study=?", (study,))
        return self._study(rows[0]) if rows else None

    def all(self) -> list[Study]:
        return [self._study(row) for row in self._rows(f"select {COLUMNS} from studies")]

    def instances(self, study: str) -> list[Instance]:
        return [Instance(*row) for row in self._rows(
            "select sop, series, digest, path, received from instances where study=? "
            "order by received", (study,))]

    def scored(self, study: str, version: str, result_uids: list[str], report: list[str]
               ) -> bool:
        """The study's results are written. False (and nothing changed) when an instance
        arrived while it was being scored: it is receiving again and will be scored whole."""
        return bool(self._write([(
            "update studies set status='scored', model_version=?, result_uids=?, report=?, "
            "attempts=0, next_try=0, failing_since=null, last_error='', sent_at=null "
            "where study=? and status='complete'",
            (version, json.dumps(result_uids), json.dumps(report), study))]))

    def send_failed(self, study: str, error: str, retry_for_s: float) -> str:
        """One more failed send: tried again after a doubling wait (1 s, 2 s, ... at most
        MAX_WAIT_S) while the first failure is less than `retry_for_s` ago, else the study is
        failed: a PACS restarting, or down for an upgrade, is waited out. Its status."""
        return self._try_later(study, "scored", error, retry_for_s)

    def score_failed(self, study: str, error: str, retry_for_s: float) -> str:
        """The model could not be had for a complete study (a registry away, no model loaded
        yet, a weight file that does not load): scored later, as a send is tried again, its
        films kept; failed past `retry_for_s`. Its status."""
        return self._try_later(study, "complete", error, retry_for_s)

    def _try_later(self, study: str, status_now: str, error: str, retry_for_s: float) -> str:
        now = time.time()
        current = self.get(study)
        tries = current.attempts + 1
        since = current.failing_since if current.failing_since is not None else now
        status = "failed" if now - since >= retry_for_s else status_now
        wait = min(2.0 ** (tries - 1), MAX_WAIT_S)
        self._write([("update studies set status=?, attempts=?, next_try=?, failing_since=?, "
                      "last_error=?, failed_at=? where study=? and status=?",
                      (status, tries, now + wait, since, error[:500],
                       now if status == "failed" else None, study, status_now))])
        return status

    def requeue(self, study: str, status: str) -> bool:
        """A failed study back to `status` (complete: scored again; scored: sent again), its
        send clock reset: the operator's retry. False when it is not failed (any more)."""
        return bool(self._write([(
            "update studies set status=?, attempts=0, next_try=0, failing_since=null, "
            "last_error='' where study=? and status='failed'", (status, study))]))

    def failed(self, study: str, error: str, forget: list[Instance] = ()) -> None:
        """The study cannot be scored (no model, say) or sent: failed, with why. `forget`:
        instances whose spool files go (the caller deletes them; one received anew meanwhile
        keeps its file)."""
        self._write([("update studies set status='failed', last_error=?, failed_at=? "
                      "where study=? and status in ('complete', 'scored')",
                      (error[:500], time.time(), study)), *self._forgetting(study, forget)])

    def delivered(self, study: str, report: list[str], instances: list[Instance],
                  final_status: str) -> None:
        """Its results are confirmed where they went (`final_status` sent) or kept here
        (kept, no destination): the report becomes the next one's predecessor, and the
        scored instances' spool files are forgotten (the caller deletes them). A study a film
        re-opened during the send stays open, and its next report names this one; an
        instance received anew meanwhile (another digest) keeps its file."""
        self._write([
            ("update studies set sent_at=?, delivered_report=? where study=?",
             (time.time(), json.dumps(report), study)),
            ("update studies set status=? where study=? and status='scored'",
             (final_status, study)),
            *self._forgetting(study, instances)])

    def failed_before(self, cutoff: float) -> dict[str, list[Instance]]:
        """Studies failed before `cutoff` (time.time()) that still have spooled films: those
        instances, by study."""
        kept: dict[str, list[Instance]] = {}
        for study, *row in self._rows(
                "select i.study, i.sop, i.series, i.digest, i.path, i.received from instances i "
                "join studies s on s.study=i.study where s.status='failed' and s.failed_at<? "
                "and i.path!=''", (cutoff,)):
            kept.setdefault(study, []).append(Instance(*row))
        return kept

    def spool_paths(self) -> set[str]:
        """Every spool file the ledger names."""
        return {path for (path,) in self._rows("select path from instances where path!=''")}

    def delivered_here(self) -> list[str]:
        """Studies whose results were kept here (no destination), delivered longest ago
        first."""
        return [study for (study,) in self._rows(
            "select study from studies where status='kept' "
            "order by sent_at")]

    def forget(self, study: str, instances: list[Instance]) -> None:
        """These instances' spool files are gone: each is forgotten unless it was received
        anew since (another digest: the new film's file is kept)."""
        if instances:
            self._write(self._forgetting(study, instances))

    @staticmethod
    def _forgetting(study: str, instances: list[Instance]) -> list[tuple[str, tuple]]:
        return [("update instances set path='' where study=? and sop=? and digest=?",
                 (study, instance.sop, instance.digest)) for instance in instances]

    def refetched(self, study: str, sop: str, path: str) -> None:
        self._write([("update instances set path=? where study=? and sop=?",
                      (path, study, sop))])

    def close(self) -> None:
        self.connection.close()

    @staticmethod
    def _study(row: tuple) -> Study:
        values = dict(zip(COLUMN_NAMES, row, strict=True))
        for name in ("result_uids", "report", "delivered_report"):
            values[name] = json.loads(values[name] or "[]")
        return Study(**values)


COLUMN_NAMES = ("study", "status", "last_arrival", "complete_at", "model_version",
                "attempts", "last_error", "result_uids", "report", "delivered_report",
                "failing_since", "sent_at")
COLUMNS = ", ".join(COLUMN_NAMES)
