"""Start a real, throw-away Orthanc PACS with its DICOMweb plugin for integration tests.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by
scripts/install-system-deps.sh) listens on a free port of 127.0.0.1 only
(``RemoteAccessAllowed`` false), keeps its database and files in a test folder, and serves
QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``: the configuration of ../shared/MACHINE-NOTES.md,
section "DICOM and PACS". The DICOM (DIMSE) listener is off; tests use HTTP only. The helpers
return once ``/dicom-web/studies`` answers, and the fixture stops the server (SIGTERM).

Example::

    def test_pull(orthanc):
        orthanc.upload(paths)                      # Orthanc's REST ``POST /instances``, one file each
        with DicomWebClient(orthanc.dicomweb_url) as pacs:
            ...
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, log_tail, stop_process, wait_until_ready

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc() -> str | None:
    """The ``Orthanc`` binary (Debian puts it in /usr/sbin, which a user's PATH may lack), or ``None``."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    return found if found and DICOMWEB_PLUGIN.is_file() else None


ORTHANC = find_orthanc()
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None, reason=f"Orthanc or its DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed "
                            "(scripts/install-system-deps.sh installs the Debian packages orthanc, orthanc-dicomweb)")


@dataclass
class OrthancServer:
    """A running Orthanc subprocess on ``127.0.0.1:port``."""

    port: int
    process: subprocess.Popen
    folder: Path
    log_path: Path

    @property
    def url(self) -> str:
        """Orthanc's own REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``."""
        return f"{self.url}/dicom-web"

    def upload(self, paths: Iterable[Path]) -> int:
        """Store DICOM files with Orthanc's REST ``POST /instances``; returns how many."""
        count = 0
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            for path in paths:
                response = client.post("/instances", content=Path(path).read_bytes())
                response.raise_for_status()
                count += 1
        return count

    def series_modalities(self, study_uid: str) -> dict[str, str]:
        """SeriesInstanceUID -> Modality of a study, from Orthanc's QIDO-RS (empty for no study)."""
        response = httpx.get(f"{self.dicomweb_url}/studies/{study_uid}/series", timeout=30, trust_env=False)
        response.raise_for_status()
        body = response.json() if response.content else []
        return {item["0020000E"]["Value"][0]: item["00080060"]["Value"][0] for item in body}

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log_path, chars)

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.process, timeout_s)


def start_orthanc(folder: Path, *, lua_scripts: Sequence[Path] = (), ready_timeout_s: float = 30.0,
                  attempts: int = 3) -> OrthancServer:
    """Start Orthanc with its files in ``folder`` and wait until DICOMweb answers.

    Args:
        folder: working folder (configuration, storage, log); created if missing.
        lua_scripts: Orthanc Lua scripts to load (``LuaScripts``), e.g. a ``ReceivedInstanceFilter``
            that makes this PACS refuse some objects.
        ready_timeout_s: how long to wait for DICOMweb to answer.
        attempts: ports to try (another process may take the free port first).

    Raises:
        RuntimeError: no binary or plugin, or the server did not come up; the message holds its log.
    """
    if ORTHANC is None:
        raise RuntimeError("Orthanc with its DICOMweb plugin is not installed; run scripts/install-system-deps.sh")
    folder = Path(folder)
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        storage = folder / f"storage-{port}"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "brainscan-tests", "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(Path(script).resolve()) for script in lua_scripts],
        }
        config_path = folder / f"orthanc-{port}.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = folder / f"orthanc-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([ORTHANC, str(config_path)], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        server = OrthancServer(port, process, folder, log_path)
        try:
            wait_until_ready(f"{server.dicomweb_url}/studies", timeout_s=ready_timeout_s,
                             is_alive=lambda: process.poll() is None)
            return server
        except RuntimeError:
            last_log = server.log_tail()
            server.stop()
    raise RuntimeError(f"Orthanc did not start after {attempts} attempts\n--- log ---\n{last_log}")


@contextlib.contextmanager
def orthanc_server(folder: Path, **kwargs) -> Iterator[OrthancServer]:
    """:func:`start_orthanc` as a context manager that always stops the server."""
    server = start_orthanc(folder, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc PACS with DICOMweb on 127.0.0.1 for the whole session (skipped when not installed).

    tests/dicom/conftest.py imports it for the DICOM tests; tests share it, so each uploads its own
    study (new UIDs) rather than expecting an empty server.
    """
    if ORTHANC is None:
        pytest.skip(needs_orthanc.kwargs["reason"])
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
