#!/usr/bin/env bash
# Install dp-mepf into ./.venv on a fresh Debian/Ubuntu machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e '.[test]'
echo "dp-mepf installed in $(pwd)/.venv"
