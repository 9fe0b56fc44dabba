"""How a film comes in, whoever brings it (the listener's C-STORE, a pull's WADO-RS): into
the spool, then the ledger, one instance at a time."""

from __future__ import annotations

import hashlib

from covid_xray.pacs.ledger import Ledger
from covid_xray.pacs.spool import Spool


def take(ledger: Ledger, spool: Spool, study: str, series: str, sop: str, data: bytes
         ) -> tuple[str, str]:
    """One received instance into the spool, then the ledger: (what it did to its study:
    "duplicate" for bytes already received, else `Ledger.receive`'s "new", "reopened" or "";
    why there was no room for it, "" when there was)."""
    digest = hashlib.sha256(data).hexdigest()
    # One instance at a time from the file to its ledger row: two associations sending one
    # SOP Instance UID with other bytes would otherwise leave one's file under the other's
    # digest.
    with spool.instance_lock(study, sop):
        if ledger.known(study, sop, digest):
            return "duplicate", ""
        kept = spool.write(study, sop, data)
        if isinstance(kept, str):
            ledger.refuse(study, sop, "no_room")  # counted in its study's report
            return "", kept
        return ledger.receive(study, sop, series, digest, str(kept)), ""
