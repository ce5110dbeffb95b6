"""The benchmark's quick mode runs, describes the machine, and writes its JSON."""
import json
import time

import numpy as np

from utils.benchmark import main, peak_extra_rss


def test_quick_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch_threads"] >= 1 and saved["quick"] is True
    pruners = saved["prune_speed"]["pruners"]
    assert set(pruners) == {"utils.pruning", "seed listing", "torch.nn.utils.prune"}
    assert all(row["time_s"] > 0 for row in pruners.values())
    assert results["prune_speed"]["weights"] == saved["prune_speed"]["weights"]
    assert "utils.pruning" in capsys.readouterr().out


def test_peak_memory_sees_a_large_allocation():
    def hold_200_mb():
        block = np.ones(25_000_000)  # 200 MB of float64, touched
        time.sleep(0.05)  # long enough for the sampling thread to look
        return block.sum()

    elapsed, extra = peak_extra_rss(hold_200_mb)
    assert extra > 150 * 2**20 and elapsed >= 0.05
