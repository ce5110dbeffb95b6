#!/usr/bin/env bash
# Build the book: install, execute every chapter (cached), write the site to _build/html.
# A chapter that fails stops the build at once: its cell and message are on the last line, it is
# not cached (the next run executes it again) and its old page is removed. reports/ (execution
# logs) never goes into the site.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
echo "build.sh: installing requirements.txt (pip, quiet)"
PIP_ROOT_USER_ACTION=ignore python -m pip install -q --disable-pip-version-check -r requirements.txt
export PRUNING_BOOK_QUIET=1
# Data from other projects lives beside this one (../shared/data), never inside it; chapters and
# tests read it from there (utils.lab.lm.load_text), and download it only where it is missing.
if [ -z "${PRUNING_BOOK_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export PRUNING_BOOK_DATA_DIR="$(cd ../shared/data && pwd)"
fi
rm -rf _build/html/reports
# 1. execute, chapter by chapter, what jupyter-cache does not hold yet; stop at the first failure
python scripts/build_execute.py
# 2. render: every chapter comes from the cache (an execution failure here would also stop it)
echo "build.sh: rendering the site (jupyter-book, warnings are errors)"
jupyter-book build . -W -n --keep-going -q
if [ -e _build/html/reports ]; then
  rm -rf _build/html/reports
  echo "build failed: a chapter failed to execute inside the Sphinx build (see above)" >&2
  exit 1
fi
# 3. the Colab copies that the Colab button opens (colab/, committed): rewrite those out of date
python scripts/colab_pages.py
echo "site: $(pwd)/_build/html/index.html (build.sh: $((SECONDS - start)) s)"
