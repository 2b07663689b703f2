#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root):
# the rendering tools, a virtualenv in .venv, torch's CPU build, and this package (editable, with dev tools).
# Re-running is fast: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(abcmidi abcm2ps fluidsynth timgm6mb-soundfont lame librsvg2-bin bubblewrap chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python packages into .venv"
  # torch first and pinned: its CPU build; a bare `torch` could pull a multi-GB CUDA build.
  # (the grep drops pip's notes about this machine's optional local package indexes)
  { .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" &&
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"; } 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import ray, torch, transformers; print("ray", ray.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
