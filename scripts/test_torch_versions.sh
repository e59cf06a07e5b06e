#!/usr/bin/env bash
# The test suite on two torch versions: the newest that installs here (.venv, made by
# scripts/setup_env.sh) and the GPU machine's, torch 2.11 (.venv-torch211, made here once with
# requirements.txt and the pinned torch / torchvision). Extra args pass through to pytest, e.g.
#   scripts/test_torch_versions.sh tests/test_decode.py -x
# Override the second version with OLD_TORCH=2.11.0 OLD_TORCHVISION=0.26.0 OLD_VENV=.venv-torch211.
# Exits non-zero when either run fails; both always run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OLD_TORCH=${OLD_TORCH:-2.11.0}
OLD_TORCHVISION=${OLD_TORCHVISION:-0.26.0}
OLD_VENV=${OLD_VENV:-.venv-torch211}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

old_env() {
  if [ ! -x "$OLD_VENV/bin/python" ]; then
    echo "creating virtual environment in $OLD_VENV (torch $OLD_TORCH)" >&2
    "$PYTHON" -m venv "$OLD_VENV" || return 1
  fi
  # install once per requirements.txt and version pair (the stamp names what was installed)
  stamp="$(sha256sum requirements.txt | cut -d' ' -f1) torch==$OLD_TORCH torchvision==$OLD_TORCHVISION"
  if [ "$(cat "$OLD_VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
    "$OLD_VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt \
      "torch==$OLD_TORCH" "torchvision==$OLD_TORCHVISION" >&2 || {
      echo "installing torch $OLD_TORCH into $OLD_VENV failed (see pip's message above)" >&2; return 1; }
    echo "$stamp" > "$OLD_VENV/.installed"
  fi
  echo "$OLD_VENV/bin/python"
}

new_py=$(bash scripts/setup_env.sh | tail -n 1) || { echo "setting up .venv failed" >&2; exit 1; }
old_py=$(old_env | tail -n 1) || exit 1
status=0
summary=()
for py in "$new_py" "$old_py"; do
  version=$("$py" -c 'import torch; print(torch.__version__)')
  echo "=== torch $version ($py) ==="
  if "$py" -m pytest -q "$@"; then
    summary+=("torch $version: passed")
  else
    summary+=("torch $version: FAILED")
    status=1
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
