"""The node's DICOM side: a C-STORE SCP (and C-ECHO) for chest radiographs, on pynetdicom.

It accepts CR and DX image storage in every transfer syntax the project decodes, and rejects
other SOP classes at negotiation (logged). Callers outside the allow-list are rejected at
association. Each instance is written to the spool and recorded in the ledger before the
C-STORE is answered, so "success" means "kept": a node killed a moment later still has it.

A file whose UIDs cannot be read is refused (0xC000, counted); one that can is kept whatever
else is wrong with it, and the scoring refuses it with a reason code that the study's report
counts. A full spool answers 0xA700 (out of resources), counted, and the study's report
counts the film refused (`no_room`): whether the film comes again is the sender's (Orthanc
fails its push job).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from threading import Lock

import pydicom
from pydicom import uid as syntaxes
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)

from covid_xray.errors import UserError
from covid_xray.imaging import quiet  # noqa: F401 (its warning filters, set once)
from covid_xray.imaging.gate import REASONS
from covid_xray.model.dicom_results import as_uid
from covid_xray.pacs.intake import take
from covid_xray.pacs.ledger import Ledger
from covid_xray.pacs.spool import Spool

logger = logging.getLogger(__name__)

CHEST_STORAGE = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                 DigitalXRayImageStorageForProcessing)
# What imaging/dicom.py decodes (tests/test_dicom.py reads each): uncompressed, deflated,
# RLE, JPEG (baseline, 12-bit extended, lossless), JPEG-LS and JPEG 2000.
TRANSFER_SYNTAXES = (
    syntaxes.ExplicitVRLittleEndian, syntaxes.ImplicitVRLittleEndian,
    syntaxes.DeflatedExplicitVRLittleEndian, syntaxes.ExplicitVRBigEndian,
    syntaxes.RLELossless, syntaxes.JPEGBaseline8Bit, syntaxes.JPEGExtended12Bit,
    syntaxes.JPEGLossless, syntaxes.JPEGLosslessSV1, syntaxes.JPEGLSLossless,
    syntaxes.JPEGLSNearLossless, syntaxes.JPEG2000Lossless, syntaxes.JPEG2000)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Caller:
    ae_title: str  # "*": any
    host: str  # "*": any

    def allows(self, ae_title: str, host: str) -> bool:
        return self.ae_title in ("*", ae_title) and self.host in ("*", host)


def parse_callers(text: str) -> list[Caller]:
    """'ORTHANC@10.0.0.5, *@127.0.0.1' -> callers; one line saying what is wrong otherwise."""
    callers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        ae_title, at, host = item.rpartition("@")
        if not at or not ae_title or not host or len(ae_title) > 16:
            raise UserError(f"callers: {item!r} is not AET@HOST (an AE title of at most 16 "
                            "characters or *, at an address or *), e.g. ORTHANC@127.0.0.1")
        callers.append(Caller(ae_title, host))
    if not callers:
        raise UserError("callers is empty: name who may send, e.g. *@127.0.0.1")
    return callers


# Every count a session reports, there from the start: a session that received only
# duplicates logs its zeros too (a zero is a count; a missing metric is a question).
SESSION_COUNTS = ("associations/rejected", "instances/received", "instances/duplicate",
                  "instances/refused/unreadable", "instances/refused/out_of_resources",
                  "studies/received", "studies/reopened", "studies/scored", "studies/sent",
                  "studies/failed", "sends/failed", "films/scored", "registry/unreachable",
                  "studies/scoring_postponed",
                  *(f"films/refused/{reason}" for reason in (*REASONS, "out_of_distribution")))


class Counts:
    """The session's counters, shared by the listener's threads and the worker."""

    def __init__(self):
        self.lock = Lock()
        self.counter: Counter[str] = Counter(dict.fromkeys(SESSION_COUNTS, 0))

    def add(self, name: str, number: int = 1) -> None:
        with self.lock:
            self.counter[name] += number

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counter)


def read_uids(data: bytes) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of a received file, as the results name them."""
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=[
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    study, sop = str(header.get("StudyInstanceUID", "")), str(header.get("SOPInstanceUID", ""))
    if not study.strip() or not sop.strip():
        raise ValueError("no StudyInstanceUID or SOPInstanceUID")
    return as_uid(study), as_uid(str(header.get("SeriesInstanceUID", ""))), as_uid(sop)


class Listener:
    """The SCP; `start` listens (in pynetdicom's threads), `stop` closes."""

    def __init__(self, ae_title: str, host: str, port: int, callers: list[Caller],
                 ledger: Ledger, spool: Spool, counts: Counts,
                 name: Callable[[str], str]):
        self.ae_title, self.host, self.port, self.callers = ae_title, host, port, callers
        self.ledger, self.spool, self.counts = ledger, spool, counts
        self.name = name  # UID -> its pseudonym, for the log
        self.server = None

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = [build_context(sop_class, list(TRANSFER_SYNTAXES))
                                 for sop_class in CHEST_STORAGE] + [build_context(Verification)]
        ae.maximum_associations = 16
        handlers = [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_ACCEPTED, self.on_accepted),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_C_STORE, self.on_store)]
        try:
            self.server = ae.start_server((self.host, self.port), block=False,
                                          evt_handlers=handlers)
        except OSError as error:
            raise UserError(f"cannot listen on {self.host}:{self.port} ({error.strerror}); "
                            "choose another port or stop what holds it") from None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def on_requested(self, event: evt.Event) -> None:
        """Reject, before any negotiation, a caller the allow-list does not name."""
        ae_title = event.assoc.requestor.primitive.calling_ae_title.strip()
        host = event.assoc.requestor.address
        if not any(caller.allows(ae_title, host) for caller in self.callers):
            logger.warning("rejected an association from %s at %s: not in callers",
                           ae_title, host)
            self.counts.add("associations/rejected")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # calling AE title not recognised
            event.assoc.is_rejected = True
            event.assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        """Log, in one line, the SOP classes refused at negotiation (a PACS often proposes
        every storage class it knows; an instance of one of them cannot be sent here)."""
        refused = sorted({context.abstract_syntax for context in event.assoc.rejected_contexts}
                         - {context.abstract_syntax
                            for context in event.assoc.accepted_contexts})
        if refused:
            logger.info("association from %s: %d SOP classes refused (not CR or DX storage, "
                        "or no transfer syntax we decode): %s%s",
                        event.assoc.requestor.primitive.calling_ae_title.strip(), len(refused),
                        " ".join(refused[:5]), " ..." if len(refused) > 5 else "")

    def on_store(self, event: evt.Event) -> int:
        data = event.encoded_dataset()
        try:
            study, series, sop = read_uids(data)
        except Exception as error:
            logger.warning("refused an instance whose UIDs cannot be read (%s)",
                           type(error).__name__)
            self.counts.add("instances/refused/unreadable")
            return CANNOT_UNDERSTAND
        what, no_room = take(self.ledger, self.spool, study, series, sop, data)
        if what == "duplicate":
            self.counts.add("instances/duplicate")
            return SUCCESS
        if no_room:
            logger.warning("out of resources for instance %s: %s", self.name(sop), no_room)
            self.counts.add("instances/refused/out_of_resources")
            return OUT_OF_RESOURCES
        self.counts.add("instances/received")
        if what:
            logger.info("study %s: %s", self.name(study), what)
            self.counts.add(f"studies/{'received' if what == 'new' else 'reopened'}")
        return SUCCESS

