"""The energy model adds up as documented; measurement probes say 'no' cleanly where they cannot measure."""

import pytest

from utils.lab import energy


def test_model_counts_arithmetic_and_weight_reads():
    e = energy.modelled_energy(macs=1e6, weight_words=1e3)
    assert e["arithmetic µJ"] == pytest.approx(1e6 * (3.7 + 0.9) / 1e6)
    assert e["weight reads µJ"] == pytest.approx(1e3 * 640 / 1e6)
    on_chip = energy.modelled_energy(macs=1e6, weight_words=1e3, on_chip=True)
    assert on_chip["weight reads µJ"] == pytest.approx(1e3 * 5 / 1e6)  # 4 KB: the 8 KB SRAM
    assert energy.modelled_energy(0, 10, index_words=10)["total µJ"] == pytest.approx(
        2 * 10 * 640 / 1e6
    )


@pytest.mark.parametrize(
    "words, pj", [(2048, 5.0), (2049, 10.0), (8192, 10.0), (8193, 50.0), (5.5e6, 50.0)]
)
def test_the_sram_cost_grows_with_the_sram_that_holds_the_weights(words, pj):
    """Horowitz: 10, 20, 100 pJ per 64-bit read of an 8 KB, 32 KB, 1 MB SRAM (half per 32 bits)."""
    assert energy.sram_read_pj(4 * words) == pj
    e = energy.modelled_energy(0, words, on_chip=True)
    assert e["weight reads µJ"] == pytest.approx(words * pj / 1e6)
    with pytest.raises(ValueError, match=">= 0"):
        energy.sram_read_pj(-1)


def test_dram_is_far_costlier_than_arithmetic():
    pj = energy.HOROWITZ_45NM_PJ
    assert pj["32-bit DRAM read"] / pj["32-bit float mult"] > 100


def test_probes_answer_without_raising(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "RAPL", tmp_path / "missing")
    assert energy.rapl_available() is False
    assert energy.measure_cpu_energy(lambda: None, seconds=0.01) is None


def test_nvml_is_read_when_present_and_refused_cleanly_when_not(monkeypatch):
    import sys
    import types

    class FakeNVML(types.ModuleType):
        def __init__(self, fail):
            super().__init__("pynvml")
            self.fail = fail

        def nvmlInit(self):
            if self.fail:
                raise RuntimeError("NVML Shared Library Not Found")

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            self.mj = getattr(self, "mj", 1_000) + 500  # 0.5 J more at every read
            return self.mj

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail=False))
    assert energy.nvml_available() is True
    calls = []
    got = energy.measure_gpu_energy(lambda: calls.append(1), seconds=0.0)
    assert got["calls"] == 1 and len(calls) == 2  # one warm-up call outside the window
    assert got["joules_per_call"] == pytest.approx(0.5)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail=True))
    assert energy.nvml_available() is False
    assert energy.measure_gpu_energy(lambda: None) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert energy.nvml_available() is False


def test_rapl_reading_handles_a_wrapping_counter(monkeypatch, tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    pkg.mkdir()
    (pkg / "energy_uj").write_text("999000")
    (pkg / "max_energy_range_uj").write_text("1000000")
    monkeypatch.setattr(energy, "RAPL", tmp_path)
    calls = []

    def work():
        calls.append(1)
        (pkg / "energy_uj").write_text("1000")  # wrapped past the maximum: 2000 µJ were used

    result = energy.measure_cpu_energy(work, seconds=0.0)
    assert result["joules_per_call"] == pytest.approx(0.002 / len(calls))
