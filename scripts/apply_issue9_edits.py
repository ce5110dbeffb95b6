"""Issue 9's edits to the chapter notebooks, applied by matching cell text (run once, at the end).

    python scripts/apply_issue9_edits.py [chapters/*.ipynb]     # default: every chapter
    python scripts/apply_issue9_edits.py --check [...]          # say what would change, write nothing

1. Every chapter that trains with ``utils.training.train``: its set-up cell imports ``pick_device``
   and sets ``device = pick_device()`` once, and every ``train(...)`` call gets ``device=device``
   (the loop runs on a GPU when there is one; the model comes back to the CPU afterwards).
2. Every chapter that loads MNIST: a one-line switch to full MNIST, as a comment in its set-up cell.
3. Chapter 8: int8 through ``utils.quantize.int8_dynamic`` (torchao where it runs, the deprecated
   torch.ao behind a guard) and its latency measured next to fp32, per API, on the CPU.
4. Chapters 5 and 6: their GPU measurements next to the CPU ones, in one table.
5. Every chapter: the Colab set-up cell becomes ``utils.book.colab_cell_source()`` (as
   scripts/execute_chapters.py would make it).

Idempotent: a second run changes nothing. A target cell that is missing stops the script with
an error naming it (the chapter changed: update the edit). Outputs are left as they are: execute
the chapters afterwards (scripts/execute_chapters.py), which also refreshes their Colab cell.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.book import COLAB_TAG, colab_cell_source  # noqa: E402
MAX = 100
DATA_LINE = '# import os; os.environ["PRUNING_BOOK_DATA"] = "mnist"  # full MNIST (slower), not the subset'
DEVICE_LINE = 'device = pick_device()  # a CUDA GPU when there is one, else the CPU: training runs there'


class EditError(RuntimeError):
    pass


def src(cell: dict) -> str:
    return "".join(cell["source"])


def set_src(cell: dict, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def code_cell(text: str, cell_id: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [],
            "source": text.splitlines(keepends=True)}


def markdown_cell(text: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text.splitlines(keepends=True)}


def find(nb: dict, name: str, kind: str, *needles: str) -> int:
    """Index of the one cell of ``kind`` holding every needle; an error if none or several."""
    hits = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == kind and all(n in src(c) for n in needles)]
    if len(hits) != 1:
        raise EditError(f"{name}: expected one {kind} cell with {needles!r}, found {len(hits)}")
    return hits[0]


def has_cell(nb: dict, cell_id: str) -> bool:
    return any(c.get("id") == cell_id for c in nb["cells"])


# ---------------------------------------------------------------- 1, 2: set-up cell and train calls

def setup_index(nb: dict, name: str) -> int:
    cells = nb["cells"]
    colab = [i for i, c in enumerate(cells) if "google.colab" in src(c)]
    if not colab:
        raise EditError(f"{name}: no Colab set-up cell")
    for i in range(colab[0] + 1, len(cells)):
        if cells[i]["cell_type"] == "code" and re.search(r"^from utils|^import utils", src(cells[i]), re.M):
            return i
    raise EditError(f"{name}: no set-up cell (the first code cell importing utils)")


def parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except SyntaxError:
        return None


def imports_train(nb: dict) -> bool:
    for c in nb["cells"]:
        tree = parse(src(c)) if c["cell_type"] == "code" else None
        for node in ast.walk(tree) if tree else []:
            if isinstance(node, ast.ImportFrom) and node.module == "utils.training" and \
                    any(a.name == "train" for a in node.names):
                return True
    return False


def _col(line: str, byte_col: int) -> int:
    """ast column offsets count UTF-8 bytes; strings count characters."""
    return len(line.encode()[:byte_col].decode())


def add_device_to_train_calls(text: str) -> str:
    """``train(...)`` -> ``train(..., device=device)`` where ``device`` is not passed yet."""
    tree = parse(text)
    if tree is None:
        return text
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "train" and not any(k.arg in ("device", None) for k in n.keywords)]
    lines = text.split("\n")
    for call in sorted(calls, key=lambda n: (n.end_lineno, n.end_col_offset), reverse=True):
        row = call.end_lineno - 1
        line = lines[row]
        close = _col(line, call.end_col_offset) - 1  # the closing parenthesis
        before = "\n".join(lines[:row] + [line[:close]]).rstrip()  # what precedes it, maybe on earlier lines
        if before.endswith("("):
            insert = "device=device"
        elif before.endswith(","):
            insert = " device=device"
        else:
            insert = ", device=device"
        new = line[:close] + insert + line[close:]
        if not line[:close].strip():  # the parenthesis stands alone: add the argument above it
            indent = " " * (len(lines[row - 1]) - len(lines[row - 1].lstrip()))
            lines[row - 1] += "" if before.endswith(",") else ","
            lines.insert(row, indent + "device=device,")
            continue
        if len(new) > MAX:  # continue on a new line, aligned after the opening parenthesis
            open_line = lines[call.func.end_lineno - 1]
            indent = " " * (_col(open_line, call.func.end_col_offset) + 1)
            new = line[:close].rstrip() + ("" if before.endswith(",") else ",") + "\n" + indent + \
                "device=device" + line[close:]
        lines[row] = new
    return "\n".join(lines)


def add_import(text: str, module: str, names: list[str], after_module: str | None = None) -> str:
    """Add ``names`` to ``from module import ...`` (a one-line import there is extended), else a new
    line after the import of ``after_module`` (or after the last import)."""
    tree = parse(text)
    lines = text.split("\n")
    existing = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == module]
    have = {a.name for n in existing for a in n.names}
    missing = [n for n in names if n not in have]
    if not missing:
        return text
    one_line = [n for n in existing if n.lineno == n.end_lineno and all(a.asname is None for a in n.names)]
    if one_line:
        node = one_line[0]
        merged = f"from {module} import " + ", ".join(sorted({a.name for a in node.names} | set(missing)))
        if len(merged) <= MAX:
            lines[node.lineno - 1] = merged
            return "\n".join(lines)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    anchor = [n for n in imports if isinstance(n, ast.ImportFrom) and n.module == after_module] or imports
    row = max(n.end_lineno for n in anchor)
    lines.insert(row, f"from {module} import " + ", ".join(sorted(missing)))
    return "\n".join(lines)


def add_after_imports(text: str, new_lines: list[str]) -> str:
    tree = parse(text)
    row = max(n.end_lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    lines = text.split("\n")
    return "\n".join(lines[:row] + [""] + new_lines + lines[row:])


def edit_setup_and_training(nb: dict, name: str) -> list[str]:
    changes = []
    code = "\n".join(src(c) for c in nb["cells"] if c["cell_type"] == "code")
    trains, mnist = imports_train(nb), "load_mnist(" in code
    if not (trains or mnist):
        return changes
    i = setup_index(nb, name)
    cell = nb["cells"][i]
    text = before = src(cell)
    if trains:
        text = add_import(text, "utils.training", ["pick_device"], after_module="utils.surgery")
    new_lines = []
    if mnist and "PRUNING_BOOK_DATA" not in text:
        new_lines.append(DATA_LINE)
    if trains and "pick_device()" not in text:
        new_lines.append(DEVICE_LINE)
    if new_lines:
        text = add_after_imports(text, new_lines)
    if text != before:
        set_src(cell, text)
        changes.append(f"set-up cell {i}: " + ", ".join(
            w for w, on in (("data switch", DATA_LINE in new_lines), ("device = pick_device()", DEVICE_LINE in
                                                                       new_lines)) if on) or "import")
    if trains:
        for j, c in enumerate(nb["cells"]):
            tags = c.get("metadata", {}).get("tags", [])
            if c["cell_type"] != "code" or "stub" in tags or "solution" in tags:
                continue  # exercise cells are graded on their own, without the set-up cell's `device`
            old = src(c)
            new = add_device_to_train_calls(old)
            if new != old:
                set_src(c, new)
                changes.append(f"cell {j}: {new.count('device=device') - old.count('device=device')} train() "
                               "call(s) get device=device")
    return changes


# ---------------------------------------------------------------- 3: chapter 8, int8

INT8_BLOCK = '''\
print("int8 through", int8_api())  # torchao's quantize_ where it runs, else torch.ao (deprecated)
variants = {"dense fp32": mlp, "pruned 90 %": pruned_mlp, "int8": int8_dynamic(mlp),
            "pruned 90 % + int8": int8_dynamic(pruned_mlp)}
accs = {name: evaluate(m, test_loader) for name, m in variants.items()}
'''

INT8_TEXT = '''\
PyTorch's own `torch.ao.quantization.quantize_dynamic` is deprecated, with its removal announced
(torch 2.14 still runs it, with a warning); the supported API is the separate `torchao` package:
`quantize_(model, Int8DynamicActivationInt8WeightConfig())`. `utils.quantize.int8_dynamic` uses
it wherever it runs and falls back to the deprecated call only behind a guard (the printed line
above says which one ran). Both store int8 weights with a scale; how fast each runs is another
matter, measured below.
'''

LATENCY_TEXT = '''\
Smaller files are one half of the promise of int8; speed is the other. We time the dense fp32
network next to its int8 copies, one per API that runs here, on the CPU (dynamic quantization
is a CPU deployment technique), interleaved, medians of many runs.
'''

LATENCY_CODE = '''\
int8_models = {"fp32": mlp}
if torchao_available():
    int8_models["int8, torchao (supported)"] = int8_dynamic(mlp, api="torchao")
if legacy_available():
    int8_models["int8, torch.ao (deprecated)"] = int8_dynamic(mlp, api="torch.ao")
int8_lat = {}
with torch.inference_mode():
    for batch in (1, 64):
        times = latency(int8_models, torch.randn(batch, 1, 32, 32), repeats=40)
        int8_lat[f"batch {batch} (ms)"] = {name: t * 1e3 for name, t in times.items()}
int8_lat = pd.DataFrame(int8_lat)
for col in list(int8_lat):
    int8_lat[col.replace("(ms)", "speed vs fp32")] = int8_lat.loc["fp32", col] / int8_lat[col]
print(f"CPU latency on {threads} thread(s), torch {torch.__version__}")
int8_lat.round(3)
'''

LATENCY_CHECK = '''\
assert len(int8_lat) >= 2, "no int8 API runs here"
for name in int8_lat.index[1:]:  # which one is faster depends on the CPU's int8 kernels: no claim
    print(f"{name}: {int8_lat.loc[name, 'batch 64 speed vs fp32']:.2f}x the fp32 speed at batch 64")
'''

OLD_SPEED = ("On speed they also differ: int8 kernels are fast on most CPUs today,\n"
             "unstructured sparsity is not (chapter 5).")
NEW_SPEED = ("Speed is a separate question: int8\nis faster only where a fast int8 kernel runs, "
             "which the latency table shows per API on this machine\n(rerun it on yours), and "
             "unstructured sparsity needs very high sparsity before it is faster at all\n(chapter 5).")


def edit_chapter8(nb: dict, name: str) -> list[str]:
    changes = []
    i = setup_index(nb, name)
    text = src(nb["cells"][i])
    new = add_import(text, "utils.quantize", ["int8_api", "int8_dynamic", "legacy_available",
                                              "torchao_available"], after_module="utils.pruning")
    if new != text:
        set_src(nb["cells"][i], new)
        changes.append(f"set-up cell {i}: imports utils.quantize")
    if not any("int8_dynamic(mlp)" in src(c) for c in nb["cells"]):
        j = find(nb, name, "code", "def int8(model):", "quantize_dynamic")
        text = src(nb["cells"][j])
        set_src(nb["cells"][j], text[:text.index("def int8(model):")] + INT8_BLOCK.rstrip("\n"))
        changes.append(f"cell {j}: int8 through utils.quantize.int8_dynamic")
    if not any("`utils.quantize.int8_dynamic` uses" in src(c) for c in nb["cells"]):
        j = find(nb, name, "markdown", "torch.ao.quantization.quantize_dynamic", "We\ncatch the warning")
        set_src(nb["cells"][j], INT8_TEXT.rstrip("\n"))
        changes.append(f"cell {j}: text on the supported API")
    if not has_cell(nb, "i9-int8-latency"):
        j = find(nb, name, "code", 'q2.loc["int8", "KB"] < 0.3')
        nb["cells"][j + 1:j + 1] = [markdown_cell(LATENCY_TEXT.rstrip("\n"), "i9-int8-latency-text"),
                                    code_cell(LATENCY_CODE.rstrip("\n"), "i9-int8-latency"),
                                    code_cell(LATENCY_CHECK.rstrip("\n"), "i9-int8-latency-check")]
        changes.append(f"after cell {j}: int8 latency next to fp32 (3 new cells)")
    if not any(NEW_SPEED in src(c) for c in nb["cells"]):
        j = find(nb, name, "markdown", OLD_SPEED)
        set_src(nb["cells"][j], src(nb["cells"][j]).replace(OLD_SPEED, NEW_SPEED))
        changes.append(f"cell {j}: the speed sentence points at the measurement")
    return changes


# ---------------------------------------------------------------- 4: chapters 5 and 6, GPU next to CPU

CH5_GPU = '''\
if torch.cuda.is_available():  # the same measurements on the GPU, next to the CPU's above
    gpu_structured = pd.DataFrame(bench_structured(width=1.0, batches=(1, 32), repeats=20,
                                                   device="cuda"))
    side = pd.concat([structured_rows, gpu_structured]).pivot_table(
        index="batch", columns="device", values=["dense ms", "shrunk ms", "latency ratio"])
    print(side.dropna().round(3).to_string(), end="\\n\\n")
    gpu_linear = pd.DataFrame(bench_sparse_linear(widths=(4096,), batches=(1, 64),
                                                  sparsities=(0.5, 0.9, 0.99), repeats=20, device="cuda"))
    side = pd.concat([linear, gpu_linear]).query("width == 4096").pivot_table(
        index=["batch", "sparsity"], columns="device", values=["dense ms", "csr / dense"])
    print(side.dropna().round(3).to_string())
else:
    print("No CUDA GPU here: only the CPU columns above exist.")
'''
CH5_OLD_HEAD = "if torch.cuda.is_available():\n    gpu_linear = pd.DataFrame(bench_sparse_linear("
CH5_TAIL = "semi = bench_semi_structured()"

CH6_GPU = '''\
if torch.cuda.is_available():  # the same two networks on the GPU, next to the CPU column
    on_gpu = {name: clone_model(m).cuda().eval() for name, m in
              {"ResNet-18": resnet, "pruned by Torch-Pruning": small_resnet}.items()}
    with torch.no_grad():
        gpu_lat = latency(on_gpu, example.cuda(), repeats=20)
    resnets.insert(3, "GPU latency (ms)", [gpu_lat[name] * 1e3 for name in resnets.index])
'''


def edit_chapter5(nb: dict, name: str) -> list[str]:
    if any("next to the CPU's above" in src(c) for c in nb["cells"]):
        return []
    j = find(nb, name, "code", CH5_OLD_HEAD, CH5_TAIL)
    text = src(nb["cells"][j])
    set_src(nb["cells"][j], CH5_GPU + text[text.index(CH5_TAIL):])
    return [f"cell {j}: GPU timings in one table with the CPU's"]


def edit_chapter6(nb: dict, name: str) -> list[str]:
    if any("next to the CPU column" in src(c) for c in nb["cells"]):
        return []
    j = find(nb, name, "code", "tp.pruner.MagnitudePruner", 'resnets = pd.DataFrame(')
    lines = src(nb["cells"][j]).rstrip("\n").split("\n")
    if lines[-1].strip() != "resnets":
        raise EditError(f"{name}: cell {j} no longer ends by showing `resnets`")
    set_src(nb["cells"][j], "\n".join(lines[:-1]) + "\n" + CH6_GPU + lines[-1])
    return [f"cell {j}: GPU latency column next to the CPU one"]


# ---------------------------------------------------------------- driver

SPECIFIC = {"05-applications": edit_chapter5, "06-tools": edit_chapter6, "08-faq": edit_chapter8}


def edit(path: Path, write: bool = True) -> list[str]:
    nb = json.loads(path.read_text())
    changes = []
    if path.stem in SPECIFIC:
        changes += SPECIFIC[path.stem](nb, path.name)
    changes += edit_setup_and_training(nb, path.name)
    long = [f"{path.name}: a line over {MAX} characters: {line!r}" for c in nb["cells"] if c["cell_type"] == "code"
            for line in src(c).split("\n") if len(line) > MAX and "device=device" in line]
    if long:
        raise EditError("\n".join(long))
    colab = [c for c in nb["cells"] if COLAB_TAG in c["metadata"].get("tags", []) and "google.colab" in src(c)]
    if len(colab) != 1:
        raise EditError(f"{path.name}: expected one Colab set-up cell, found {len(colab)}")
    if src(colab[0]) != colab_cell_source():
        set_src(colab[0], colab_cell_source())
        changes.append("Colab cell: the current utils.book.colab_cell_source()")
    if changes and write:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changes


def main(argv: list[str]) -> int:
    write = "--check" not in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted((ROOT / "chapters").glob("*.ipynb"))
    for stem in SPECIFIC:  # the chapter-specific edits must find their chapter when all are edited
        if len(paths) > 1 and not any(p.stem == stem for p in paths):
            raise EditError(f"chapter {stem} not found among {[p.name for p in paths]}")
    total = 0
    for path in paths:
        changes = edit(path, write)
        total += len(changes)
        for c in changes:
            print(f"{path.name}: {c}")
        if not changes:
            print(f"{path.name}: nothing to change")
    print(f"{total} change(s) {'written' if write else 'to write (--check: nothing written)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
