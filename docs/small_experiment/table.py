"""The small experiment's results table, from train_llama.py's run folders (standard library only).

    python docs/small_experiment/table.py runs/small/* --val intent_recognition_val --test intent_recognition

One row per run folder: the method and its trainable parameters (from adapter.safetensors: its header and
the run config in its metadata; a folder without one is the zero-shot base model), the adapter's size, the
steps and training time (log.jsonl), accuracy on the validation and test sets with the test set's 95% Wilson
interval and held-out loss (eval.json).
"""
import argparse
import json
import math
from pathlib import Path


def adapter_info(path: Path):
    """(method, trainable parameters, bytes) of an adapter.safetensors, read from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    config = json.loads(header.pop("__metadata__", {}).get("config", "{}"))
    params = sum(math.prod(t["shape"]) for t in header.values())
    method = {"gift": "GIFT", "lora": "LoRA"}.get(config.get("method", "gift"), config.get("method"))
    names = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}  # Meta -> HF
    targets = ",".join(names.get(t.split(".")[-1], t.split(".")[-1]) for t in config.get("targets", []))
    return f"{method} {targets} r={config.get('rank')}", params, path.stat().st_size


def row(run: Path, val, test):
    ev = json.loads((run / "eval.json").read_text())
    adapter = run / "adapter.safetensors"
    method, params, size = adapter_info(adapter) if adapter.is_file() else ("zero-shot", 0, 0)
    log = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
    log = [json.loads(line) for line in log]
    seconds = sum(r.get("seconds", 0) for r in log)
    acc = lambda task: f"{ev['accuracy'][task]:.1f}" if task in ev["accuracy"] else "-"  # noqa: E731
    lo, hi = ev.get("interval95", {}).get(test, ("-", "-"))
    loss = ev.get("loss", {}).get(test)
    return (f"| {run.name} | {method} | {params:,} | {size / 1024:.0f} KiB | {log[-1]['step'] if log else 0} | "
            f"{seconds / 60:.1f} min | {acc(val)} | {acc(test)} ({lo}-{hi}) | "
            f"{'-' if loss is None else f'{loss:.4f}'} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="train_llama.py --out folders (each with eval.json)")
    p.add_argument("--val", default="intent_recognition_val", help="the validation task's name")
    p.add_argument("--test", default="intent_recognition", help="the test task's name")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "eval.json").is_file()]
    if not runs:
        p.error("none of the folders has an eval.json")
    print(f"| run | method | trainable params | adapter | steps | train time | {args.val} acc % | "
          f"{args.test} acc % (95% interval) | {args.test} held-out loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(run, args.val, args.test))


if __name__ == "__main__":
    main()
