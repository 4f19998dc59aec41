#!/usr/bin/env bash
# Install dp-mepf into ./.venv on a fresh Debian/Ubuntu machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT=()
[ -d /usr/share/datasets/fashion-mnist ] || APT+=(dataset-fashion-mnist)
# tcmalloc: the `mepf` command runs under it where installed (mepf_core/allocator.py: less memory).
dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 || APT+=(libtcmalloc-minimal4)
# Headless Chromium and its driver: tests/test_ui_browser.py checks what the Prefect UI renders.
command -v chromium >/dev/null || APT+=(chromium)
command -v chromedriver >/dev/null || APT+=(chromium-driver)
if [ ${#APT[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q "${APT[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e '.[test]'
echo "dp-mepf installed in $(pwd)/.venv"
