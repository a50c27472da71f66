"""A throw-away Orthanc for the PACS tests: temporary config and storage, 127.0.0.1, free ports,
HTTP basic auth with a test user, the DICOMweb plugin and a DICOM AE that knows our AE title.

Started and stopped by its process id (never by name).  Imported by ``tests/test_pacs.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN = Path(os.environ.get("MEDRECON_ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
USER, PASSWORD = "medrecon-test", "s3cret-Pa55-for-tests"
AET, OUR_AET = "ORTHANCTEST", "MEDRECONTEST"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (str(p) if (p := Path("/usr/sbin/Orthanc")).is_file() else None)


def skip_reason() -> str | None:
    if orthanc_binary() is None:
        return "Orthanc binary not found (apt-get install orthanc orthanc-dicomweb; .ci/run does)"
    if not PLUGIN.is_file():
        return f"Orthanc DICOMweb plugin not found at {PLUGIN} (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    root: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://{AET}@127.0.0.1:{self.dicom_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment with the test credentials (what a user would export)."""
        return {"MEDRECON_PACS_USER": USER, "MEDRECON_PACS_PASSWORD": PASSWORD, "MEDRECON_PACS_AET": OUR_AET}

    def config(self) -> dict:
        store = str(self.root / "storage")
        return {
            "Name": "medrecon-test",
            "StorageDirectory": store, "IndexDirectory": store,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,  # HTTP answers 127.0.0.1 only
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": True, "DicomAet": AET, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True, "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
            "DicomModalities": {"medrecon": {"AET": OUR_AET, "Host": "127.0.0.1", "Port": free_port(),
                                             "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                             "AllowMove": True, "AllowStore": True}},
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpsVerifyPeers": True, "SaveJobs": False, "ConcurrentJobs": 1,
            "OverwriteInstances": False, "StableAge": 1, "RestApiWriteToFileSystemEnabled": False,
            "ExecuteLuaEnabled": False, "DeidentifyLogs": True,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.rest("/system")
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.root / 'orthanc.log'}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def rest(self, path: str, method: str = "GET", body: bytes | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        req.add_header("Authorization", "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def reset(self) -> None:
        """Delete every patient (between tests)."""
        for pid in self.rest("/patients"):
            self.rest(f"/patients/{pid}", method="DELETE")

    def series_in_study(self, study_uid: str) -> list[dict]:
        """[{uid, description, n_instances, instance_uids}] of a study via the REST API."""
        found = self.rest("/tools/lookup", method="POST", body=study_uid.encode())
        out = []
        for item in found:
            if item["Type"] != "Study":
                continue
            for s in self.rest(f"/studies/{item['ID']}/series"):
                inst = self.rest(f"/series/{s['ID']}/instances")
                out.append({"uid": s["MainDicomTags"]["SeriesInstanceUID"],
                            "description": s["MainDicomTags"].get("SeriesDescription", ""),
                            "n_instances": len(inst),
                            "instance_uids": sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in inst),
                            "orthanc_instances": [i["ID"] for i in inst]})
        return out
