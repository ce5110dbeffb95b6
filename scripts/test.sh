#!/usr/bin/env bash
# Run every test: unit and property tests of utils, every chapter under nbval, a strict book build.
set -euo pipefail
cd "$(dirname "$0")/.."
# First, what the tests need beyond Python: the browser test drives Debian's Chromium and its
# driver (a CJK font, so that the screenshots show the source's Chinese terms). Installed here
# where this runs as root with apt-get; otherwise the one command to run, and stop, at once.
have_browser() { command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; }
if ! have_browser; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing Chromium, chromedriver and a CJK font (apt-get) for the browser test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-wqy-zenhei >/dev/null
  else
    echo "test.sh: the browser test needs Chromium and chromedriver, which are not installed. Run:" >&2
    echo "  sudo apt-get install chromium chromium-driver fonts-wqy-zenhei" >&2
    echo "(or your system's packages for them), then this command again." >&2
    exit 1
  fi
fi
python -m pip install -q -r requirements.txt
export PRUNING_BOOK_QUIET=1
# Data from other projects lives beside this one (../shared/data), never inside it; chapters and
# tests read it from there (utils.lab.lm.load_text), and download it only where it is missing.
if [ -z "${PRUNING_BOOK_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export PRUNING_BOOK_DATA_DIR="$(cd ../shared/data && pwd)"
fi
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
# The browser test of the site just built (headless Chromium, installed above): pages,
# links, solutions, launch buttons, search, phone width; screenshots in _build/screenshots/.
PRUNING_BOOK_SITE=_build/html python -m pytest tests/test_site.py -q -k browser -p no:cacheprovider
echo "all tests passed in $((SECONDS - start)) s"
