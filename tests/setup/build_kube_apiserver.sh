#!/usr/bin/env bash
# Build kube-apiserver from Debian's `kubernetes` source package (1.20.2, bookworm) and cache it.
#
# No package registry we can reach ships a kube-apiserver binary, so the test control plane
# builds one (about 4-5 minutes on 2 cores) and caches it in $FORGELINE_CACHE/bin (default
# ~/.cache/forgeline/bin). A second run finds the cached binary and does nothing.
#
# Skipped entirely when KUBEBUILDER_ASSETS points at envtest binaries (see README).
set -euo pipefail

cache="${FORGELINE_CACHE:-$HOME/.cache/forgeline}"
bin="$cache/bin/kube-apiserver"

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  echo "control plane: using envtest binaries from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  exit 0
fi
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "control plane: cached $("$bin" --version) at $bin"
  exit 0
fi

need_apt=()
command -v go >/dev/null || need_apt+=(golang-go)
command -v rsync >/dev/null || need_apt+=(rsync)
command -v jq >/dev/null || need_apt+=(jq)
command -v dpkg-source >/dev/null || need_apt+=(dpkg-dev)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_apt+=(golang-github-modern-go-reflect2-dev)

src_list=/etc/apt/sources.list.d/forgeline-bookworm-src.sources
if [ ! -f "$src_list" ]; then
  cat >"$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

work="$cache/build"
rm -rf "$work" && mkdir -p "$work"
cd "$work"
apt-get source --download-only kubernetes >/dev/null
dscs=(kubernetes_*.dsc)
dsc=${dscs[0]}
dpkg-source --no-check -x "$dsc" src >/dev/null

# The Debian rules build in a GOPATH layout: .go/src/k8s.io/kubernetes -> source root.
mkdir -p src/.go/src/k8s.io
ln -sfn "$work/src" src/.go/src/k8s.io/kubernetes

# Vendored reflect2 v1.0.1 crashes the apiserver (SIGSEGV in mapiterinit) under Go >= 1.18.
rm -rf src/vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 src/vendor/github.com/modern-go/reflect2

cd src/.go/src/k8s.io/kubernetes
export GOPATH="$work/src/.go" CGO_ENABLED=0 GOCACHE="$cache/gocache"
make WHAT=cmd/kube-apiserver KUBE_BUILD_PLATFORMS=linux/amd64 >"$work/make.log" 2>&1 || {
  tail -n 40 "$work/make.log"; exit 1; }
built=$(find "$work/src/_output" -type f -name kube-apiserver -print -quit)
mkdir -p "$cache/bin"
cp "$built" "$bin"
"$bin" --version
rm -rf "$work" "$cache/gocache"
echo "control plane: built $bin"
