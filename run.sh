#!/usr/bin/env bash
# Set up the bundle's Python environment (.venv, pinned requirements) and run the main job or the tests.
#   bash run.sh main [options of scripts/demo.py]   # default data, MCPM vs plain training, Dice table
#   bash run.sh test [pytest options]               # the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
stamp="$venv/.requirements.sha256"
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "installing the pinned requirements into $venv ..."
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r requirements.txt
    echo "$wanted" > "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
    main) exec "$venv/bin/python" -m scripts.demo "$@" ;;
    test) exec "$venv/bin/python" -m pytest tests "$@" ;;
    *) echo "usage: bash run.sh main|test [options]" >&2; exit 2 ;;
esac
