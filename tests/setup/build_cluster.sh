#!/usr/bin/env bash
# Build the single-node test cluster's binaries from the Go module proxy and cache them.
#
#   bash tests/setup/build_cluster.sh [component ...]   (default: all)
#
# Components (each cached in $FORGELINE_CACHE/cluster/<name>-<version>/, so a second run does
# nothing; the Go module and build caches live in $FORGELINE_CACHE/go):
#   kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
#               v1.34.x through the wrapper module tests/setup/go/kubernetes (k8s.io/kubernetes'
#               staging modules pinned to their published v0.34.x), version ldflags set as
#               hack/lib/version.sh sets them
#   etcd        etcd v3.6.x (tests/setup/go/etcd: the server module with etcd's three-line main)
#   kuberay     the KubeRay operator v1.5.0 (`go install`), and its CRDs from the same module
#   kueue       Kueue v0.17.0's manager, and its CRDs from the same module
#   coredns     CoreDNS (cluster DNS: KubeRay's workers find the head by its Service's FQDN)
#   prometheus  Prometheus v3 (module v0.3xx), for Kubernetes service discovery: Debian's build
#               (2.42) leaves its Kubernetes SD out ("field kubernetes_sd_configs not found")
#   pause       the pod sandbox: build/pause/linux/pause.c from the k8s.io/kubernetes module,
#               linked statically (imported as registry.k8s.io/pause by the harness)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${FORGELINE_CACHE:-$HOME/.cache/forgeline}"
out_root="$cache/cluster"
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS="-mod=mod -trimpath"
export GOTOOLCHAIN=local CGO_ENABLED=0
# The module proxy is this machine's only Go source; checksums come from each wrapper's go.sum.
export GOPROXY="${GOPROXY:-https://proxy.golang.org}"

KUBERNETES_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
KUBERAY_VERSION=v1.5.0
KUEUE_VERSION=v0.17.0
COREDNS_VERSION=v1.12.4
PROMETHEUS_VERSION=v0.316.0

log() { printf '[build_cluster] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null || { log "go is not installed (the machine image brings Go 1.26)"; exit 1; }
}

# built NAME VERSION: whether it is built and cached.
built() { [ -f "$out_root/$1-$2/.built" ]; }
finish() { date -u +%FT%TZ >"$out_root/$1-$2/.built"; log "$1 $2: built in $3 s"; }

build_kubernetes() {
  local v=$KUBERNETES_VERSION dir="$out_root/kubernetes-$KUBERNETES_VERSION"
  built kubernetes "$v" && return 0
  need_go
  local start=$SECONDS minor=${v#v1.}
  minor=${minor%%.*}
  local ldflags="-s -w"
  local key val
  for kv in "gitVersion=$v" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
    "gitCommit=module-proxy-$v" "buildDate=$(date -u +%FT%TZ)"; do
    key=${kv%%=*} val=${kv#*=}
    ldflags+=" -X k8s.io/component-base/version.$key=$val -X k8s.io/client-go/pkg/version.$key=$val"
  done
  mkdir -p "$dir/bin"
  (
    cd "$here/go/kubernetes"
    for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
      log "kubernetes $v: building $cmd"
      go build -ldflags "$ldflags" -o "$dir/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
  )
  "$dir/bin/kube-apiserver" --version
  finish kubernetes "$v" $((SECONDS - start))
}

build_etcd() {
  local v=$ETCD_VERSION dir="$out_root/etcd-$ETCD_VERSION"
  built etcd "$v" && return 0
  need_go
  local start=$SECONDS
  mkdir -p "$dir/bin"
  (cd "$here/go/etcd" && go build -ldflags "-s -w" -o "$dir/bin/etcd" .)
  "$dir/bin/etcd" --version >&2
  finish etcd "$v" $((SECONDS - start))
}

# A module's files as the proxy serves them (read-only in GOMODCACHE).
module_dir() {
  (cd "$here/go/kubernetes" && go mod download -json "$1@$2" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
}

build_kuberay() {
  local v=$KUBERAY_VERSION dir="$out_root/kuberay-$KUBERAY_VERSION"
  built kuberay "$v" && return 0
  need_go
  local start=$SECONDS
  mkdir -p "$dir/bin" "$dir/crds"
  GOBIN="$dir/bin" go install -ldflags "-s -w" "github.com/ray-project/kuberay/ray-operator@$v"
  local src
  src=$(module_dir github.com/ray-project/kuberay/ray-operator "$v")
  cp "$src"/config/crd/bases/ray.io_*.yaml "$dir/crds/"
  chmod u+w "$dir"/crds/*
  finish kuberay "$v" $((SECONDS - start))
}

# install_single NAME VERSION PACKAGE VERSION_FLAG: a component that is one `go install`.
install_single() {
  local dir="$out_root/$1-$2"
  built "$1" "$2" && return 0
  need_go
  local start=$SECONDS
  mkdir -p "$dir/bin"
  GOBIN="$dir/bin" go install -ldflags "-s -w" "$3@$2"
  "$dir/bin/$1" "$4" >&2
  finish "$1" "$2" $((SECONDS - start))
}

build_prometheus() {
  install_single prometheus "$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/prometheus --version
}

build_kueue() {
  local v=$KUEUE_VERSION dir="$out_root/kueue-$KUEUE_VERSION"
  built kueue "$v" && [ -f "$dir/webhook/manifests.yaml" ] && return 0
  need_go
  local start=$SECONDS
  mkdir -p "$dir/bin" "$dir/crds"
  GOBIN="$dir/bin" go install -ldflags "-s -w" "sigs.k8s.io/kueue/cmd/kueue@$v"
  local src
  src=$(module_dir sigs.k8s.io/kueue "$v")
  cp "$src"/config/components/crd/bases/*.yaml "$dir/crds/"
  # its webhooks, which the harness points at the manager running out of cluster
  mkdir -p "$dir/webhook"
  cp "$src"/config/components/webhook/manifests.yaml "$dir/webhook/"
  chmod u+w "$dir"/crds/* "$dir"/webhook/*
  finish kueue "$v" $((SECONDS - start))
}

build_coredns() {
  install_single coredns "$COREDNS_VERSION" github.com/coredns/coredns -version
}

build_pause() {
  local v=$KUBERNETES_VERSION dir="$out_root/pause-$KUBERNETES_VERSION"
  built pause "$v" && return 0
  need_go
  command -v gcc >/dev/null || { log "gcc is needed to build the pause binary"; exit 1; }
  local start=$SECONDS src
  src=$(module_dir k8s.io/kubernetes "$v")
  mkdir -p "$dir/bin"
  local pause_version
  pause_version=$(sed -n 's/^TAG[ ?:]*= *//p' "$src/build/pause/Makefile" | head -1)
  gcc -Os -Wall -Werror -static -DVERSION="v$pause_version-forgeline" \
    -o "$dir/bin/pause" "$src/build/pause/linux/pause.c"
  strip "$dir/bin/pause"
  echo "$pause_version" >"$dir/version"
  finish pause "$v" $((SECONDS - start))
}

# What the harness (forgeline_operator.dev.cluster.binaries) reads: each built component's version
# and directory, for the versions this script pins.
write_manifest() {
  local first=1 c v
  {
    echo "{"
    for c in etcd kubernetes pause coredns kuberay kueue prometheus; do
      case $c in
        etcd) v=$ETCD_VERSION ;; kubernetes | pause) v=$KUBERNETES_VERSION ;;
        coredns) v=$COREDNS_VERSION ;; kuberay) v=$KUBERAY_VERSION ;; kueue) v=$KUEUE_VERSION ;;
        prometheus) v=$PROMETHEUS_VERSION ;;
      esac
      built "$c" "$v" || continue
      [ $first -eq 1 ] || echo ","
      first=0
      printf '  "%s": {"version": "%s", "dir": "%s"}' "$c" "$v" "$out_root/$c-$v"
    done
    echo
    echo "}"
  } >"$out_root/manifest.json.tmp"
  mv "$out_root/manifest.json.tmp" "$out_root/manifest.json"
}

components=("$@")
[ ${#components[@]} -eq 0 ] && components=(etcd kubernetes pause coredns kuberay kueue prometheus)
mkdir -p "$out_root"
for c in "${components[@]}"; do
  "build_$c"
  write_manifest
done
# The binaries are what the harness needs: the Go build cache (8 GB after all of them) goes; the
# module cache stays, so a version bump downloads only what changed.
rm -rf "$GOCACHE"
