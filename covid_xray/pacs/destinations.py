"""Where a study's results go, and the proof they arrived.

`dicomweb:URL`: STOW-RS, then a QIDO-RS search of the study: a 200 to the store is not proof
(some servers answer 200 and keep nothing), so results count as delivered only when the
search finds every one of them. The same server serves WADO-RS, from which a re-opened study
fetches back the films the spool no longer has, and from which `-P pull` reads a study.
`dimse:AET@HOST:PORT`: C-STORE, one association per study, every status checked.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests

from covid_xray.credentials import hide_password
from covid_xray.errors import UserError, first_line

STORED = (0x0000, 0xB000, 0xB006, 0xB007)  # success, or stored with a warning (PS3.4 B.2.3)
DIMSE_TARGET = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})")


class SendError(Exception):
    """A send that did not deliver: retried later."""


# A DICOMweb login outside the URL: `mlflow run` records every -P value as typed, a password
# in `send_to` included, so under it the login goes here.
USER_VARIABLE, PASSWORD_VARIABLE = "COVID_XRAY_DICOMWEB_USER", "COVID_XRAY_DICOMWEB_PASSWORD"


# DICOM JSON's keys for the UIDs the node reads from a search or a study's metadata
SOP_CLASS, SERIES, SOP = "00080016", "0020000E", "00080018"


def json_value(item: dict, tag: str) -> str:
    """The first value of `tag` in a DICOM JSON object (QIDO-RS, WADO-RS metadata); "" when
    it has none."""
    return str((item.get(tag, {}).get("Value") or [""])[0])


class DicomWeb:
    """A DICOMweb server (QIDO-RS, WADO-RS, STOW-RS). A user and password in the URL, or in
    $COVID_XRAY_DICOMWEB_USER and _PASSWORD, are sent as HTTP basic auth and kept out of
    everything logged (`shown`)."""

    def __init__(self, url: str):
        from dicomweb_client.api import DICOMwebClient  # the `pacs` extra

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"dicomweb:{url}: not an http(s) URL; give e.g. "
                            "dicomweb:http://127.0.0.1:8042/dicom-web")
        session = requests.Session()
        if parts.username:
            session.auth = (parts.username, parts.password or "")
        elif os.environ.get(USER_VARIABLE):
            session.auth = (os.environ[USER_VARIABLE], os.environ.get(PASSWORD_VARIABLE, ""))
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.shown = f"dicomweb:{self.url}"
        self.client = DICOMwebClient(self.url, session=session, timeout=60)
        # The ledger's backoff is the one retry (each try recorded); the client's own would
        # hold a send for half a minute without a word.
        self.client.set_http_retry_params(retry=False)

    def send(self, study: str, files: list[Path]) -> None:
        datasets = [pydicom.dcmread(path) for path in files]
        try:
            answer = self.client.store_instances(datasets, study_instance_uid=study)
        except (requests.RequestException, OSError) as error:
            raise SendError(f"STOW-RS failed: {error_line(error)}") from None
        failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
        if failed:
            raise SendError(f"STOW-RS refused {len(failed)} of {len(files)} objects")

    def missing(self, study: str, uids: list[str]) -> list[str]:
        """The results (SOP Instance UIDs) a QIDO-RS search for each does not find. One
        search per result: a search of the whole study is cut by the server's result limit
        (Orthanc with LimitFindInstances=1 answered 2 of a study's 3 instances, and its page
        at offset=2 none), while a search for one UID has at most one answer."""
        missing = []
        for uid in uids:
            try:
                found = self.client.search_for_instances(
                    study_instance_uid=study, search_filters={"SOPInstanceUID": uid},
                    fields=["SOPInstanceUID"])
            except (requests.RequestException, OSError) as error:
                raise SendError(f"QIDO-RS failed: {error_line(error)}") from None
            if uid not in {json_value(item, SOP) for item in found}:
                missing.append(uid)
        return missing

    def already_there(self, study: str, uids: list[str]) -> set[str]:
        """The results the server has already (a send before a crash, or a re-opened study's
        unchanged heatmaps): not sent again, since an archive may refuse, or keep the first
        of, an object whose UID it knows."""
        return set(uids) - set(self.missing(study, uids))

    def study_instances(self, study: str) -> list[dict]:
        """The study's instances (DICOM JSON: series, SOP, SOP class ...), by WADO-RS
        metadata, which is whole: a QIDO-RS search of the study is cut at the server's
        result limit (Orthanc's LimitFindInstances), and would leave films out of a pull."""
        return self.client.retrieve_study_metadata(study)

    def fetch(self, study: str, series: str, sop: str) -> bytes | None:
        """WADO-RS: one instance as a DICOM file, in the syntax it is stored in; None when
        the server has no such instance (404). A server that cannot answer: SendError."""
        try:
            dataset = self.client.retrieve_instance(study, series, sop,
                                                    media_types=(("application/dicom", "*"),))
        except (requests.RequestException, OSError) as error:
            response = getattr(error, "response", None)
            if response is not None and response.status_code == 404:
                return None
            raise SendError(f"WADO-RS failed: {error_line(error)}") from None
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


class Dimse:
    """A DICOM node taking C-STORE: one association per study."""

    def __init__(self, target: str, ae_title: str):
        match = DIMSE_TARGET.fullmatch(target)
        if not match:
            raise UserError(f"dimse:{target}: not AET@HOST:PORT; give e.g. "
                            "dimse:ORTHANC@127.0.0.1:4242")
        self.called, self.host = match["aet"], match["host"]
        self.port, self.ae_title = int(match["port"]), ae_title
        self.shown = f"dimse:{target}"

    def send(self, study: str, files: list[Path]) -> None:
        from pynetdicom import AE  # the `pacs` extra

        datasets = [pydicom.dcmread(path) for path in files]
        ae = AE(ae_title=self.ae_title)
        # Each object in the syntax it is stored in (heatmaps are JPEG baseline).
        for sop_class, syntax in sorted({(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
                                         for dataset in datasets}):
            ae.add_requested_context(sop_class, syntax)
        association = ae.associate(self.host, self.port, ae_title=self.called)
        if not association.is_established:
            raise SendError(f"no association with {self.shown}")
        try:
            for dataset in datasets:
                status = association.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code not in STORED:
                    raise SendError(f"C-STORE answered {'nothing' if code is None else hex(code)}")
        finally:
            association.release()

    def missing(self, study: str, uids: list[str]) -> list[str]:
        return []  # every C-STORE status was success: that is DIMSE's proof

    def already_there(self, study: str, uids: list[str]) -> set[str]:
        return set()  # (no query here: every result is sent, the archive keeps one)


def destination(send_to: str, ae_title: str) -> DicomWeb | Dimse | None:
    """The destination `send_to` names (None: results stay in state_dir)."""
    if not send_to:
        return None
    scheme, _, rest = send_to.partition(":")
    if scheme == "dicomweb":
        return DicomWeb(rest)
    if scheme == "dimse":
        return Dimse(rest, ae_title)
    raise UserError(f"send_to {hide_password(send_to)!r}: give dicomweb:URL or "
                    "dimse:AET@HOST:PORT (or nothing, to keep results in state_dir)")


def error_line(error: BaseException) -> str:
    """An error in one line, without a URL's credentials; an HTTP error as its type and
    status only, since its text quotes the URL, whose path names the study by its UID."""
    if isinstance(error, requests.RequestException):
        response = getattr(error, "response", None)
        status = f": HTTP {response.status_code}" if response is not None else ""
        return f"{type(error).__name__}{status}"
    return hide_password(f"{type(error).__name__}: {first_line(error)}")[:300]
