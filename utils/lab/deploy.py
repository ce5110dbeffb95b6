"""From a PyTorch model to runtimes people deploy with: BatchNorm folding, ``torch.compile``,
ONNX export, ONNX Runtime sessions, int8 by ONNX Runtime's static quantization, and timing with
spread (chapter 5.2).

ONNX Runtime's packages (``onnx``, ``onnxruntime``, ``onnxscript`` for the exporter) are
imported when first used, so the rest of :mod:`utils` does not need them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

INPUT, OUTPUT = "x", "logits"  # the names of the exported graph's input and output


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that follows a convolution folded
    into it (``w' = w * gamma / sigma``, ``b' = (b - mu) * gamma / sigma + beta``): the same
    outputs with one layer and one pass over the activations fewer. Needs a model that
    ``torch.fx`` can trace; raises ``ValueError`` (the model untouched) otherwise."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=False)
    except Exception as error:  # an untraceable forward: say so instead of a trace dump
        raise ValueError(f"fold_batchnorm needs an FX-traceable model: {error}") from error


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (eval mode) to an ONNX file with the torch.export-based exporter, the
    batch dimension left free; returns the path. BatchNorm after a convolution comes out folded
    into it (the exporter's optimizer does that for inference graphs)."""
    try:  # the exporter writes through onnx and onnxscript: say so before torch fails deep inside
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "export_onnx needs the onnx and onnxscript packages: pip install onnx onnxscript"
        ) from error
    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        input_names=[INPUT],
        output_names=[OUTPUT],
        verbose=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def ort_session(path: str | Path, threads: int, spinning: bool = False):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, every graph optimization on,
    and **no spinning** unless ``spinning=True`` (ONNX Runtime's own default): spinning threads
    keep a core busy after each run, and when runtimes take turns (an interleaved benchmark, or
    a server with other work) they steal the cores of whatever runs next."""
    import onnxruntime as ort

    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(x) -> logits`` for a session made by :func:`ort_session`, tensors in and out."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT: x.contiguous().numpy()})[0])

    return run


def quantize_int8(path: str | Path, calibration: Iterable[torch.Tensor], out: str | Path) -> Path:
    """Static int8 quantization of an exported model by ONNX Runtime: weights per output channel
    (signed), activations per tensor (unsigned) with ranges from ``calibration`` batches,
    quantize/dequantize pairs that the session fuses into integer kernels; returns ``out``. The
    model is first prepared as ONNX Runtime's quantization guide asks (``quant_pre_process``:
    shape inference and graph optimization)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT: x.contiguous().numpy()} for x in calibration])

        def get_next(self):
            return next(self.batches, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    prepared = out.with_name(out.stem + "-prepared.onnx")
    quant_pre_process(str(path), str(prepared))  # shapes inferred, graph optimized first
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    return out


def spread(times: list[float]) -> dict[str, float]:
    """Median and interquartile range (25th and 75th percentiles) of a list of times, in ms."""
    if len(times) < 2:
        raise ValueError("need at least two times for a spread")
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median ms": 1e3 * med, "q1 ms": 1e3 * q1, "q3 ms": 1e3 * q3}


def cuda_times(fn: Callable[[], object], repeats: int = 50, warmup: int = 10) -> list[float]:
    """Times (s) of ``fn`` on the current CUDA stream measured with CUDA events: from the first
    kernel queued to the last one finished, not when Python got control back (for a small model
    that includes the GPU's idle gaps between kernel launches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose ``(cost, quality)`` point no other point dominates (another as cheap or
    cheaper and as good or better, and not the same point), ordered by cost: the choices worth
    considering when lower cost (latency) and higher quality (accuracy) are both wanted."""

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points.values())

    front = [n for n, p in points.items() if not dominated(p)]
    return sorted(front, key=lambda n: (points[n][0], -points[n][1], n))
