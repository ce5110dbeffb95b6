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
  # The Colab rehearsal, which is also the nbval run: each committed chapter, copied alone into an
  # empty folder, runs under pytest --nbval-lax in a clean venv holding only torch, torchvision and
  # what Colab preinstalls; its set-up cell installs a wheel built from this checkout (cached venv).
  python scripts/colab_rehearsal.py --executor nbval "${chapters[@]}"
fi
# The chapters ran just above; the strict build renders their committed outputs (warnings are errors).
python scripts/strict_config.py >/dev/null
jupyter-book build . -W -n --keep-going --config _build/strict_config.yml -q
# The browser test of the site just built (headless Chromium, installed by .ci/run): pages,
# links, solutions, launch buttons, search, phone width; screenshots in _build/screenshots/.
PRUNING_BOOK_SITE=_build/html python -m pytest tests/test_site.py -q -k browser -p no:cacheprovider
echo "all tests passed in $((SECONDS - start)) s"
