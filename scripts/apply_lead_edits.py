"""Chapter edits that go with utils' new internals and with claims that did not survive another
machine (chapter 7's sensitivity scan) or a busy one (timing asserts of chapters 4.1 and 4.2).

    python scripts/apply_lead_edits.py            # edits chapters/ in place, prints each change

Cells are found by text they contain; a second run changes nothing; a missing cell is an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lines(text: str) -> list[str]:
    return text.strip("\n").splitlines(keepends=True)


CH7_COMPARE = '''
def allocations(seed):
    """Train LeNet-5 with `seed`, scan it, and prune it three ways to the scan's total sparsity."""
    set_seed(seed)
    loader = DataLoader(TensorDataset(x[order[500:]], y[order[500:]]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    net = LeNet5()
    train(net, loader, epochs=8, lr=0.02, device=device)
    base = evaluate(net, val_loader)
    ratio = {}
    for layer in layers:
        fine = [0.0]
        for r in ratios:
            m = clone_model(net)
            prune_unstructured(m, r, scope="local", layers=[layer])
            fine += [r] if evaluate(m, val_loader) >= base - budget else []
        ratio[layer] = max(fine)
    auto = clone_model(net)
    for layer, r in ratio.items():
        if r > 0:
            prune_unstructured(auto, r, scope="local", layers=[layer])
    total = sparsity(auto)
    uniform, glob = clone_model(net), clone_model(net)
    prune_unstructured(uniform, total, scope="local")
    prune_unstructured(glob, total, scope="global")
    rows = []
    for name, m in {"sensitivity scan": auto, "uniform (local)": uniform, "global": glob}.items():
        row = {"seed": seed, "method": name, "sparsity": sparsity(m),
               "test acc, pruned": evaluate(m, test_loader)}
        train(m, loader, epochs=1, lr=0.01, device=device)
        rows.append(row | {"test acc, fine-tuned 1 epoch": evaluate(m, test_loader)})
    return rows


seeds = [0, 1, 2]
per_seed = pd.DataFrame([row for s in seeds for row in allocations(s)])
auto_table = per_seed.groupby("method", sort=False)[["test acc, pruned", "test acc, fine-tuned 1 epoch"]]
auto_table = auto_table.agg(["mean", "std"])
per_seed.pivot(index="seed", columns="method", values="test acc, pruned").round(4)
'''

CH7_ASSERT = '''
acc = per_seed.pivot(index="seed", columns="method", values="test acc, pruned")
assert (per_seed.groupby("seed")["sparsity"].agg(lambda s: s.max() - s.min()) < 1e-3).all()  # same total
# in every seed global is at least as accurate as both, within 0.005 (the test set's standard error)
assert (acc["global"] >= acc[["sensitivity scan", "uniform (local)"]].max(axis=1) - 0.005).all()
pruned = auto_table["test acc, pruned"]
scan_vs_uniform = abs(pruned.loc["sensitivity scan", "mean"] - pruned.loc["uniform (local)", "mean"])
assert scan_vs_uniform < pruned.loc[["sensitivity scan", "uniform (local)"], "std"].max()
cols = ["test acc, pruned", "test acc, fine-tuned 1 epoch"]
fig = plots.grouped_bars(cols, {m: list(auto_table.loc[m, (cols, "mean")]) for m in auto_table.index},
                         ylabel="test accuracy", title=f"Mean and spread over {len(seeds)} seeds",
                         ylim=(0.5, 1.0), errors={m: list(auto_table.loc[m, (cols, "std")])
                                                   for m in auto_table.index})
tuned = auto_table["test acc, fine-tuned 1 epoch"]
gap = tuned.loc["global", "mean"] - tuned.drop("global")["mean"].max()
print(f"fine-tuned: global leads the best other method by {gap:+.1%}; the largest spread over seeds is "
      f"{tuned['std'].max():.1%}: " + ("a measurable lead" if gap > tuned["std"].max() else "no difference "
                                        "measurable here"))
auto_table.round(4)
'''

CH7_TEXT = '''
The first table gives each seed's test accuracy right after pruning, the figure and the second
table the mean and spread over three training seeds. The surprise is the scan: each layer's
ratio keeps that layer within the one-point budget *when it is pruned alone*, but pruned
together the losses compound, and the scan's allocation is no better than one uniform ratio
here (their difference is smaller than the spread over seeds). Global magnitude pruning at the
same total sparsity is at least as accurate as both before fine-tuning, in every seed (asserted,
within the half-point standard error of the 1,000 test digits);
the last printed line says whether its lead survives one epoch of fine-tuning by more than the
spread. A scan can account for the compounding by checking the layers together or by splitting
the budget among them (not done here); its strengths remain that it measures accuracy instead
of assuming that small weights are unimportant, and that its budget is explicit.
'''

CH41_ASSERT = '''
rows = speed["pruners"]
if not rows["seed listing"]["time_s"] > rows["utils.pruning"]["time_s"]:  # a busy machine: measure again
    speed = bench_prune_speed(resnet50(), ratio=0.5, repeats=3)
    print_prune_speed(speed)
    rows = speed["pruners"]
assert rows["seed listing"]["time_s"] > rows["utils.pruning"]["time_s"]
assert rows["seed listing"]["peak_extra_mb"] > 2 * rows["utils.pruning"]["peak_extra_mb"]
print(f"utils is {rows['seed listing']['times_slower_than_utils']:.0f}x faster than the listing and "
      f"{rows['torch.nn.utils.prune']['times_slower_than_utils']:.0f}x faster than torch.nn.utils.prune here")
'''

CH41_TEXT_OLD = "`utils` writes all magnitudes into one preallocated buffer, finds the $k$-th smallest with a\n"
CH41_TEXT = '''
`utils` never copies all magnitudes at once. It computes them chunk by chunk, brackets the
$k$-th smallest with a random sample, counts the magnitudes below the bracket and gathers the
few inside it (one pass), picks the exact value among those, and builds each layer's mask with
one comparison (a second pass): two passes over the weights and little memory beyond the masks,
where the listing makes tens of millions of Python objects. How many times faster it is depends
on the machine and on how busy it is (`utils` uses every core, the listing one), so the cell
above asserts only that it is faster and needs less memory. (The benchmark's command line,
`python -m utils.benchmark`, repeats and reports medians, and also prunes a billion weights in
place.)
'''

CH42_ASSERT_OLD = 'assert (vgg_table["latency ratio"] > 1.2).all() and (vgg_table["MACs ratio"] > 3.5).all()\n'
CH42_ASSERT = '''
if not (vgg_table["latency ratio"] > 1.2).all():  # a busy machine: measure once more before failing
    vgg_table = pd.DataFrame(bench_structured(width=1.0, batches=(1, 32), repeats=20)).set_index("batch")
assert (vgg_table["latency ratio"] > 1.2).all() and (vgg_table["MACs ratio"] > 3.5).all()
'''


def find(cells: list[dict], needle: str) -> int:
    hits = [i for i, c in enumerate(cells) if needle in "".join(c["source"])]
    if len(hits) != 1:
        raise SystemExit(f"expected one cell containing {needle[:60]!r}, found {len(hits)}")
    return hits[0]


def replace_cell(cells: list[dict], needle: str, new: str, done_marker: str, what: str) -> bool:
    if any(done_marker in "".join(c["source"]) for c in cells):
        return False
    cells[find(cells, needle)]["source"] = lines(new)
    print("  " + what)
    return True


def edit_chapter_7(cells: list[dict]) -> bool:
    changed = replace_cell(cells, "auto_rows = {}", CH7_COMPARE, "def allocations(seed)",
                           "7.1: three allocations over three training seeds")
    changed |= replace_cell(cells, 'assert auto_table.loc["sensitivity scan", "test acc, pruned"] >',
                            CH7_ASSERT, "acc = per_seed.pivot", "7.1: assert global >= both in every seed; "
                            "error-bar figure; gap vs spread after fine-tuning")
    if not any("The surprise is the scan" in "".join(c["source"]) for c in cells):
        i = find(cells, "The scan gives each layer its own ratio (printed above)")
        old = "".join(cells[i]["source"])
        rest = old[old.index("## 7.2 Dynamic pruning"):]
        cells[i]["source"] = lines(CH7_TEXT.strip("\n") + "\n\n" + rest)
        print("  7.1: text says what three seeds show")
        changed = True
    return changed


def edit_chapter_41(cells: list[dict]) -> bool:
    changed = replace_cell(cells, 'assert rows["seed listing"]["time_s"] > 3 * rows["utils.pruning"]["time_s"]',
                           CH41_ASSERT, "a busy machine: measure again", "defect 4: timing assert survives a busy machine")
    if any(CH41_TEXT_OLD in "".join(c["source"]) for c in cells):
        i = find(cells, CH41_TEXT_OLD)
        old = "".join(cells[i]["source"])
        rest = old[old.index("## Defect 5"):]
        cells[i]["source"] = lines(CH41_TEXT.strip("\n") + "\n\n" + rest)
        print("  defect 4: how utils finds the threshold now")
        changed = True
    i = find(cells, "## Defect 4: every weight goes through a Python list")
    src = "".join(cells[i]["source"])
    if "Python float object\n(24 bytes" in src:
        cells[i]["source"] = lines(src.replace(
            "turns every weight into a Python float object\n(24 bytes, plus an 8-byte pointer in the list)",
            "turns every weight into a NumPy scalar object\n(`sys.getsizeof` says 28 bytes for a `numpy.float32`, "
            "plus an 8-byte pointer in the list)").replace("and\nsamples the memory", "and\nmeasures the memory"))
        print("  defect 4: a numpy.float32 scalar is 28 bytes")
        changed = True
    return changed


def edit_chapter_42(cells: list[dict]) -> bool:
    if any("measure once more before failing" in "".join(c["source"]) for c in cells):
        return False
    i = find(cells, CH42_ASSERT_OLD)
    src = "".join(cells[i]["source"])
    cells[i]["source"] = lines(src.replace(CH42_ASSERT_OLD, CH42_ASSERT.lstrip("\n")))
    print("  VGG timing assert: measured once more before failing")
    return True


EDITS = {"07-trends": edit_chapter_7, "04-1-unstructured": edit_chapter_41, "04-2-structured": edit_chapter_42}


def main(root: Path = ROOT) -> int:
    changed = 0
    for stem, edit in EDITS.items():
        path = root / "chapters" / f"{stem}.ipynb"
        nb = json.loads(path.read_text())
        print(path.name)
        if edit(nb["cells"]):
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed += 1
    print(f"{changed} chapter(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
