#!/usr/bin/env bash
# The CPU demo end to end: set up .venv, fetch Fashion-MNIST (Debian package) if missing, then run demo.py.
#   bash scripts/demo.sh            # full run, about 13 minutes on 2 CPU cores -> local_output/demo/report.md
#   bash scripts/demo.sh --quick    # every stage with tiny sizes, under 2 minutes
# Safe to re-run: finished stages are reused.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"

raw=/usr/share/datasets/fashion-mnist
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ ! -f "$raw/train-images-idx3-ubyte.gz" ]; then
    echo "[demo] installing Fashion-MNIST (Debian package dataset-fashion-mnist, ~31 MB)"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
            || { $sudo_cmd apt-get update >/dev/null 2>&1 && $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null; } \
            || true
    fi
    if [ ! -f "$raw/train-images-idx3-ubyte.gz" ]; then
        echo "demo.sh: error: Fashion-MNIST not found and apt-get could not install it; put the four idx .gz files" \
             "(train/t10k images and labels) in a folder and run: FASHION_MNIST_DIR=/that/folder bash scripts/demo.sh" >&2
        exit 2
    fi
fi
exec "$root/.venv/bin/python" demo.py "$@"
