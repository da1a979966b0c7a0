#!/usr/bin/env bash
# Prepare a fresh machine: virtualenv, vLLM (CPU build unless a GPU is present), this plugin,
# the CPU install fixes, and the bundled model. Re-running is cheap: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ -z "${KVEVICT_TARGET:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then KVEVICT_TARGET=gpu; else KVEVICT_TARGET=cpu; fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

stamp="$VENV/.kvevict-$KVEVICT_TARGET-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing vllm-kvevict[$KVEVICT_TARGET] into $VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[$KVEVICT_TARGET,model,test,bench]"
  if [ "$KVEVICT_TARGET" = cpu ]; then "$PY" scripts/cpu_fixes.py; fi
  touch "$stamp"
fi

"$PY" -m vllm_kvevict.model >/dev/null
