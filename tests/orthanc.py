"""A real PACS for tests and benchmarks: Debian's Orthanc with its DICOMweb plugin, started on
free ports from a temporary JSON config (installed by .ci/run: `orthanc orthanc-dicomweb`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

REFUSED_KNOWN = "refused an instance it holds:"


def orthanc_binary() -> str:
    """Orthanc's program; outside CI a test without it skips, saying how to install it (CI
    installs it: missing there is a failure)."""
    found = shutil.which("Orthanc") or next(
        (str(path) for path in [Path("/usr/sbin/Orthanc")] if path.exists()), None)
    if found is None or not PLUGIN.exists():
        message = "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb"
        if os.environ.get("CI") or "pytest" not in sys.modules:
            raise RuntimeError(message)
        import pytest

        pytest.skip(message)
    return found


class Orthanc:
    """One Orthanc process; `stop` then `start` keeps its storage (a PACS that went away and
    came back)."""

    def __init__(self, folder: Path, http_port: int, dicom_port: int,
                 modalities: dict[str, list] | None = None):
        self.folder, self.http_port, self.dicom_port = folder, http_port, dicom_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "covid-xray-tests", "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"), "HttpPort": http_port,
            "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(self.refuse_known_uids())],
            "DicomModalities": modalities or {}}, indent=1))
        self.process: subprocess.Popen | None = None

    def refuse_known_uids(self) -> Path:
        """A strict archive, as some are: an instance whose SOP Instance UID it already holds
        is refused, and said in its log (`refused_known`). (Orthanc 1.10 still answers such
        a STOW-RS with success, so the log is how a test sees a sender send a known object.)"""
        script = self.folder / "refuse-known-uids.lua"
        script.write_text(
            "function ReceivedInstanceFilter(dicom, origin, info)\n"
            "  local known = ParseJson(RestApiPost('/tools/lookup', dicom.SOPInstanceUID))\n"
            "  if #known > 0 then\n"
            "    print('" + REFUSED_KNOWN + " ' .. dicom.SOPInstanceUID)\n"
            "    return false\n"
            "  end\n"
            "  return true\n"
            "end\n")
        return script

    def refused_known(self) -> list[str]:
        """The SOP Instance UIDs it refused because it held them already."""
        log = (self.folder / "orthanc.log").read_text(errors="replace")
        return [line.split(REFUSED_KNOWN, 1)[1].strip() for line in log.splitlines()
                if REFUSED_KNOWN in line]

    def start(self) -> Orthanc:
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen([orthanc_binary(), str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("Orthanc did not start: "
                                   + (self.folder / "orthanc.log").read_text()[-2000:])
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def upload(self, path: Path, level: str = "ParentStudy") -> str:
        """Store a file through the REST API; its study's Orthanc id (level "ID": its own)."""
        answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
        answer.raise_for_status()
        return answer.json()[level]

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        requests.put(f"{self.url}/modalities/{name}", timeout=10, json={
            "AET": ae_title, "Host": "127.0.0.1", "Port": port}).raise_for_status()

    def push(self, modality: str, resources: list[str]) -> dict:
        """C-STORE these studies (or instances) to a modality, by Orthanc's own SCU."""
        answer = requests.post(f"{self.url}/modalities/{modality}/store", timeout=120,
                               json={"Resources": resources, "Synchronous": True})
        answer.raise_for_status()
        return answer.json()

    def instances(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the study's instances (DICOM JSON) as Orthanc's DICOMweb lists them."""
        answer = requests.get(f"{self.dicomweb}/studies/{study_uid}/instances", timeout=30)
        if answer.status_code == 204 or not answer.content:
            return []
        answer.raise_for_status()
        return answer.json()

    def results(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        """WADO-RS: the study's objects of `modality` (SR, OT), read back as Orthanc has them."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb)
        found = []
        for item in self.instances(study_uid):
            if item.get("00080060", {}).get("Value", [""])[0] == modality:
                found.append(client.retrieve_instance(
                    study_uid, item["0020000E"]["Value"][0], item["00080018"]["Value"][0],
                    media_types=(("application/dicom", "*"),)))
        return found
