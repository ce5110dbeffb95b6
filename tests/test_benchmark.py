"""The benchmark's quick mode runs, describes the machine, and writes its JSON."""

import json
import time

import numpy as np
import torch

from utils.kit.benchmark import main, peak_extra_rss


def test_quick_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    results = main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch_threads"] >= 1 and saved["quick"] is True
    pruners = saved["prune_speed"]["pruners"]
    assert set(pruners) == {"utils.pruning", "source listing", "torch.nn.utils.prune"}
    assert all(row["time_s"] > 0 for row in pruners.values())
    assert results["prune_speed"]["weights"] == saved["prune_speed"]["weights"]
    first = saved["first_call"]["pruners"]  # each pruner's first call, in a fresh process
    assert set(first) == set(pruners) and all(r["first"] > 0 < r["warm"] for r in first.values())
    assert first["utils.pruning"]["first call / utils first call"] == 1
    assert set(saved["first_call_small"]["pruners"]) == {"utils.pruning"}
    assert {r["batch"] for r in saved["structured"]} == {1, 2}
    assert {(r["scope"], r["round_to"]) for r in saved["structured"]} == {
        ("local", 1),
        ("global", 1),
        ("global", 8),
    }
    assert all(  # half the channels: about 4x fewer MACs (fewer where counts are rounded up)
        r["MACs ratio"] > (3 if r["round_to"] == 1 else 2) for r in saved["structured"]
    )
    runtimes = saved["structured_runtimes"]
    assert {(r["threads"], r["runtime"], r["batch"]) for r in runtimes} == {
        (n, rt, b)
        for n in (1, 2)
        for rt in ("eager", "eager, folded, channels-last", "ONNX Runtime")
        for b in (1, 2)
    }
    assert all(r["MACs ratio"] > 3 and r["dense ms"] > 0 < r["shrunk ms"] for r in runtimes)
    assert {(r["width"], r["sparsity"]) for r in saved["sparse_linear"]} == {
        (256, 0.5),
        (256, 0.99),
    }
    assert set(saved["break_even"]) == {"cpu width 256 batch 1", "cpu width 256 batch 8"}
    assert "skipped" in saved["semi_structured"] or saved["semi_structured"]["rows"]
    large = saved["large_inplace"]
    assert (
        large["exact"]
        and large["weights"] == 4 * 256 * 256
        and large["zeros"] == large["weights"] // 2
    )
    assert torch.get_num_threads() == threads_before  # the thread sweep puts the count back
    out = capsys.readouterr().out
    assert "utils.pruning" in out and "(c)" in out and "(d)" in out


def test_break_even_is_the_lowest_sparsity_where_csr_wins():
    from utils.kit.benchmark import break_even

    rows = [
        {"device": "cpu", "width": 8, "batch": 1, "sparsity": s, "csr / dense": r}
        for s, r in [(0.5, 2.0), (0.9, 0.8), (0.95, 0.5)]
    ]
    rows.append({"device": "cpu", "width": 8, "batch": 64, "sparsity": 0.99, "csr / dense": 1.2})
    assert break_even(rows) == {"cpu width 8 batch 1": 0.9, "cpu width 8 batch 64": None}


def test_peak_memory_sees_a_large_allocation_even_after_freeing_one():
    def hold_200_mb():
        block = np.ones(25_000_000)  # 200 MB of float64, touched
        time.sleep(0.05)
        return block.sum()

    hold_200_mb()  # freed again: its pages must not hide the next allocation
    elapsed, extra = peak_extra_rss(hold_200_mb)
    assert 150 * 2**20 < extra < 400 * 2**20 and elapsed >= 0.05
    assert peak_extra_rss(lambda: None)[1] < 50 * 2**20


def test_llm_benchmark_quick_mode(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    from utils.kit.bench_llm import _run_reference, bench_llm_1b, layer_and_stats
    from utils.kit.bench_llm import main as llm_main

    saved = llm_main(["--quick", "--only", "f", "--json", str(tmp_path / "llm.json")])
    rows = json.loads((tmp_path / "llm.json").read_text())["sparsegpt_layer"]["rows"]
    assert [r["setting"] for r in rows] == ["2:4", "50 %"] and all(r["utils s"] > 0 for r in rows)
    assert saved["sparsegpt_layer"]["reference"] == "not given"
    small = bench_llm_1b("wanda", samples=2, length=8, hidden=128, blocks=2, mlp=256, vocab=64)
    block_linears = 2 * (4 * 128 * 128 + 3 * 128 * 256)
    assert small["zeros in the blocks"] == block_linears // 2  # exactly half of each row
    assert small["peak / model bytes"] >= 1 and small["calibration tokens"] == 16
    assert torch.is_grad_enabled()  # the benchmark leaves autograd as it found it

    class Fake:  # the reference's interface: a layer, .H and .nsamples, fasterprune(**kw)
        def __init__(self, layer):
            self.layer = layer

        def fasterprune(self, sparsity, prunen=0, prunem=0):
            print("time 0.0")  # the reference prints; the harness swallows it
            self.layer.weight.data = self.layer.weight.data * (self.H.diagonal() > 0)

    w, stats = layer_and_stats(16, 64)
    assert np.allclose(_run_reference(Fake, w, stats, sparsity=0.5).numpy(), w.numpy())


def test_runtime_agreement_is_relative_to_the_reference():
    """Random networks' logits are tiny: zeros must not pass as the same function."""
    from utils.kit.benchmark import _agrees

    want = torch.randn(4, 10) * 1e-6
    assert _agrees(want * (1 + 1e-5), want)
    assert not _agrees(torch.zeros_like(want), want)
    assert not _agrees(want[:2], want)
