"""Train the book's model zoo (utils.lab.zoo) and record it: ``python scripts/train_zoo.py``.

Deterministic on a given machine: every member starts from ``zoo.fresh(name, seed)`` and draws
its batches and shifts from generators seeded by its seed. Writes the float16 checkpoints and
``zoo.json`` (recipes, per-seed validation and test accuracy or perplexity, run times) into
``utils/lab/zoo_weights/``, and prints the README's table. ``--only lenet5`` (or
``lenet5-half``, ``lenet300100``, ``charlm``) retrains one kind and keeps the others' records.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from utils.lab import zoo
from utils.lab.data import load_mnist
from utils.lab.training import evaluate


def image_members(name: str, loaders) -> dict:
    train, val, test = loaders
    rows = {}
    for seed in zoo.MEMBER_SEEDS[name]:
        model, log = zoo.train_member(name, seed, train, val, progress=False)
        file = zoo.path(name, seed, "subset")
        zoo.save(model, file)
        loaded = zoo.load(name, seed)  # what a chapter gets: the float16 round trip
        rows[seed] = {
            "val": evaluate(loaded, val),
            "test": evaluate(loaded, test),
            "best_epoch": log["best_epoch"],
            "seconds": round(log["seconds"], 1),
            "val_curve": log["val_curve"],
        }
        print(
            f"{name} seed {seed}: val {rows[seed]['val']:.4f} test {rows[seed]['test']:.4f} "
            f"(epoch {log['best_epoch']}, {log['seconds']:.0f} s)",
            flush=True,
        )
    return {"recipe": log["recipe"], "data": "subset", "seeds": rows}


def lm_members() -> dict:
    from utils.lab.lm import char_data, perplexity

    data, rows = char_data(), {}
    for seed in zoo.LM_SEEDS:
        model, log = zoo.train_lm_member(seed, progress=True)
        zoo.save(model, zoo.path("charlm", seed, "text"))
        loaded = zoo.load("charlm", seed)
        rows[seed] = {
            "val_ppl": perplexity(loaded, data.val[: zoo.LM.select_tokens + 1]),
            "best_step": log["best_step"],
            "seconds": round(log["seconds"], 1),
            "select_curve": log["select_curve"],
        }
        print(
            f"charlm seed {seed}: chapter-9 validation perplexity {rows[seed]['val_ppl']:.3f} "
            f"(step {log['best_step']}, {log['seconds']:.0f} s)",
            flush=True,
        )
    return {
        "recipe": log["recipe"],
        "data": "tinyshakespeare",
        "vocab_size": len(data.vocab),
        "seeds": rows,
    }


def table(records: dict) -> str:
    """The README's table: one row per zoo kind, mean +- SD over seeds."""
    lines = [
        "| member | seeds shipped | recipe | chosen on (validation) | reported (test) | training time |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in records["members"].items():
        seeds = r["seeds"].values()
        mins = sum(s["seconds"] for s in seeds) / 60
        if name == "charlm":
            ppl = [s["val_ppl"] for s in seeds]
            rc = r["recipe"]
            lines.append(
                f"| charlm | {', '.join(map(str, r['seeds']))} | AdamW, {rc['steps']} steps, cosine, wd "
                f"{rc['weight_decay']} | the step with the lowest perplexity on the last 16,384 "
                f"validation characters | perplexity on the first 16,384: "
                f"{statistics.mean(ppl):.3f} ± {statistics.stdev(ppl):.3f} | "
                f"{mins:.0f} min |"
            )
            continue
        val = [100 * s["val"] for s in seeds]
        test = [100 * s["test"] for s in seeds]
        rc = r["recipe"]
        lines.append(
            f"| {name} | {', '.join(map(str, r['seeds']))} | SGD {rc['lr']}, momentum {rc['momentum']}, wd "
            f"{rc['weight_decay']}, cosine, {rc['epochs']} epochs, shifts ±{rc['shift']} "
            f"px | the epoch of best accuracy (so biased up), {statistics.mean(val):.2f} ± "
            f"{statistics.stdev(val):.2f} % | "
            f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f} % | "
            f"{mins:.0f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*zoo.MODELS, "charlm"])
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = zoo.SHIPPED / "zoo.json"
    records = json.loads(out.read_text()) if out.exists() else {"members": {}}
    loaders = load_mnist("subset", validation=True, verbose=False)
    t0 = time.perf_counter()
    for name in (*zoo.MODELS, "charlm"):
        if args.only not in (None, name):
            continue
        records["members"][name] = (
            lm_members() if name == "charlm" else image_members(name, loaders)
        )
    records["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f} s; README table:\n{table(records)}")


if __name__ == "__main__":
    main()
