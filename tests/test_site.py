"""The site as readers see it, and a build that fails loudly.

Two parts:

* always (fast): ``scripts/build_execute.py`` stops at the first failing cell of a deliberately
  broken chapter in a temporary book, names chapter, cell and message on its last line, caches
  nothing for it (a rerun executes it again); the build-time fixes of ``book/_ext/book_site.py``
  (exercise numbers per chapter, short tracebacks without local paths) on small inputs;
* the browser test, when ``PRUNING_BOOK_SITE`` names a freshly built site (``scripts/test.sh``
  sets it after its strict build): headless Chromium (Debian's ``chromium`` and
  ``chromium-driver``, installed by ``.ci/run``) through selenium, against the site served on
  127.0.0.1. Every page loads without a console error; no error box outside cells meant to raise;
  no local path in an output; no broken local link, anchor or image; solutions collapsed until
  clicked; exercises numbered per chapter; launch buttons with the repository of
  ``_config.yml`` (Colab opens ``colab/``); one search field; search finds key terms (English and
  Chinese) with snippets from the text; no horizontal overflow at 390 px; MathJax markup present
  (the script comes from a CDN, unreachable offline: the markup is checked, not the rendering).
  It writes two screenshots of a chapter page (desktop and 390 px) to ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import load_file

ROOT = Path(__file__).resolve().parent.parent
SITE = os.environ.get("PRUNING_BOOK_SITE")
SEARCH_TERMS = ["pruning", "sparsity", "LeNet", "lottery", "quantization", "剪枝"]


book_site = load_file(ROOT / "book" / "_ext" / "book_site.py")


# --- a build that fails loudly ------------------------------------------------------------------


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = list(cells)
    return nb


def test_a_broken_chapter_stops_the_build_at_once(tmp_path):
    code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell
    (tmp_path / "chapters").mkdir()
    nbformat.write(
        _notebook(
            md("# Fine"),
            code("x = 1"),
            code("raise ValueError('meant to fail')", metadata={"tags": ["raises-exception"]}),
            code("print(x)"),
        ),
        tmp_path / "chapters" / "01-fine.ipynb",
    )
    nbformat.write(
        _notebook(
            md("# Broken"),
            code("import time"),
            code("assert 1 + 1 == 3, 'the claim does not hold'"),
            code("time.sleep(120)"),
        ),
        tmp_path / "chapters" / "02-broken.ipynb",
    )
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        "  - file: chapters/01-fine\n  - file: chapters/02-broken\n"
    )
    (tmp_path / "_config.yml").write_text(
        "title: t\nexecute:\n  execute_notebooks: cache\n  timeout: 200\n"
    )
    (tmp_path / "intro.md").write_text("# Intro\n")
    stale = tmp_path / "_build" / "html" / "chapters" / "02-broken.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("an old page")

    def build():
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_execute.py"), "--book", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=110,
        )
        return run, time.perf_counter() - t0

    run, seconds = build()
    assert run.returncode == 1
    assert seconds < 100, "it must not wait for the cells after the failing one"
    last = run.stderr.strip().splitlines()[-1]
    assert "chapters/02-broken.ipynb" in last and "cell 3" in last, last
    assert "AssertionError: the claim does not hold" in last, last
    assert "01-fine.ipynb: executed" in run.stdout
    assert not stale.exists(), "the failed chapter's old page is removed"
    run, _ = build()  # a rerun executes the broken chapter again; the good one is cached
    assert run.returncode == 1 and "02-broken.ipynb: executing" in run.stdout
    assert "01-fine.ipynb: cached" in run.stdout


def test_build_sh_runs_the_executor_before_sphinx_and_never_publishes_reports():
    script = (ROOT / "scripts" / "build.sh").read_text()
    assert script.index("build_execute.py") < script.index("jupyter-book build")
    assert "reports" in script
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["sphinx"]["config"].get("nb_execution_raise_on_error") is True


# --- build-time fixes, on small inputs ------------------------------------------------------------


def test_exercises_are_numbered_per_chapter():
    class Env:
        toc_fignumbers = {
            "chapters/05-applications": {
                "exercise": {"ex-5-2": (18,), "ex-5-1": (17,)},
                "figure": {"f": (3,)},
            },
            "chapters/04-1-unstructured": {"exercise": {"a": (9,), "b": (10,)}},
            "book/intro": {"exercise": {"x": (1,)}},
        }

    env = Env()
    book_site.renumber_exercises(None, env)
    assert env.toc_fignumbers["chapters/05-applications"]["exercise"] == {
        "ex-5-1": (5, 1),
        "ex-5-2": (5, 2),
    }
    assert env.toc_fignumbers["chapters/05-applications"]["figure"] == {"f": (3,)}
    assert env.toc_fignumbers["chapters/04-1-unstructured"]["exercise"] == {
        "a": (4, 1, 1),
        "b": (4, 1, 2),
    }
    assert env.toc_fignumbers["book/intro"]["exercise"] == {"x": (1,)}


TRACEBACK = """\
---------------------------------------------------------------------------
RuntimeError                              Traceback (most recent call last)
Cell In[6], line 3
      1 import torch
----> 3 model(torch.randn(64, 1, 28, 28))

File ~/.pyenv/versions/3.11.7/lib/python3.11/site-packages/torch/nn/modules/module.py:1783, in Module._wrapped_call_impl(self, *args, **kwargs)
-> 1783     return self._call_impl(*args, **kwargs)

File /work/venv/lib/python3.11/site-packages/torch/nn/modules/module.py:1794, in Module._call_impl(self, *args, **kwargs)
-> 1794     return forward_call(*args, **kwargs)

Cell In[3], line 19, in Net.forward(self, x)
---> 19     x = x.view(-1, 16 * 5 * 5)

File /root/.local/lib/python3.11/site-packages/torch/nn/functional.py:12, in linear(x)
---> 12     raise RuntimeError("shape mismatch")

RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x256 and 400x120)
"""


def test_tracebacks_show_the_cells_the_last_frame_and_the_message_without_paths():
    short = book_site.short_traceback(book_site.clean_paths(TRACEBACK, ["/work/main"]))
    assert "Cell In[6], line 3" in short and "Cell In[3], line 19" in short
    assert "File torch/nn/functional.py:12, in linear(x)" in short  # the last library frame
    assert "_call_impl" not in short and "2 frames inside library code" in short
    assert short.rstrip().endswith("(64x256 and 400x120)")
    for path in ("/work", "/root", "~/", "site-packages", ".pyenv"):
        assert path not in short
    assert book_site.short_traceback("not a traceback") == "not a traceback"


def test_local_paths_leave_outputs():
    text = (
        "/work/main/utils/lab/quantize.py:40: DeprecationWarning: x\n"
        "/tmp/ipykernel_123/456.py:2: UserWarning: y\n/home/ann/data/file.txt"
    )
    clean = book_site.clean_paths(text, ["/work/main"])
    assert clean.splitlines() == [
        "utils/lab/quantize.py:40: DeprecationWarning: x",
        "<cell>:2: UserWarning: y",
        "~/data/file.txt",
    ]


# --- the browser test -----------------------------------------------------------------------------

browser = pytest.mark.skipif(
    not SITE,
    reason="set PRUNING_BOOK_SITE=_build/html (scripts/test.sh does, after building the site)",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    root = Path(SITE).resolve()
    assert (root / "index.html").exists(), f"no site at {root}: build it first"
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--lang=en-US",
        # offline here: every host but the local server fails at once, no DNS wait
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not Path(chromedriver).exists():
        pytest.fail(
            "no chromedriver: install Debian's chromium and chromium-driver "
            "(scripts/test.sh does as root: apt-get install chromium chromium-driver fonts-wqy-zenhei)"
        )
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _pages(root: Path) -> list[str]:
    skip = ("_static/", "_sources/", "_images/", "genindex.html", "search.html")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if not p.relative_to(root).as_posix().startswith(skip)
        and p.name not in ("genindex.html", "search.html")
    )


def _chapter_pages(root: Path) -> list[str]:
    return [p for p in _pages(root) if p.startswith("chapters/")]


def _console_errors(drv, base: str) -> list[str]:
    errors = []
    for entry in drv.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        external = re.search(r"https?://(?!127\.0\.0\.1)", message) and "net::ERR_" in message
        if not external:  # CDNs (MathJax, fonts) are unreachable offline; anything else counts
            errors.append(message)
    return errors


def _open(drv, url: str, width: int = 1280, height: int = 900):
    """Load ``url`` at a desktop window size or, below 600 px, as a phone (mobile viewport)."""
    if width < 600:
        drv.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
        )
    else:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        drv.set_window_size(width, height)
    drv.get(url)
    drv.execute_script("return document.readyState")
    time.sleep(0.2)


@browser
def test_browser_every_page_loads_cleanly(site, driver):
    root, base = site
    problems = []
    for page in _pages(root):
        _open(driver, f"{base}/{page}")
        errors = _console_errors(driver, base)
        if errors:
            problems.append(f"{page}: console: {errors}")
        report = driver.execute_script(r"""
            const raising = (el) => !!el.closest('.tag_raises-exception');
            const out = {errors: [], paths: [], searchBars: 0, mathScript: false, math: 0};
            for (const el of document.querySelectorAll(
                '.output.error, .output.traceback, div.traceback, pre.traceback'))
              if (!raising(el)) out.errors.push(el.textContent.slice(0, 200));
            for (const el of document.querySelectorAll('.cell_output pre, .output pre'))
              if (!raising(el) && /Traceback \(most recent call last\)/.test(el.textContent))
                out.errors.push(el.textContent.slice(0, 200));
            for (const el of document.querySelectorAll('.cell_output, .output')) {
              const m = el.textContent.match(
                /(\/(root|home|work|tmp|usr)\/[^\s'"]+|site-packages|\.pyenv|\/venv\/)/);
              if (m) out.paths.push(m[0]);
            }
            const visible = (el) => !!(el.offsetWidth || el.offsetHeight ||
                                       el.getClientRects().length);
            out.searchBars = [...document.querySelectorAll(
                '.search-button-field, .bd-search, form.bd-search')]
                .filter((el) => visible(el) && !el.closest('.search-button__wrapper')).length;
            const math = [...document.querySelectorAll('span.math, div.math')];
            out.math = math.length;  // TeX that MathJax (from its CDN) typesets: \( \) or \[ \]
            out.badMath = math.filter((el) => !/^\s*(\\\(|\\\[)[^]*(\\\)|\\\])\s*$/
                .test(el.textContent)).map((el) => el.textContent.slice(0, 40));
            out.mathScript = [...document.scripts].some((s) => /mathjax/i.test(s.src));
            return out;""")
        if report["errors"]:
            problems.append(
                f"{page}: error box outside a raises-exception cell: {report['errors'][:2]}"
            )
        if report["paths"]:
            problems.append(f"{page}: local paths in outputs: {sorted(set(report['paths']))[:5]}")
        if report["searchBars"] > 1:
            problems.append(f"{page}: {report['searchBars']} search bars")
        if report["badMath"]:
            problems.append(f"{page}: math without MathJax delimiters: {report['badMath'][:3]}")
        if report["math"] and not report["mathScript"]:
            problems.append(f"{page}: math markup but no MathJax script")
    assert not problems, "\n".join(problems)


@browser
def test_browser_no_broken_local_link_or_image(site, driver):
    root, base = site
    targets, problems = {}, []
    for page in _pages(root):
        _open(driver, f"{base}/{page}")
        found = driver.execute_script("""
            const out = [];
            for (const a of document.querySelectorAll('a[href]')) out.push(['link', a.href]);
            for (const i of document.querySelectorAll('img')) out.push(
                ['img', i.currentSrc || i.src, i.complete && i.naturalWidth > 0]);
            for (const l of document.querySelectorAll('link[href]')) out.push(['css', l.href]);
            for (const s of document.querySelectorAll('script[src]')) out.push(['js', s.src]);
            return out;""")
        for kind, url, *loaded in found:
            if not url.startswith(base):
                continue
            if kind == "img" and not loaded[0]:
                problems.append(f"{page}: image not shown: {url}")
            targets.setdefault(url, page)
    ids_cache: dict[str, set[str]] = {}
    for url, page in sorted(targets.items()):
        path, _, fragment = url[len(base) :].partition("#")
        path = urllib.parse.unquote(path.split("?")[0]) or "/"
        try:
            with urllib.request.urlopen(base + urllib.parse.quote(path)) as response:
                body = response.read()
        except Exception as err:  # noqa: BLE001 (any failure is a broken link)
            problems.append(f"{page}: broken link {url} ({err})")
            continue
        if fragment and path.endswith(".html"):
            if path not in ids_cache:
                ids_cache[path] = set(re.findall(rb'id="([^"]+)"', body))
            if urllib.parse.unquote(fragment).encode() not in ids_cache[path]:
                problems.append(f"{page}: no anchor #{fragment} in {path}")
    print(f"{len(targets)} local links and assets checked on {len(_pages(root))} pages")
    assert len(targets) > 50
    assert not problems, "\n".join(problems[:30])


@browser
def test_browser_solutions_collapsed_until_clicked_and_exercises_numbered(site, driver):
    from selenium.webdriver.common.by import By

    root, base = site
    colab_pages = load_file(ROOT / "scripts" / "colab_pages.py")
    problems, solutions = [], 0
    for page in _chapter_pages(root):
        _open(driver, f"{base}/{page}")
        titles = driver.execute_script("""
            return [...document.querySelectorAll('div.exercise[id]')].map((e) =>
                [e.id, (e.querySelector('.admonition-title') || e).textContent.trim()]);""")
        for ident, title in titles:
            if re.fullmatch(r"ex-\d+-\d+", ident):
                want = f"Exercise {colab_pages.exercise_number(ident)}"
                if not title.startswith(want):
                    problems.append(f"{page}: {ident} is titled {title[:40]!r}, not {want!r}")
        for sol in driver.find_elements(By.CSS_SELECTOR, "div.solution.dropdown"):
            solutions += 1
            body = sol.find_elements(By.CSS_SELECTOR, ".section, .cell, p:not(.admonition-title)")
            if any(el.is_displayed() for el in body):
                problems.append(f"{page}: solution {sol.get_attribute('id')} open before a click")
                continue
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", sol)
            button = sol.find_elements(By.CSS_SELECTOR, "button.toggle-button, .admonition-title")
            driver.execute_script("arguments[0].click();", button[0])
            time.sleep(0.3)
            if not any(el.is_displayed() for el in body):
                problems.append(f"{page}: solution {sol.get_attribute('id')} does not open")
    assert solutions > 10, f"only {solutions} solutions found"
    assert not problems, "\n".join(problems[:30])


@browser
def test_browser_launch_buttons_point_at_the_repository(site, driver):
    root, base = site
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]["url"].rstrip("/")
    branch = config["repository"].get("branch", "main")
    org_repo = repo.split("github.com/")[1]
    problems = []
    for page in _chapter_pages(root):
        _open(driver, f"{base}/{page}")
        links = driver.execute_script("""
            return [...document.querySelectorAll('.dropdown-launch-buttons a, ' +
                '.article-header-buttons a, .header-article-items a')].map((a) => a.href);""")
        stem = Path(page).stem
        colab = (
            f"https://colab.research.google.com/github/{org_repo}/blob/{branch}/colab/{stem}.ipynb"
        )
        if colab not in links:
            problems.append(f"{page}: no Colab button to {colab}: {links}")
        if not (ROOT / "colab" / f"{stem}.ipynb").exists():
            problems.append(f"{page}: colab/{stem}.ipynb does not exist")
        if not any(link.startswith(f"https://mybinder.org/v2/gh/{org_repo}/") for link in links):
            problems.append(f"{page}: no Binder button for {org_repo}")
        if not any(link.rstrip("/") == repo for link in links):
            problems.append(f"{page}: no repository button to {repo}")
    assert _chapter_pages(root) and not problems, "\n".join(problems)


@browser
def test_browser_search_finds_key_terms_with_real_snippets(site, driver):
    root, base = site
    problems = []
    for term in SEARCH_TERMS:
        _open(driver, f"{base}/search.html?q={urllib.parse.quote(term)}")
        deadline = time.time() + 20
        results = []
        while time.time() < deadline:
            results = driver.execute_script("""
                const status = document.querySelector('#search-results .search-summary, ' +
                    '#search-results p');
                const items = [...document.querySelectorAll('#search-results ul.search li')];
                if (!status || /Searching|Preparing/.test(status.textContent)) return null;
                return items.map((li) => [li.querySelector('a').textContent,
                    (li.querySelector('p.context') || {textContent: ''}).textContent]);""")
            if results is not None and (results or time.time() > deadline - 15):
                break
            time.sleep(0.25)
        results = results or []
        errors = _console_errors(driver, base)
        if errors:
            problems.append(f"search {term!r}: console: {errors}")
        if not results:
            problems.append(f"search for {term!r} finds nothing")
            continue
        # snippets come from the prose: no launch-button text, never empty
        time.sleep(1.0)
        results = driver.execute_script("""
            return [...document.querySelectorAll('#search-results ul.search li')].map((li) =>
                [li.querySelector('a').textContent,
                 (li.querySelector('p.context') || {textContent: ''}).textContent]);""")
        for title, snippet in results:
            if len(snippet.strip(" .")) < 40 or re.match(r"^\W*(Binder|Colab|JupyterHub)", snippet):
                problems.append(f"search {term!r}: {title!r} has snippet {snippet[:60]!r}")
    assert not problems, "\n".join(problems)


@browser
def test_browser_phone_width_has_no_horizontal_overflow_and_screenshots(site, driver):
    root, base = site
    shots = Path(SITE).resolve().parent / "screenshots"
    shots.mkdir(exist_ok=True)
    problems = []
    chapters = _chapter_pages(root)
    for page in _pages(root):
        _open(driver, f"{base}/{page}", width=390, height=844)
        report = driver.execute_script("""
            const width = document.documentElement.clientWidth;
            const prose = [...document.querySelectorAll(
                'article p, article li, article h1, article h2, article h3, article dd')]
                .filter((el) => !el.closest('pre, table, .cell_output, .highlight, mjx-container'))
                .filter((el) => el.getBoundingClientRect().right > width + 1)
                .map((el) => el.textContent.trim().slice(0, 60));
            return {page: document.scrollingElement.scrollWidth - width, prose: prose};""")
        if report["page"] > 1:
            problems.append(f"{page}: page {report['page']} px wider than a 390 px screen")
        if report["prose"]:
            problems.append(f"{page}: prose wider than the screen: {report['prose'][:3]}")
    page = next((p for p in chapters if "04-1" in p), chapters[0])
    _open(driver, f"{base}/{page}", width=1280, height=900)
    driver.save_screenshot(str(shots / "chapter-desktop.png"))
    _open(driver, f"{base}/{page}", width=390, height=844)
    driver.save_screenshot(str(shots / "chapter-phone.png"))
    assert (shots / "chapter-desktop.png").stat().st_size > 10_000
    assert not problems, "\n".join(problems)
