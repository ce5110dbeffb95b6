"""Energy per inference: measured where the hardware exposes it, otherwise a labelled model.

Measured: RAPL counters (Linux, ``/sys/class/powercap``; Intel, and AMD on recent kernels) for
the CPU package, NVIDIA's NVML (``pynvml``) energy counter for a GPU. Modelled: the 45 nm
per-operation energies of Horowitz 2014 (as Han et al. 2015 tabulate them), with the SRAM cost
chosen by the SRAM's size -- a model of arithmetic and weight fetches only, not a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

# Energy per operation at 45 nm, 0.9 V, in picojoules (Horowitz 2014, as tabulated by
# Han et al. 2015). Horowitz gives SRAM (cache) reads per 64-bit word by size: 10 pJ for 8 KB,
# 20 pJ for 32 KB, 100 pJ for 1 MB; a 32-bit word costs half. Han et al.'s 5 pJ is the 8 KB one.
HOROWITZ_45NM_PJ = {
    "32-bit int add": 0.1,
    "32-bit float add": 0.9,
    "32-bit register file": 1.0,
    "32-bit int mult": 3.1,
    "32-bit float mult": 3.7,
    "32-bit SRAM read, 8 KB": 5.0,
    "32-bit SRAM read, 32 KB": 10.0,
    "32-bit SRAM read, 1 MB": 50.0,
    "32-bit DRAM read": 640.0,
}
SRAM_SIZES = {8 * 1024: "8 KB", 32 * 1024: "32 KB", 1024 * 1024: "1 MB"}  # bytes -> table row


def sram_read_pj(nbytes: float) -> float:
    """pJ per 32-bit read from the smallest tabulated SRAM that holds ``nbytes``.

    Larger SRAMs cost more per read (longer wires). Beyond 1 MB Horowitz tabulates nothing, so
    the 1 MB cost is returned: an optimistic lower bound for a bigger on-chip memory.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    size = next((s for s in SRAM_SIZES if nbytes <= s), max(SRAM_SIZES))
    return HOROWITZ_45NM_PJ[f"32-bit SRAM read, {SRAM_SIZES[size]}"]


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


def _nvml_energy_mj() -> int:
    """GPU 0's energy counter (mJ since the driver loaded; Volta and later) through pynvml."""
    try:
        import pynvml
    except ImportError as error:  # optional: only GPU machines have it
        raise RuntimeError("pynvml is not installed (pip install nvidia-ml-py)") from error

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0)))


def nvml_available() -> bool:
    """True if GPU 0's energy counter can be read through pynvml."""
    try:
        _nvml_energy_mj()
        return True
    except Exception:  # not installed, no driver, no GPU, too old a GPU: "cannot measure"
        return False


def measure_gpu_energy(fn: Callable[[], object], seconds: float = 2.0) -> dict | None:
    """Joules per call of ``fn`` from NVML's energy counter; None where it cannot be read.

    The counter covers the whole GPU (idle power included: compare candidates measured the same
    way, interleaved if you can), and NVML's device 0 need not be CUDA's device 0 when
    ``CUDA_VISIBLE_DEVICES`` is set. ``fn`` should end by synchronizing
    (``torch.cuda.synchronize()``) so that the work it queued is inside the window; one call
    before the window warms up kernel selection and the allocator.
    """
    if not nvml_available():
        return None
    fn()  # warm-up, outside the window
    start, t0, calls = _nvml_energy_mj(), time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    joules, elapsed = (_nvml_energy_mj() - start) / 1e3, time.perf_counter() - t0
    return {"joules_per_call": joules / calls, "watts": joules / elapsed, "calls": calls}


def modelled_energy(
    macs: float, weight_words: float, index_words: float = 0.0, on_chip: bool = False
) -> dict:
    """Energy (µJ) of one inference under the 45 nm model: a float multiply and add per MAC, and one
    32-bit read per weight (and per index word) from DRAM, or with ``on_chip`` from an SRAM
    just large enough for all of them (``sram_read_pj``).

    Activations, control and data movement inside the chip are left out: it is a model.
    """
    pj = HOROWITZ_45NM_PJ
    words = weight_words + index_words
    arithmetic = macs * (pj["32-bit float mult"] + pj["32-bit float add"])
    memory = words * (sram_read_pj(4 * words) if on_chip else pj["32-bit DRAM read"])
    return {
        "arithmetic µJ": arithmetic / 1e6,
        "weight reads µJ": memory / 1e6,
        "total µJ": (arithmetic + memory) / 1e6,
    }
