#!/usr/bin/env bash
# Creates (once) the project's virtual environment and installs requirements.txt into it.
# Prints the environment's python path on the last line. Override with PYTHON=... VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt >&2; then
  echo "installing requirements.txt into $VENV failed (see pip's message above)" >&2
  exit 1
fi
echo "$VENV/bin/python"
