#!/usr/bin/env bash
# Fashion-MNIST ships as Debian's `dataset-fashion-mnist`; unpack it without a system install
# into lorakit's cache (or use /usr/share/datasets/fashion-mnist when it is installed).
set -euo pipefail
dest="${LORAKIT_HOME:-$HOME/.cache/lorakit}/datasets/fashion-mnist"
sha=39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
if [[ -d /usr/share/datasets/fashion-mnist || -f "$dest/train-images-idx3-ubyte.gz" ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
  echo "[setup] warning: no apt-get/dpkg here; Fashion-MNIST recipes need the Debian package dataset-fashion-mnist" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[setup] fetching Debian package dataset-fashion-mnist"
if ! (cd "$tmp" && apt-get download -qq dataset-fashion-mnist=0.0~git20200523.55506a9-1 >/dev/null 2>&1); then
  apt-get update -qq >/dev/null 2>&1 || true
  (cd "$tmp" && apt-get download -qq dataset-fashion-mnist=0.0~git20200523.55506a9-1 >/dev/null 2>&1)
fi
deb=$(ls "$tmp"/*.deb)
echo "$sha  $deb" | sha256sum -c --quiet
dpkg -x "$deb" "$tmp/x"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial" && cp -r "$tmp/x/usr/share/datasets/fashion-mnist" "$dest.partial" && mv "$dest.partial" "$dest"
echo "[setup] Fashion-MNIST in $dest"
