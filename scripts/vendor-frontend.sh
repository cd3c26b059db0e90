#!/usr/bin/env bash
# Put the web page's one third-party module in place: NiiVue (the 3D viewer of the
# "Segmentation (3D)" tab), copied from npm to frontend/vendor/niivue.js.
#
# The page has no build step: it imports ./vendor/niivue.js, which is NiiVue's self-contained
# ES module build (dist/index.js; dist/index.min.js is not importable as a module). The version is
# pinned by frontend/package.json + package-lock.json; node_modules/ and vendor/ are git-ignored.
#
# Idempotent and quick when nothing changed: it does nothing when vendor/niivue.js is newer
# than package-lock.json. Needs node + npm (and the npm registry) only when it has work to do.
# Usage: scripts/vendor-frontend.sh [--force]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
frontend="$repo_root/frontend"
source_module="$frontend/node_modules/@niivue/niivue/dist/index.js"
target="$frontend/vendor/niivue.js"
lockfile="$frontend/package-lock.json"

if [[ "${1:-}" != "--force" && -s "$target" && "$target" -nt "$lockfile" ]]; then
    echo "vendor-frontend: $target is up to date"
    exit 0
fi

if [[ ! -s "$source_module" || "$lockfile" -nt "$source_module" ]]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "vendor-frontend: npm is not installed; install Node.js 18+ (it ships npm), then run this again." >&2
        exit 1
    fi
    # npm ci installs exactly the locked versions; --ignore-scripts: nothing from the registry runs here.
    (cd "$frontend" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

if [[ ! -s "$source_module" ]]; then
    echo "vendor-frontend: $source_module is missing after npm ci; check frontend/package.json" >&2
    exit 1
fi

mkdir -p "$frontend/vendor"
# Copy to a temporary name first so that a half-written file is never served.
cp "$source_module" "$target.tmp"
mv "$target.tmp" "$target"
echo "vendor-frontend: copied NiiVue $(node -p "require('$frontend/node_modules/@niivue/niivue/package.json').version" 2>/dev/null || echo '?') to $target"
