"""Dynamic int8 quantization of the Linear layers of a model, on the supported API where it runs.

Two APIs do the same thing (int8 weights, activations quantized on the fly):

- ``"torchao"``: ``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``,
  the supported API (the ``torchao`` package). It runs on the CPU and on CUDA GPUs.
- ``"torch.ao"``: ``torch.ao.quantization.quantize_dynamic``, deprecated with its removal
  announced; torch 2.14 still ships it, with fast int8 kernels for the CPU (fbgemm / x86).

``int8_dynamic`` takes the supported one whenever it imports and runs, and falls back to the
deprecated one only behind a guard (:func:`legacy_available`: the function still exists in this
torch and a quantized CPU engine is present). Measured on a 2-core CPU with torch 2.14.1 and
torchao 0.18 (eager mode): the torchao model is as small as the torch.ao one but not faster than
fp32, while the deprecated kernels are several times faster; time both before claiming a speedup.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn

APIS = ("auto", "torchao", "torch.ao")
TESTED_TORCHAO = ">=0.17,<0.19"  # pyproject.toml pins this range; tested: torchao 0.18, torch 2.14


def torchao_available() -> bool:
    """True if ``torchao`` imports and its int8 dynamic quantization runs a Linear on the CPU."""
    return torchao_problem() is None


@functools.cache
def torchao_problem() -> str | None:
    """Why torchao's int8 path does not run here (None when it does): the error, in one line."""
    quiet = [logging.getLogger(n) for n in ("torch.utils._pytree", "torchao")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:  # import-time notices about torch internals, not about the reader's model
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            probe = nn.Sequential(nn.Linear(32, 16))
            quantize_(probe, Int8DynamicActivationInt8WeightConfig())
            probe(torch.randn(2, 32))
        return None
    except Exception as error:  # not installed, or built for another torch: fall back
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def legacy_available() -> bool:
    """The version guard of the deprecated path: True while this torch still ships
    ``torch.ao.quantization.quantize_dynamic`` (it does up to 2.14 at least) and has a quantized
    CPU engine to run it."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return any(e != "none" for e in torch.backends.quantized.supported_engines)


def int8_api(api: str = "auto") -> str:
    """The API that :func:`int8_dynamic` uses for ``api``: ``"torchao"`` or ``"torch.ao"``."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    if api in ("auto", "torchao") and torchao_available():
        return "torchao"
    if api == "torchao":
        raise RuntimeError(
            f"torchao does not run with this torch ({torch.__version__}): {torchao_problem()}. "
            f"The book is tested with torchao{TESTED_TORCHAO}; a newer torchao may need a newer "
            f"torch: pip install 'torchao{TESTED_TORCHAO}'"
        )
    if legacy_available():
        return "torch.ao"
    if api == "torch.ao":
        raise RuntimeError(
            f"torch {torch.__version__} no longer ships torch.ao.quantization.quantize_dynamic:"
            " use api='torchao'"
        )
    raise RuntimeError(
        f"no int8 path in torch {torch.__version__}: torch.ao.quantization.quantize_dynamic "
        "is gone and torchao does not run; pip install a torchao built for this torch"
    )


def int8_dynamic(model: nn.Module, api: str = "auto") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers hold int8 weights (dynamic activations).

    ``api="auto"`` takes torchao (supported) when it runs, else the deprecated
    ``torch.ao.quantization.quantize_dynamic``, whose deprecation warnings are caught here: the
    deprecation is documented above, and the warnings would otherwise repeat in every output.
    The model must not carry pruning masks (fold them in with ``make_permanent`` first).
    """
    from utils.pruning import clone_model, is_pruned  # the library's copy copes with pruned models

    chosen = int8_api(api)
    if is_pruned(model):
        raise ValueError(
            "the model still carries pruning masks: fold them in with "
            "utils.pruning.make_permanent(model) before quantizing"
        )
    copy = clone_model(model).eval()
    if chosen == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(copy, Int8DynamicActivationInt8WeightConfig())
        return copy
    if any(t.device.type != "cpu" for t in (*copy.parameters(), *copy.buffers())):
        raise ValueError(
            "torch.ao.quantization.quantize_dynamic runs on the CPU only: move the model "
            "to the CPU first, or install torchao"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8)
