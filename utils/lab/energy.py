"""Energy per inference: measured where the hardware exposes it, otherwise a labelled model.

Measured: Intel RAPL counters (Linux, ``/sys/class/powercap``) for the CPU package, NVIDIA's
NVML (``pynvml``) for a GPU. Modelled: the 45 nm per-operation energies that Han et al. 2015
quote from Horowitz 2014 -- a model of arithmetic and weight fetches only, not a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

# Energy per operation at 45 nm, 0.9 V, in picojoules (Horowitz 2014, as tabulated by
# Han et al. 2015).
HOROWITZ_45NM_PJ = {
    "32-bit int add": 0.1,
    "32-bit float add": 0.9,
    "32-bit register file": 1.0,
    "32-bit int mult": 3.1,
    "32-bit float mult": 3.7,
    "32-bit SRAM read": 5.0,
    "32-bit DRAM read": 640.0,
}
RAPL = Path("/sys/class/powercap")


def _rapl_packages() -> list[Path]:
    return sorted(
        p
        for p in RAPL.glob("intel-rapl:*")
        if p.name.count(":") == 1 and (p / "energy_uj").exists()
    )


def rapl_available() -> bool:
    """True if this machine lets us read the CPU package energy counters."""
    try:
        return any(int((p / "energy_uj").read_text()) >= 0 for p in _rapl_packages())
    except (OSError, ValueError):
        return False


def measure_cpu_energy(fn: Callable[[], object], seconds: float = 2.0) -> dict | None:
    """Joules per call of ``fn`` from RAPL over about ``seconds`` of repeated calls; None
    without RAPL.

    The counter covers the whole CPU package, so idle power and other processes are included:
    run it on a quiet machine and compare candidates measured the same way.
    """
    if not rapl_available():
        return None
    packages = _rapl_packages()

    def read() -> list[int]:
        return [int((p / "energy_uj").read_text()) for p in packages]

    ranges = [int((p / "max_energy_range_uj").read_text()) for p in packages]
    start, t0, calls = read(), time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - t0 < seconds:  # at least one call
        fn()
        calls += 1
    end, elapsed = read(), time.perf_counter() - t0
    joules = (
        sum(((e - s) % r) for s, e, r in zip(start, end, ranges)) / 1e6
    )  # modulo: the counter wraps
    return {"joules_per_call": joules / calls, "watts": joules / elapsed, "calls": calls}


def nvml_available() -> bool:
    """True if an NVIDIA GPU's power can be read through pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlDeviceGetPowerUsage(pynvml.nvmlDeviceGetHandleByIndex(0))
        return True
    except Exception:  # not installed, no driver, no GPU: all mean "cannot measure"
        return False


def modelled_energy(
    macs: float, weight_words: float, index_words: float = 0.0, on_chip: bool = False
) -> dict:
    """Energy (µJ) of one inference under the 45 nm model: a float multiply and add per MAC, and one
    32-bit read per weight (and per index word) from SRAM if the model fits on chip, else from DRAM.

    Activations, control and data movement inside the chip are left out: it is a model.
    """
    pj = HOROWITZ_45NM_PJ
    arithmetic = macs * (pj["32-bit float mult"] + pj["32-bit float add"])
    memory = (weight_words + index_words) * (
        pj["32-bit SRAM read"] if on_chip else pj["32-bit DRAM read"]
    )
    return {
        "arithmetic µJ": arithmetic / 1e6,
        "weight reads µJ": memory / 1e6,
        "total µJ": (arithmetic + memory) / 1e6,
    }
