#!/usr/bin/env bash
# Run every test: unit and property tests of utils, every chapter under nbval, a strict book build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
export PRUNING_BOOK_QUIET=1
start=$SECONDS
python -m pytest tests/ -q
shopt -s nullglob
chapters=(chapters/*.ipynb)
if (( ${#chapters[@]} )); then
  python -m pytest --nbval-lax -p no:cacheprovider -q "${chapters[@]}"
fi
# The chapters ran just above; the strict build renders their committed outputs (warnings are errors).
python scripts/strict_config.py >/dev/null
jupyter-book build . -W -n --keep-going --config _build/strict_config.yml -q
echo "all tests passed in $((SECONDS - start)) s"
