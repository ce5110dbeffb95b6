#!/usr/bin/env bash
# The README's test command: set-up, then every test, then a summary of what ran and how long.
#   1. the fast lane (unit, property, style, packaging, book and course-kit tests), run in a clean
#      copy of the repository: the files git tracks or would add, nothing ignored or built;
#   2. the grader end to end (sandboxes, time-outs, tricks; tests marked heavy);
#   3. the Colab rehearsal, which is also the nbval run: every chapter alone in a clean venv,
#      each one's time printed, a chapter over 3 minutes named, one over the budget failed;
#   4. the strict book build (warnings are errors) and the browser test of the site it wrote.
# Every stage runs even when an earlier one failed; the summary at the end says which failed and
# where its log is (_build/test-logs/).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

# What the tests need beyond Python, decided in the first seconds: the browser test drives
# Debian's Chromium and its driver (a CJK font, so that the screenshots show the source's Chinese
# terms). Installed here where this runs as root with apt-get; otherwise the one command to run.
have_browser() { command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; }
if ! have_browser; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing Chromium, chromedriver and a CJK font (apt-get) for the browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-wqy-zenhei; } >/dev/null || { echo "test.sh: apt-get failed (above)" >&2; exit 1; }
  else
    echo "test.sh: the browser test needs Chromium and chromedriver, which are not installed. Run:" >&2
    echo "  sudo apt-get install chromium chromium-driver fonts-wqy-zenhei" >&2
    echo "(or your system's packages for them), then this command again." >&2
    exit 1
  fi
fi
command -v git >/dev/null || { echo "test.sh: git is needed (the clean copy of stage 1)" >&2; exit 1; }
echo "test.sh: installing requirements.txt (pip, quiet)"
PIP_ROOT_USER_ACTION=ignore python -m pip install -q --disable-pip-version-check -r requirements.txt \
  || { echo "test.sh: pip install -r requirements.txt failed (above)" >&2; exit 1; }
export PRUNING_BOOK_QUIET=1
# Data from other projects lives beside this one (../shared/data), never inside it; chapters and
# tests read it from there (utils.lab.lm.load_text), and download it only where it is missing.
if [ -z "${PRUNING_BOOK_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export PRUNING_BOOK_DATA_DIR="$(cd ../shared/data && pwd)"
fi

logs=_build/test-logs
rm -rf "$logs" && mkdir -p "$logs"
summary=() failed=()
stage() {  # stage NAME LOG COMMAND...: run it, output to the screen and to the log, time it
  local name=$1 log=$logs/$2 t0=$SECONDS
  shift 2
  echo
  echo "== $name"
  if "$@" 2>&1 | tee "$log"; then status=ok; else status="FAILED (log: $log)"; failed+=("$name"); fi
  summary+=("$(printf '  %-44s %5d s  %s' "$name" $((SECONDS - t0)) "$status")")
}

fast_lane_in_a_clean_copy() {
  local copy
  copy=$(mktemp -d "${TMPDIR:-/tmp}/pruning-book-clean-XXXXXX")
  # the files git tracks (as they are now) and the untracked ones it would add; nothing ignored
  git ls-files -z --cached --others --exclude-standard | python -c '
import os, shutil, sys
dst = sys.argv[1]
names = [n for n in sys.stdin.buffer.read().decode().split("\0") if n]
if not names:
    sys.exit("git listed no files")
for rel in names:
    if os.path.isfile(rel):
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(rel, os.path.join(dst, rel))' "$copy" \
    && (cd "$copy" && git init -q && git add -A) \
    || { echo "test.sh: could not make the clean copy (git ls-files, copy, git add)" >&2; rm -rf "$copy"; return 1; }
  # the package must come from the copy (the working directory and PYTHONPATH come first)
  (cd "$copy" && PYTHONPATH="$copy" python -c 'import sys, utils; sys.exit(not utils.__file__.startswith(sys.argv[1]))' "$copy") \
    || { echo "test.sh: the clean copy does not import its own utils" >&2; rm -rf "$copy"; return 1; }
  echo "a clean copy in $copy (its own git index; the package imported from there)"
  (cd "$copy" && env -u PRUNING_BOOK_SITE PYTHONPATH="$copy" python -m pytest -m "not heavy" -q -p no:cacheprovider)
  local rc=$?
  rm -rf "$copy"
  return $rc
}

strict_build() {
  # the chapters ran in stage 3; this renders their committed outputs (warnings are errors)
  python scripts/strict_config.py >/dev/null &&
    jupyter-book build . -W -n --keep-going --config _build/strict_config.yml -q
}

stage "1. fast lane (clean copy)" fast-lane.log fast_lane_in_a_clean_copy
stage "2. grader end to end (-m heavy)" heavy.log python -m pytest -m heavy -q tests/
# A chapter over 3 minutes fails, named in the summary (a reader's busy laptop or a Colab CPU must
# fit it). PRUNING_BOOK_CHAPTER_BUDGET (seconds) raises the limit: .ci/run sets 8 minutes, since
# this project's CI machines differ in speed by up to three times.
stage "3. Colab rehearsal + nbval (per chapter)" rehearsal.log \
  python scripts/colab_rehearsal.py --executor nbval --target 120 \
    --budget "${PRUNING_BOOK_CHAPTER_BUDGET:-180}" --times "$logs/chapters.txt" chapters/*.ipynb
stage "4. strict book build" build.log strict_build
# The browser test of the site just built (headless Chromium, installed above): pages, links,
# solutions, launch buttons, search, phone width; screenshots in _build/screenshots/.
browser_test() {
  if [[ " ${failed[*]} " == *" 4. strict book build "* ]]; then
    echo "skipped: the strict build failed, so _build/html is not this checkout's site"
    return 1
  fi
  PRUNING_BOOK_SITE=_build/html python -m pytest tests/test_site.py -q -k browser -p no:cacheprovider
}
stage "5. browser test" browser.log browser_test

echo
echo "== summary (scripts/test.sh, $((SECONDS - start)) s in all)"
printf '%s\n' "${summary[@]}"
if [ -f "$logs/chapters.txt" ]; then
  echo "  chapter times (Colab rehearsal):"
  sed 's/^/    /' "$logs/chapters.txt"
fi
if (( ${#failed[@]} )); then
  echo "FAILED: ${failed[*]}; each stage's log is in $logs/" >&2
  exit 1
fi
echo "all tests passed in $((SECONDS - start)) s"
