#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): `bash bench/gpu_check.sh` on a machine with a GPU and torch installed
# (nothing is installed here: the GPU image's python is used when there is no .venv); `bash bench/gpu_check.sh --dry
# --device cpu` checks the script itself on tiny shapes. Results: build/gpu-check/gpu_check.{json,md}, or --out DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
python=python3
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
exec "$python" -m bench.gpu_check "$@"
