#!/usr/bin/env bash
# System packages the test suite needs, installed only when missing (Debian/Ubuntu):
#   chromium      headless browser for the frontend tests (driven by Python Playwright; never
#                 `playwright install`, which downloads its own browser)
#   redis-server  the broker for the Celery integration tests
#   dicom3tools   David Clunie's DICOM validator `dciodvfy`, which checks the DICOM SEG brainscan writes
#   orthanc, orthanc-dicomweb
#                 a real PACS with its DICOMweb plugin, which the tests start on 127.0.0.1 to pull studies
#                 from (QIDO-RS, WADO-RS) and store SEGs into (STOW-RS); the package's own service is not used
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: please install ${missing[*]} with your package manager" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
