#!/usr/bin/env bash
# System packages the test suite needs, installed only when missing (Debian/Ubuntu):
#   chromium      headless browser for the frontend tests (driven by Python Playwright; never
#                 `playwright install`, which downloads its own browser)
#   redis-server  the broker for the Celery integration tests
#   dicom3tools   David Clunie's DICOM validator `dciodvfy`, which checks the DICOM SEG brainscan writes
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
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
