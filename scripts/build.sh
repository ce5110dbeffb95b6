#!/usr/bin/env bash
# Build the book: install, execute every chapter (cached), write the site to _build/html.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
export PRUNING_BOOK_QUIET=1
jupyter-book build . -W -n --keep-going
echo "site: $(pwd)/_build/html/index.html"
