#!/usr/bin/env bash
# The embedded default in one command: install into .venv, import a synthetic
# demo study set into ./pacs-data (local files + SQLite), list it, and run the
# DICOM service on 127.0.0.1:11112 (AE title PACS) until Ctrl-C.
#   bash deploy/quickstart.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash deploy/install.sh test
export PACS_DATA_DIR="${PACS_DATA_DIR:-$REPO/pacs-data}"
if [[ ! -f "$PACS_DATA_DIR/index.sqlite" ]]; then
  .venv/bin/pacs synth "$PACS_DATA_DIR/demo-input" --studies 3 --series 2 --instances 10
  .venv/bin/pacs store "$PACS_DATA_DIR/demo-input"
fi
.venv/bin/pacs ls
exec .venv/bin/pacs serve
