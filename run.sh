#!/usr/bin/env bash
# Set up the bundle's Python environments (pinned requirements) and run the main job or the tests.
#   bash run.sh main [options of scripts/experiments/demo.py]   # default data, MCPM vs plain, DiceCE and clean labels, Dice table and times
#   bash run.sh test [pytest options]               # lint (python -m tools.lint), then the test suite on every core (what CI runs)
#   bash run.sh benchmark [options of scripts/experiments/benchmark.py]  # MCPM against every baseline over noise settings and seeds
#   bash run.sh serve --studies DIR [--port N]    # MONAI Label app of the bundle (label review loop), offline on 127.0.0.1
# .venv (requirements.txt) runs everything; `test` also builds .venv-monailabel (requirements-monailabel.txt), the
# MONAI Label server that tests/test_monailabel.py starts (docs/monailabel.md says why it is a venv of its own).
set -euo pipefail
cd "$(dirname "$0")"

# setup_venv VENV REQUIREMENTS: create VENV and install REQUIREMENTS into it, unless its stamp says they are in.
setup_venv() {
    local venv=$1 requirements=$2
    local stamp="$venv/.requirements.sha256"
    local wanted
    wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ]; then
        "$(command -v python3.11 || command -v python3)" -m venv "$venv"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        echo "installing the pinned $requirements into $venv ..."
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -r "$requirements"
        echo "$wanted" > "$stamp"
    fi
}

venv=.venv
setup_venv "$venv" requirements.txt

command=${1:-}
shift || true
case "$command" in
    main) exec "$venv/bin/python" -m scripts.experiments.demo "$@" ;;
    benchmark) exec "$venv/bin/python" -m scripts.experiments.benchmark "$@" ;;
    serve)
        setup_venv .venv-monailabel requirements-monailabel.txt
        exec .venv-monailabel/bin/python -m tools.serve "$@" ;;
    test)
        setup_venv .venv-monailabel requirements-monailabel.txt
        "$venv/bin/python" -m tools.lint
        # one worker per core, each test file on one worker (its module fixtures are built once); `-n 0` runs serially
        exec "$venv/bin/python" -m pytest tests -n auto --dist loadfile "$@" ;;
    *) echo "usage: bash run.sh main|test|benchmark|serve [options]" >&2; exit 2 ;;
esac
