"""A real Orthanc with its DICOMweb plugin on loopback, for the DICOMweb and viewer tests.

Debian's ``orthanc`` and ``orthanc-dicomweb`` (``make test`` installs them where it can):
started here with a configuration of our own (free HTTP port, a temporary storage folder, no
DICOM listener, no remote access), waited for, and stopped by its PID. Optional folders are
served under ``ServeFolders`` (the viewer page). Tests call ``skip_reason()`` first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Where Debian installs the server and its plugins.
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
SERVE_FOLDERS_PLUGIN = PLUGINS / "libServeFolders.so"
START_TIMEOUT_S = 30


def skip_reason(*, serve_folders: bool = False) -> str | None:
    """Why an Orthanc test cannot run here (None when it can)."""
    if not os.access(ORTHANC, os.X_OK):
        return "Orthanc not installed (Debian package orthanc; make test installs it)"
    if not DICOMWEB_PLUGIN.exists():
        return "Orthanc's DICOMweb plugin not installed (Debian package orthanc-dicomweb)"
    if serve_folders and not SERVE_FOLDERS_PLUGIN.exists():
        return "Orthanc's ServeFolders plugin not installed (Debian package orthanc)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningOrthanc:
    http_port: int
    pid: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"


@contextmanager
def orthanc(
    workdir: Path,
    serve: Mapping[str, Path] | None = None,
    extra: Mapping[str, object] | None = None,
) -> Iterator[RunningOrthanc]:
    """Start Orthanc on a free loopback port with storage under ``workdir``; stop it by PID.

    ``serve``: URL path -> folder, served by the ServeFolders plugin (same origin as the
    DICOMweb API, so a page needs no CORS); ``extra``: more configuration (HTTPS).
    """
    workdir = Path(workdir)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "marrowdx-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # it binds every interface; answer loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [str(PLUGINS)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "ServeFolders": {"Folders": {k: str(v) for k, v in (serve or {}).items()}},
        "MaximumStorageCacheSize": 0,
        "StableAge": 1,
        **(extra or {}),
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = workdir / "orthanc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ORTHANC, str(cfg)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = RunningOrthanc(port, proc.pid, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({proc.returncode}): {log.read_text()[-2000:]}")
            with socket.socket() as probe:  # listening (HTTP or HTTPS alike)
                probe.settimeout(1)
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc not answering after {START_TIMEOUT_S} s")
            time.sleep(0.2)
        yield running
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
