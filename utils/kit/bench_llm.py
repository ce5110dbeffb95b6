"""LLM pruning benchmarks: ``python -m utils.kit.bench_llm [--reference DIR] [--quick]``.

(f) SparseGPT on one 4096 x 4096 layer, the same statistics given to ``utils`` and to the
    reference implementation's ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt, a checkout of it
    in ``DIR``; it is not part of this project, and without it only ``utils`` is timed).
    Interleaved, medians; 2:4 results compared weight for weight (same mask rule), 50 %
    unstructured timed only (the reference chooses its mask across rows, ``utils`` per row).
(g) A randomly initialized Llama-shaped model of about a billion parameters (transformers'
    ``LlamaForCausalLM``: hidden 2048, 16 blocks, MLP 8192) pruned to 50 % with Wanda and with
    SparseGPT, each in a fresh process: time, and peak resident memory against the model's bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import statistics
import sys
import time

import torch
from torch import nn

from utils.kit.benchmark import _fresh_process, machine, peak_extra_rss, save_results
from utils.pruning.llm import InputStats, prune_llm, sparsegpt_layer


def layer_and_stats(size: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, InputStats]:
    """A random weight and the statistics of correlated random inputs (a low-rank mix plus
    noise, so that the Hessian is far from diagonal, as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(size, size, generator=g) / size**0.5
    mix = torch.randn(size // 8, size, generator=g)
    x = torch.randn(tokens, size // 8, generator=g) @ mix + 0.1 * torch.randn(
        tokens, size, generator=g
    )
    stats = InputStats(size, torch.device("cpu"))
    stats.add(x)
    return w, stats


def _reference(directory: str):
    """The reference's ``SparseGPT`` class, imported from a checkout (CPU: its final
    ``torch.cuda.synchronize`` is made a no-op while it runs)."""
    sys.path.insert(0, directory)
    try:
        return importlib.import_module("sparsegpt").SparseGPT
    finally:
        sys.path.remove(directory)


def _run_reference(cls, w: torch.Tensor, stats: InputStats, **kw) -> torch.Tensor:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    pruner = cls(layer)
    pruner.H = stats.gram * (2 / stats.count)  # its running 2/n X^T X
    pruner.nsamples = stats.count
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its time and error
            pruner.fasterprune(**kw)
    finally:
        torch.cuda.synchronize = sync
    return layer.weight.data


def bench_sparsegpt_layer(
    reference: str | None = None, size: int = 4096, tokens: int = 4096, repeats: int = 3
) -> dict:
    """(f): seconds per call (median of ``repeats``, interleaved) for each setting."""
    w, stats = layer_and_stats(size, tokens)
    cls = _reference(reference) if reference else None
    settings = {
        "2:4": ({"nm": (2, 4)}, {"sparsity": 0.5, "prunen": 2, "prunem": 4}),
        "50 %": ({"sparsity": 0.5}, {"sparsity": 0.5}),
    }
    rows = []
    for name, (ours_kw, ref_kw) in settings.items():
        times: dict[str, list[float]] = {"utils": [], "reference": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = sparsegpt_layer(w, stats, **ours_kw)[0]
            times["utils"].append(time.perf_counter() - t0)
            if cls is not None:
                t0 = time.perf_counter()
                theirs = _run_reference(cls, w, stats, **ref_kw)
                times["reference"].append(time.perf_counter() - t0)
        row = {"layer": f"{size}x{size}", "setting": name, "tokens": tokens}
        row["utils s"] = statistics.median(times["utils"])
        if cls is not None:
            row["reference s"] = statistics.median(times["reference"])
            row["reference / utils"] = row["reference s"] / row["utils s"]
            if name == "2:4":
                row["same mask share"] = float(((ours == 0) == (theirs == 0)).float().mean())
                row["largest weight difference"] = float((ours - theirs).abs().max())
        rows.append(row)
    return {"rows": rows, "reference": reference or "not given"}


def llama_1b(hidden: int = 2048, blocks: int = 16, mlp: int = 8192, vocab: int = 32000):
    """A randomly initialized ``LlamaForCausalLM`` of about a billion parameters (float32)."""
    try:
        import transformers
    except ImportError as error:
        raise RuntimeError("(g) needs transformers: pip install transformers") from error

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def bench_llm_1b(criterion: str, samples: int = 4, length: int = 512, **shape) -> dict:
    """(g), in this process: prune the model to 50 % (zeros in place), time and peak memory."""
    with torch.no_grad():  # building and pruning need no autograd (and it is not left off)
        return _llm_1b(criterion, samples, length, shape)


def _llm_1b(criterion: str, samples: int, length: int, shape: dict) -> dict:
    model = llama_1b(**shape)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randint(0, model.config.vocab_size, (samples, length))
    seconds, extra = peak_extra_rss(
        lambda: prune_llm(model, 0.5, criterion, x, batch_size=1, install_masks=False)
    )
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "layers" in n)
    return {
        "criterion": criterion,
        "parameters": params,
        "model GB": model_bytes / 1e9,
        "calibration tokens": samples * length,
        "seconds": seconds,
        "peak extra GB": extra / 1e9,
        "peak / model bytes": (model_bytes + extra) / model_bytes,
        "zeros in the blocks": zeros,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", metavar="DIR", help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--only", default="fg", help="which parts to run (default: fg)")
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "quick": args.quick}
    print("machine:", ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    if "f" in args.only:
        size, tokens = (256, 512) if args.quick else (4096, 4096)
        results["sparsegpt_layer"] = bench_sparsegpt_layer(args.reference, size, tokens)
        print(f"(f) SparseGPT, one layer (reference: {results['sparsegpt_layer']['reference']})")
        for row in results["sparsegpt_layer"]["rows"]:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if "g" in args.only:
        shape = "hidden=256, blocks=2, mlp=512, vocab=512" if args.quick else ""
        size = "samples=2, length=32" if args.quick else "samples=4, length=512"
        results["llm_1b"] = [
            _fresh_process(
                "import json; from utils.kit.bench_llm import bench_llm_1b as b; "
                f"print(json.dumps(b({criterion!r}, {size}, {shape})))",
                timeout=1800,
            )
            for criterion in ("wanda", "sparsegpt")
        ]
        print("(g) a Llama-shaped model pruned to 50 %, each criterion in a fresh process")
        for row in results["llm_1b"]:
            print("   ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return save_results(results, args.json)


if __name__ == "__main__":
    main()
