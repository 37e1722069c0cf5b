#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files exist locally (no network besides package registries).
# Looks in $GRASSQ_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist (Debian's
# dataset-fashion-mnist package). As root with apt, installs that package; otherwise explains.
set -euo pipefail
dir="${GRASSQ_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have() { for f in "${files[@]}"; do [ -s "$dir/$f" ] || return 1; done; }
if have; then echo "Fashion-MNIST: found in $dir"; exit 0; fi
if [ -z "${GRASSQ_FASHION_MNIST_DIR:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  have && { echo "Fashion-MNIST: installed in $dir"; exit 0; }
fi
cat >&2 <<MSG
Fashion-MNIST IDX files not found in $dir.
Get them in one of these ways, then re-run:
  - Debian/Ubuntu, as root:  apt-get install dataset-fashion-mnist
  - or download ${files[*]}
    from the Fashion-MNIST project (github.com/zalandoresearch/fashion-mnist) into a folder and
    export GRASSQ_FASHION_MNIST_DIR=/that/folder
MSG
exit 1
