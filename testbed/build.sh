#!/usr/bin/env bash
# Builds the test bed's real control plane from Go modules: kube-apiserver from k8s.io/kubernetes
# at the release pinned in testbed/KUBERNETES_VERSION (go.mod and go.sum committed), and etcd from
# go.etcd.io/etcd/server/v3 (its own module). Idempotent: a stamp of the inputs skips the work when
# nothing changed. Prints the directory holding the binaries on its last line.
#
# The binaries live in the user's cache, not in one clone's target/, so every clone on a machine
# (and CI with warm caches) shares one build. The Go module and build caches the build needs
# (about 6 GB for kube-apiserver) are private to it and removed once the binaries exist, so the
# test run that follows has that disk back: a rebuild happens only when an input changes, and
# then it is a cold one (about 8 minutes on 2 cores). TESTBED_KEEP_GO_CACHES=1 keeps them.
#
#   testbed/build.sh [OUT_DIR]      default: ~/.cache/kube-relay/testbed/<release>
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
release="$(cat "$here/KUBERNETES_VERSION")"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-relay/testbed"
out="${1:-$cache/$release}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# One build at a time: several test processes may ask at once.
exec 9>"$out/.lock"
flock 9
command -v go >/dev/null || { echo "testbed: go is not installed (the test bed needs Go >= 1.24)" >&2; exit 1; }
# The generated go.mod must name the pinned release; regenerate it (from the release's own
# go.mod) only when someone changed KUBERNETES_VERSION.
if ! grep -qE "^(require )?[[:space:]]*k8s.io/kubernetes ${release}( // indirect)?\$" "$here/apiserver/go.mod"; then
  "$here/gen-gomod.sh" "$release"
fi

stamp_of() {
  (cd "$here" && cat KUBERNETES_VERSION build.sh apiserver/go.mod apiserver/go.sum etcd/go.mod etcd/go.sum etcd/*.go; go version) | sha256sum | cut -d' ' -f1
}
stamp="$(stamp_of)"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "testbed: up to date ($release)" >&2
  echo "$out"
  exit 0
fi

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=readonly -modcacherw"
work="$cache/go-work"
export GOMODCACHE="$work/mod" GOCACHE="$work/build"
major="${release#v}"; major="${major%%.*}"
minor="${release#v*.}"; minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${release}"
  ldflags+=" -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
  ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.gitCommit="
  ldflags+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done
start=$(date +%s)
echo "testbed: building kube-apiserver ${release} (a cold build takes about 10 minutes on 2 cores)" >&2
(cd "$here/apiserver" && go build -trimpath -ldflags "-s -w${ldflags}" -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
echo "testbed: building etcd" >&2
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" .)
mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
mv "$out/etcd.tmp" "$out/etcd"
echo "$stamp" > "$out/.stamp"
if [ "${TESTBED_KEEP_GO_CACHES:-0}" != 1 ]; then
  rm -rf "$work"
fi
echo "testbed: built in $(( $(date +%s) - start )) s: $("$out/kube-apiserver" --version)" >&2
echo "$out"
