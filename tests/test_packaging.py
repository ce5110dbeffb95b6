"""The package installs what the chapters import, and a chapter needs nothing of the repository.

On Colab a reader opens one chapter, alone; the set-up cell installs this package and its
declared dependencies next to the runtime's own PyTorch. So every third-party import of every
chapter (code cells) and of every module of `utils` must be a declared dependency, torch and
torchvision excepted (the platform brings them; pyproject.toml says why they are not listed).
"""

import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from bookconf import PLACEHOLDER_URL, WHEEL_VAR, colab_cell_source

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
MODULES = sorted((ROOT / "utils").rglob("*.py"))
PLATFORM = {"torch", "torchvision"}  # brought by Colab / requirements.txt, never by this package
# import name -> distribution, where they differ and the distribution may not be installed here
KNOWN = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "torch_pruning": "torch-pruning",
    "PIL": "pillow",
    "pynvml": "nvidia-ml-py",
    "mlxtend": "mlxtend",
    "torchao": "torchao",
    "psutil": "psutil",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", d).group()) for d in deps}


def code_cells(path: Path) -> list[str]:
    from IPython.core.inputtransformer2 import TransformerManager  # turns !pip and %env into Python

    cells = json.loads(path.read_text())["cells"]
    return [
        TransformerManager().transform_cell("".join(c["source"]))
        for c in cells
        if c["cell_type"] == "code"
    ]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = (
        []
        if handler.type is None
        else [handler.type]
        if not isinstance(handler.type, ast.Tuple)
        else handler.type.elts
    )
    return handler.type is None or any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
        for n in names
    )


def imports(source: str) -> tuple[set[str], set[str]]:
    """Top-level modules imported by ``source``: (required, optional). An import inside a ``try``
    whose handler catches ImportError (or Exception) is optional: the code copes without it."""
    tree = ast.parse(source)
    optional_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            optional_nodes |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    required, optional = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for name in names:
            (optional if id(node) in optional_nodes else required).add(name.split(".")[0])
    return required, optional


def third_party(modules: set[str]) -> set[str]:
    return {
        m
        for m in modules
        if m not in sys.stdlib_module_names and m != "utils" and m != "__future__"
    }


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    installed = installed_distributions().get(module, [])
    return normalize(KNOWN.get(module) or (installed[0] if installed else module))


def all_imports() -> dict[str, tuple[set[str], set[str]]]:
    found = {}
    for path in CHAPTERS:
        req, opt = set(), set()
        for cell in code_cells(path):
            r, o = imports(cell)
            req |= r
            opt |= o
        found[f"chapters/{path.name}"] = (third_party(req), third_party(opt))
    for path in MODULES:
        r, o = imports(path.read_text())
        found[path.relative_to(ROOT).as_posix()] = (third_party(r), third_party(o))
    return found


def test_the_import_scanner_sees_magics_optional_imports_and_submodules():
    r, o = imports(
        "import a.b\nfrom c.d import e\ntry:\n    import f\nexcept ImportError:\n    pass\n"
        "from . import g\n"
    )
    assert r == {"a", "c"} and o == {"f"}
    assert "subprocess" in imports(code_cells_of_text("!pip install x\nimport subprocess"))[0]
    assert distribution("sklearn") == "scikit-learn" and distribution("yaml") == "pyyaml"


def code_cells_of_text(text: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(text)


def test_every_import_of_every_chapter_and_module_is_declared():
    deps = declared()
    missing = {
        f"{where}: import {m} (pip name {distribution(m)})"
        for where, (req, _) in all_imports().items()
        for m in req - PLATFORM
        if distribution(m) not in deps
    }
    assert not missing, "declare these in pyproject.toml [project] dependencies:\n" + "\n".join(
        sorted(missing)
    )


def test_torch_stays_undeclared_and_every_declared_dependency_is_used():
    deps = declared()
    assert not deps & PLATFORM, "torch/torchvision come with the platform (see pyproject.toml)"
    used = {distribution(m) for req, opt in all_imports().values() for m in req | opt}
    assert deps <= used, f"declared but imported nowhere: {sorted(deps - used)}"


# a chapter's code naming a file of the repository (the Colab cell names only the repository URL)
FORBIDDEN = re.compile(
    r"_config\.yml|_toc\.yml|references\.bib|bookconf|"
    r"[\"'](\.\./|\./)?(book|chapters|tests|scripts|utils)/"
)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_chapter_reads_a_repository_file(path):
    for cell in code_cells(path):
        if "google.colab" in cell:
            continue
        found = FORBIDDEN.search(cell)
        assert not found, (
            f"{path.name} reads {found.group()!r}: on Colab nothing of the repository is there"
        )


def test_the_repository_check_sees_what_it_must():
    assert FORBIDDEN.search('yaml.safe_load(open("../_config.yml"))')
    assert FORBIDDEN.search('Path("book/figures/a.png")') and FORBIDDEN.search(
        "from bookconf import x"
    )
    assert not FORBIDDEN.search("from utils.lab.data import load_mnist")


def test_utils_reads_only_its_own_files_at_import():
    """The modules chapters import read no file above the package (only bookconf does, for the
    build scripts; chapters never import it, checked above)."""
    for path in MODULES:
        text = path.read_text()
        assert "parent.parent" not in text and "_config.yml" not in text, path.name


def run_cell(env: dict, colab: bool, url: str | None = None) -> subprocess.CompletedProcess:
    prefix = (
        "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
        if colab
        else ""
    )
    clean = {k: v for k, v in os.environ.items() if k != WHEEL_VAR} | env
    return subprocess.run(
        [sys.executable, "-c", prefix + colab_cell_source(url)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_colab_cell_is_plain_python_and_does_nothing_outside_colab():
    for url in (PLACEHOLDER_URL, "https://github.com/someone/book"):
        source = colab_cell_source(url)
        compile(source, "colab cell", "exec")
        assert "google.colab" in source and url in source
        assert max(len(line) for line in source.splitlines()) <= 100
    done = run_cell({}, colab=False)
    assert done.returncode == 0 and done.stdout == done.stderr == ""


def test_the_colab_cell_stops_with_one_sentence_on_the_placeholder_url():
    done = run_cell({}, colab=True, url=PLACEHOLDER_URL)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "placeholder" in last and "pip install -e ." in last
    assert "Traceback" not in done.stderr


def test_the_colab_cell_stops_with_one_sentence_when_the_install_fails(tmp_path):
    done = run_cell({WHEEL_VAR: str(tmp_path / "missing.whl")}, colab=False)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "failed" in last and "run this cell again" in last
    assert "Traceback" not in done.stderr


ZOO = ROOT / "utils" / "lab" / "zoo_weights"


def test_the_wheel_holds_the_package_and_declares_the_dependencies(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from colab_rehearsal import build_wheel
    finally:
        sys.path.pop(0)
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {p.relative_to(ROOT).as_posix() for p in MODULES} <= names
    weights = {n for n in names if n.startswith("utils/lab/zoo_weights/")}
    assert {f"utils/lab/zoo_weights/{p.name}" for p in ZOO.glob("*")} == weights  # the zoo
    assert "utils/pruning/kernels.c" in names  # the compiled loops' source, built on first use
    shipped = names - weights - {"utils/pruning/kernels.c"}
    assert not [n for n in shipped if n.startswith("utils/") and not n.endswith(".py")], (
        "only code and the zoo are shipped"
    )
    requires = {
        normalize(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group())
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert requires == declared()


def utils_imports(path: Path) -> set[str]:
    """The ``utils...`` modules that one module imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "utils"
        ):
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "utils"}
    return found


@pytest.mark.parametrize(
    "part, forbidden", [("pruning", ("utils.lab", "utils.kit")), ("lab", ("utils.kit",))]
)
def test_the_library_imports_nothing_of_the_kits(part, forbidden):
    """utils.pruning (the library) imports nothing of utils.lab or utils.kit; utils.lab nothing
    of utils.kit. Third-party imports of the library: torch and numpy (pandas optional)."""
    for path in sorted((ROOT / "utils" / part).glob("*.py")):
        bad = sorted(m for m in utils_imports(path) if m.startswith(forbidden))
        assert not bad, f"utils/{part}/{path.name} imports {bad}"
    if part == "pruning":
        third = set()
        for path in (ROOT / "utils" / "pruning").glob("*.py"):
            required, optional = imports(path.read_text())
            third |= third_party(required | optional)
        assert third <= {"torch", "numpy", "pandas"}, sorted(third)  # pandas: sparsity_report only


def test_the_import_rule_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from utils.kit.plots import x\n")
    assert utils_imports(bad) == {"utils.kit.plots.x"}


def test_nothing_in_the_package_reads_the_book_configuration():
    assert not (ROOT / "utils" / "book.py").exists()
    assert not [p for p in MODULES if "yaml" in p.read_text()]
