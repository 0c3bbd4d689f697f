#!/usr/bin/env bash
# Installs the real-client test dependencies (idempotent; cheap when nothing changed):
#   - .venv/ at the repo root with tests/clients/python/requirements.txt (the Python `kubernetes`
#     client), reinstalled only when requirements.txt or the interpreter changes;
#   - tests/clients/node/node_modules via `npm ci` (@kubernetes/client-node), only when
#     node_modules is missing or package-lock.json changed;
#   - tests/idp/node_modules via `npm ci` (oidc-provider, the real IdP of tests/e2e/oidc_provider.rs),
#     on the same terms;
#   - tests/browser/node_modules via `npm ci` (playwright-core, which drives the browser of
#     tests/e2e/browser.rs), on the same terms, and Debian's `chromium` (apt-get, root only, only when
#     /usr/bin/chromium is missing): playwright-core never downloads a browser of its own;
#   - tests/storage/node_modules via `npm ci` (Azurite, the Azure Storage emulator that stores
#     session recordings in tests/e2e/recording.rs), on the same terms;
#   - .venv-deploy/ with tests/deploy/requirements.txt (checkov, for tests/e2e/deploy.rs), a venv of
#     its own because checkov's pins conflict with the kubernetes client's; reinstalled only
#     when that file or the interpreter changes.
# Needs python3 (3.11) and node 20 + npm; on Debian without the venv module it installs
# python3-venv with apt-get (root only). Only the package registries are contacted.
# Environment: PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY_REQS="$ROOT/tests/clients/python/requirements.txt"
PY_STAMP="$VENV/.kube-relay-requirements.sha256"
NODE_DIR="$ROOT/tests/clients/node"
NODE_STAMP="$NODE_DIR/node_modules/.kube-relay-package-lock.sha256"

log() { printf 'install-test-deps: %s\n' "$*"; }
die() { printf 'install-test-deps: error: %s\n' "$*" >&2; exit 1; }

# Contents hash of the inputs that decide an install, plus the tool version (a new interpreter or
# npm needs a reinstall even with the same lock file).
fingerprint() { { cat "$1"; printf '%s\n' "$2"; } | sha256sum | cut -d' ' -f1; }

# --- Python ---
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
py_version="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"

# Debian splits ensurepip (needed by `python3 -m venv`) into python3-venv.
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        log "python venv support missing: apt-get install python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq python3-venv >/dev/null
    else
        die "$PYTHON cannot create virtual environments (install python3-venv)"
    fi
fi

# A venv whose interpreter is missing or broken (interrupted creation, python upgraded under it)
# is rebuilt from scratch.
if [ -d "$VENV" ] && ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    log "$VENV is broken: recreating it"
    rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
    log "creating $VENV with $PYTHON $py_version"
    "$PYTHON" -m venv "$VENV"
fi

venv_version="$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
py_want="$(fingerprint "$PY_REQS" "python $venv_version")"
if [ -f "$PY_STAMP" ] && [ "$(cat "$PY_STAMP")" = "$py_want" ]; then
    log "python client deps up to date ($VENV)"
else
    log "pip install -r ${PY_REQS#"$ROOT"/} into $VENV"
    # Remove the stamp first so an interrupted install is retried next time.
    rm -f "$PY_STAMP"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$PY_REQS"
    printf '%s\n' "$py_want" >"$PY_STAMP"
    log "python client deps installed: $("$VENV/bin/python" -m pip show kubernetes 2>/dev/null | sed -n 's/^Version: /kubernetes /p')"
fi

# --- Node ---
command -v node >/dev/null || die "node not found"
command -v npm >/dev/null || die "npm not found"
node_want="$(fingerprint "$NODE_DIR/package-lock.json" "node $(node --version) npm $(npm --version 2>/dev/null)")"
if [ -d "$NODE_DIR/node_modules" ] && [ -f "$NODE_STAMP" ] && [ "$(cat "$NODE_STAMP")" = "$node_want" ]; then
    log "node client deps up to date (${NODE_DIR#"$ROOT"/}/node_modules)"
else
    log "npm ci in ${NODE_DIR#"$ROOT"/}"
    # npm ci wipes node_modules (and so the stamp) before installing exactly the lock file.
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    printf '%s\n' "$node_want" >"$NODE_STAMP"
    log "node client deps installed: @kubernetes/client-node $(node -p 'require("'"$NODE_DIR"'/node_modules/@kubernetes/client-node/package.json").version')"
fi

# --- npm packages of the other test helpers, each pinned by its own lock file ---
# npm ci in DIR (relative to the repo) when its lock file, node or npm changed; LABEL names it in
# messages and PKG is the package whose version is reported.
npm_deps() {
    local dir="$ROOT/$1" label="$2" pkg="$3" stamp want
    stamp="$dir/node_modules/.kube-relay-package-lock.sha256"
    want="$(fingerprint "$dir/package-lock.json" "node $(node --version) npm $(npm --version 2>/dev/null)")"
    if [ -d "$dir/node_modules" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "$label deps up to date ($1/node_modules)"
        return
    fi
    log "npm ci in $1"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    printf '%s\n' "$want" >"$stamp"
    log "$label deps installed: $pkg $(node -p 'require("'"$dir"'/node_modules/'"$pkg"'/package.json").version')"
}
# oidc-provider: the real IdP of tests/e2e/oidc_provider.rs.
npm_deps tests/idp "test IdP" oidc-provider
# playwright-core is pinned to the release whose bundled Chromium matches Debian bookworm's
# chromium major version; tests/browser/drive.mjs launches /usr/bin/chromium.
npm_deps tests/browser "test browser driver" playwright-core
# Azurite, the Azure Storage emulator: the recording store of tests/e2e/recording.rs.
npm_deps tests/storage "storage emulator" azurite
if [ -x /usr/bin/chromium ]; then
    log "chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install chromium"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq chromium >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq chromium >/dev/null
    fi
    log "chromium installed ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
else
    log "chromium missing (not root: cannot apt-get install it): tests/e2e/browser.rs will fail until it is installed"
fi

# --- Deploy checks (checkov) ---
DEPLOY_VENV="$ROOT/.venv-deploy"
DEPLOY_REQS="$ROOT/tests/deploy/requirements.txt"
DEPLOY_STAMP="$DEPLOY_VENV/.kube-relay-requirements.sha256"
if [ -d "$DEPLOY_VENV" ] && ! "$DEPLOY_VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    log "$DEPLOY_VENV is broken: recreating it"
    rm -rf "$DEPLOY_VENV"
fi
if [ ! -d "$DEPLOY_VENV" ]; then
    log "creating $DEPLOY_VENV with $PYTHON $py_version"
    "$PYTHON" -m venv "$DEPLOY_VENV"
fi
deploy_version="$("$DEPLOY_VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
deploy_want="$(fingerprint "$DEPLOY_REQS" "python $deploy_version")"
if [ -f "$DEPLOY_STAMP" ] && [ "$(cat "$DEPLOY_STAMP")" = "$deploy_want" ]; then
    log "deploy check deps up to date ($DEPLOY_VENV)"
else
    log "pip install -r ${DEPLOY_REQS#"$ROOT"/} into $DEPLOY_VENV"
    rm -f "$DEPLOY_STAMP"
    "$DEPLOY_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$DEPLOY_REQS"
    printf '%s\n' "$deploy_want" >"$DEPLOY_STAMP"
    log "deploy check deps installed: $("$DEPLOY_VENV/bin/python" -m pip show checkov 2>/dev/null | sed -n 's/^Version: /checkov /p')"
fi

# --- Benchmark harness tools (scripts/bench, tests/e2e/bench_harness.rs) ---
# h2load (nghttp2-client), nginx (nginx-light, the peer proxy) and wrk, from Debian; only what
# is missing, and only as root with apt-get (tests/e2e/bench_harness.rs skips itself without them).
bench_missing=()
command -v h2load >/dev/null || bench_missing+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || bench_missing+=(nginx-light)
command -v wrk >/dev/null || bench_missing+=(wrk)
if [ "${#bench_missing[@]}" -eq 0 ]; then
    log "benchmark tools present (h2load, nginx, wrk)"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install ${bench_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq "${bench_missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq "${bench_missing[@]}" >/dev/null
    fi
else
    log "benchmark tools missing (${bench_missing[*]}): tests/e2e/bench_harness.rs will skip"
fi

# --- cargo-deny (licences, bans and sources of the dependency tree; deny.toml) ---
# Built from crates.io at a pinned version with its own lock file; cached in ~/.cargo/bin.
CARGO_DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ]; then
    log "cargo-deny $CARGO_DENY_VERSION present"
else
    log "cargo install cargo-deny $CARGO_DENY_VERSION (a few minutes, once)"
    cargo install --quiet --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi
