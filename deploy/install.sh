#!/usr/bin/env bash
# Create .venv (once) and install the project with its test extras into it.
#   bash deploy/install.sh [extras]      e.g. bash deploy/install.sh test
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
extras="${1:-test}"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
