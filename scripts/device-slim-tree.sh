#!/usr/bin/env bash
# Keep the classifier bundles (105 MB) out of the working tree that the device tool sends to a lent GPU
# machine (at most 64 MiB travels: tracked files and untracked ones git does not ignore).
#
#   scripts/device-slim-tree.sh on    before the device calls: out of the index, ignored locally
#   scripts/device-slim-tree.sh off   after them: back in the index, as committed (never commit between)
#   scripts/device-slim-tree.sh size  what would travel, in MiB, with the paths carried (CARRY="a b")
# The files stay on disk throughout.
set -euo pipefail
cd "$(dirname "$0")/.."
heavy=models/classification
exclude=.git/info/exclude
case "${1:-}" in
    on)
        grep -qxF "/$heavy/" "$exclude" 2>/dev/null || echo "/$heavy/" >> "$exclude"
        git rm -r --cached -q "$heavy"
        ;;
    off)
        git reset -q -- "$heavy"
        sed -i "\|^/$heavy/\$|d" "$exclude"
        ;;
    size)
        { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 cat 2>/dev/null | wc -c \
            | awk -v carried="$( (for p in ${CARRY:-}; do find "$p" -type f -print0; done) | xargs -0 -r cat | wc -c)" \
                  '{printf "%.1f MiB (tree %.1f + carried %.1f)\n", ($1 + carried) / 1048576, $1 / 1048576, carried / 1048576}'
        ;;
    *)
        echo "usage: $0 on|off|size" >&2
        exit 2
        ;;
esac
