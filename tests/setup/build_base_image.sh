#!/usr/bin/env bash
# The base image the test cluster's images build FROM, made here with debootstrap (no registry can
# be reached, so neither rayproject/ray nor python:3.11-slim can be pulled).
#
#   bash tests/setup/build_base_image.sh     (cached: a second run does nothing)
#
# Debian bookworm (minbase) with Python 3.11 in a virtual environment on PATH, laid out like the
# production bases: a user `ray` (uid 1000, gid 100, home /home/ray, as in rayproject/ray) owns the
# environment, so the trainer Dockerfile's `USER ray` + `pip install` works as it does on Ray's image,
# and root's `pip install` in the operator Dockerfile works as on python:3.11-slim. The image is
# committed into buildah's store under $FORGELINE_CACHE/containers as localhost/forgeline/base.
set -euo pipefail

cache="${FORGELINE_CACHE:-$HOME/.cache/forgeline}"
BASE_IMAGE="${FORGELINE_BASE_IMAGE:-localhost/forgeline/base:bookworm-py311}"
SUITE=bookworm
MIRROR="${FORGELINE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export CONTAINERS_STORAGE_CONF="$cache/containers/storage.conf"

log() { printf '[build_base_image] %s\n' "$*" >&2; }

mkdir -p "$cache/containers"
if [ ! -f "$CONTAINERS_STORAGE_CONF" ]; then
  # overlay, as containerd's snapshotter on the node; a run dir that a reboot clears
  cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$cache/containers/storage"
runroot = "/run/forgeline-containers"
EOF
fi

if buildah images --noheading --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep -qx "$BASE_IMAGE"; then
  log "cached: $BASE_IMAGE"
  exit 0
fi

for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { log "$tool missing: run tests/setup/install_tools.sh"; exit 1; }
done

start=$SECONDS
work=$(mktemp -d "$cache/base-XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
log "debootstrap $SUITE (minbase) from $MIRROR"
debootstrap --variant=minbase \
  --include=python3,python3-venv,bash,wget,grep,ca-certificates,procps \
  "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log"; exit 1; }

# The certificate authorities this machine trusts beyond Debian's (a proxy's, a company's): pip and
# apt inside image builds on this machine go through the same network, so the base trusts them too,
# as a company's base image carries its company CA.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi
chroot "$rootfs" /bin/bash -euo pipefail -c '
  update-ca-certificates >/dev/null
  useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
  python3 -m venv /opt/venv
  chown -R 1000:100 /opt/venv
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
'
# debootstrap copied the host resolver; the image carries none of its own.
: >"$rootfs/etc/resolv.conf"

ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
cp -a "$rootfs/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config \
  --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  --env REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --workingdir /home/ray \
  --cmd /bin/bash \
  --label org.opencontainers.image.description="Forgeline test base: Debian $SUITE, Python 3.11 venv at /opt/venv, user ray (1000:100)" \
  "$ctr"
buildah commit --rm "$ctr" "$BASE_IMAGE" >/dev/null
log "built $BASE_IMAGE in $((SECONDS - start)) s ($(buildah images --noheading --format '{{.Size}}' "$BASE_IMAGE"))"
