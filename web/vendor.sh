#!/usr/bin/env bash
# Copies the pinned browser assets that the relay embeds (include_bytes!) from npm packages into
# assets/vendor/, and writes assets/vendor/SHA256SUMS.
#
#   web/vendor.sh           npm ci in web/, then replace assets/vendor/ with a fresh copy
#   web/vendor.sh --check   npm ci in web/, then fail (exit 1) unless assets/vendor/ matches a
#                           fresh copy byte for byte (no missing, extra or changed files)
#
# Versions are pinned in web/package.json + web/package-lock.json; see web/README.md.
# assets/vendor/ is owned by this script: files there that are not in the list below are removed.
# Needs node + npm; only the npm registry is contacted. web/node_modules/ is git-ignored.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$ROOT/web"
DEST="$ROOT/assets/vendor"

mode=write
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "vendor.sh: unknown argument '$1' (use --check or --help)" >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
  echo "vendor.sh: too many arguments" >&2
  exit 2
fi

# destination name  <-  path under web/node_modules/
FILES=(
  "xterm.js                       @xterm/xterm/lib/xterm.js"
  "xterm.css                      @xterm/xterm/css/xterm.css"
  "xterm-LICENSE.txt              @xterm/xterm/LICENSE"
  "addon-fit.js                   @xterm/addon-fit/lib/addon-fit.js"
  "addon-fit-LICENSE.txt          @xterm/addon-fit/LICENSE"
  "asciinema-player.min.js        asciinema-player/dist/bundle/asciinema-player.min.js"
  "asciinema-player.css           asciinema-player/dist/bundle/asciinema-player.css"
  "asciinema-player-LICENSE.txt   asciinema-player/LICENSE"
)

echo "vendor.sh: npm ci --ignore-scripts in $WEB" >&2
(cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/kube-relay-vendor.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

names=()
for entry in "${FILES[@]}"; do
  read -r name src <<<"$entry"
  if [ ! -f "$WEB/node_modules/$src" ]; then
    echo "vendor.sh: $src is missing from the installed packages (package layout changed?)" >&2
    exit 1
  fi
  cp "$WEB/node_modules/$src" "$STAGE/$name"
  names+=("$name")
done
(cd "$STAGE" && LC_ALL=C sha256sum $(printf '%s\n' "${names[@]}" | LC_ALL=C sort) >SHA256SUMS)

if [ "$mode" = check ]; then
  if [ ! -d "$DEST" ]; then
    echo "vendor.sh --check: FAIL: $DEST does not exist; run web/vendor.sh" >&2
    exit 1
  fi
  if ! diff_out="$(diff -r "$DEST" "$STAGE" 2>&1)"; then
    echo "vendor.sh --check: FAIL: assets/vendor/ does not match a fresh copy of the packages pinned in web/package-lock.json:" >&2
    # Name the files only; the contents are minified and the diff would be unreadable.
    printf '%s\n' "$diff_out" | grep -E '^(Only in|Binary files|diff -r)' | sed "s#$STAGE#<fresh copy>#; s#$ROOT/##g" >&2 || true
    echo "vendor.sh --check: run web/vendor.sh and commit assets/vendor/" >&2
    exit 1
  fi
  echo "vendor.sh --check: OK: assets/vendor/ matches web/package-lock.json (${#names[@]} files + SHA256SUMS)" >&2
  exit 0
fi

rm -rf "$DEST"
mkdir -p "$DEST"
cp "$STAGE"/* "$DEST"/
echo "vendor.sh: wrote $DEST:" >&2
(cd "$DEST" && cat SHA256SUMS >&2)
