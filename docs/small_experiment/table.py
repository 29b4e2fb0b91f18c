"""The small experiment's results tables, from train_llama.py's run folders (standard library only).

    python docs/small_experiment/table.py runs/study/*/* [--test snips_words ...] [--per-seed]

Runs are grouped by recipe: test task (which also names the answer form: snips_index has answers answer1..answer7,
snips_words the intents' names), method, targets, rank and learning rate. One row per recipe: test accuracy as mean
+- sample standard deviation over its seeds, the number of seeds, the 95% Wilson interval of the pooled predictions
(all seeds' correct answers over all their test examples), the validation accuracy (mean over seeds; it is what
chooses the learning rate), trainable parameters, adapter size, steps and training time (mean per run). --per-seed
adds one row per run.

What a run folder holds:
- eval.json (train_llama.py's evaluation): "accuracy" {task: %}, "n" {task: examples}, "interval95" {task: [lo,
  hi]}, "loss" {task: held-out loss}. A task's validation split is the task named TASK_val (prepare.py's layout).
- adapter.safetensors: the trainable parameters (counted from its header) and the run config in its metadata
  ("config", JSON): method, targets, rank, and the run's "lr" and "seed". A run whose config has no lr (runs
  made before train_llama.py wrote it) is a recipe of its own; a folder without an adapter is the zero-shot
  base model.
- log.jsonl: training records {"step", "loss", "seconds", ...} and validation records {"step", "val_task",
  "val_accuracy", "val_loss", ...} (curves.py's docstring); the training time is the sum of the training records'
  seconds, the time spent on validation during training (their val_seconds) is shown apart.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

SHORT = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}  # Meta -> HF names


def adapter_info(path: Path):
    """(run config, trainable parameters, bytes) of an adapter.safetensors, read from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    config = json.loads(header.pop("__metadata__", {}).get("config", "{}"))
    return config, sum(math.prod(t["shape"]) for t in header.values()), path.stat().st_size


def run_info(run: Path):
    """{label, recipe, lr, seed, params, size} of a run folder (the module docstring says where each comes from)."""
    adapter = run / "adapter.safetensors"
    if not adapter.is_file():
        return {"label": "zero-shot", "recipe": ("zero-shot",), "lr": None, "seed": None, "params": 0, "size": 0}
    config, params, size = adapter_info(adapter)
    method = {"gift": "GIFT", "lora": "LoRA"}.get(config.get("method", "gift"), config.get("method"))
    targets = ",".join(SHORT.get(t.split(".")[-1], t.split(".")[-1]) for t in config.get("targets", []))
    label, lr = f"{method} {targets} r={config.get('rank')}", config.get("lr")
    return {"label": label + (f", lr {lr:g}" if lr is not None else ""), "lr": lr, "seed": config.get("seed"),
            "recipe": (label, lr) if lr is not None else (label, run.name), "params": params, "size": size}


def read_log(run: Path):
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def wilson_interval(correct, n, z=1.96):
    """The 95% Wilson score interval (%) of correct out of n (train_llama.py's, on counts)."""
    if n == 0:
        return [0.0, 100.0]
    p, q = correct / n, z * z / n
    mid, half = (p + q / 2) / (1 + q), z * math.sqrt(p * (1 - p) / n + q / (4 * n)) / (1 + q)
    return [round(max(0.0, 100 * (mid - half)), 1), round(min(100.0, 100 * (mid + half)), 1)]


def results(runs, tests=None):
    """One dict per (run, test task) with everything the tables show."""
    rows = []
    for run in runs:
        ev, info, log = json.loads((run / "eval.json").read_text()), run_info(run), read_log(run)
        train = [r for r in log if "loss" in r]
        for task in tests or [t for t in ev["accuracy"] if t in ev.get("n", {}) and not t.endswith("_val")]:
            if task not in ev["accuracy"]:
                continue
            n = ev["n"][task]
            rows.append({**info, "run": run.name, "task": task, "acc": ev["accuracy"][task], "n": n,
                         "correct": round(ev["accuracy"][task] * n / 100),  # eval.json keeps the percentage
                         "val": ev["accuracy"].get(task + "_val"), "interval": ev["interval95"][task],
                         "loss": ev["loss"][task], "steps": train[-1]["step"] if train else 0,
                         "seconds": sum(r.get("seconds", 0) for r in train),
                         "val_seconds": sum(r.get("val_seconds", 0) for r in log if "val_task" in r)})
    return rows


def group(rows):
    """{(task, recipe): [rows]}, seeds in order."""
    groups = {}
    for r in sorted(rows, key=lambda r: (r["task"], str(r["recipe"]), str(r["seed"]))):
        groups.setdefault((r["task"], r["recipe"]), []).append(r)
    return groups


def summary(rows):
    """Mean and sample std (None for one seed) of test accuracy, the pooled interval, mean validation accuracy."""
    accs, vals = [r["acc"] for r in rows], [r["val"] for r in rows if r["val"] is not None]
    correct, n = sum(r["correct"] for r in rows), sum(r["n"] for r in rows)
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "seeds": len(rows), "pooled": 100 * correct / n, "interval": wilson_interval(correct, n),
            "val": statistics.mean(vals) if vals else None}


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def grouped_table(rows):
    lines = ["| task | recipe | seeds | test acc % mean +- std | pooled test acc % (95% interval) | val acc % (mean) "
             "| trainable params | adapter | steps | train time | eval time in training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (task, _), rs in group(rows).items():
        s, r = summary(rs), rs[0]
        lo, hi = s["interval"]
        spread = f"{s['mean']:.1f} +- {s['std']:.1f}" if s["std"] is not None else f"{s['mean']:.1f}"
        lines.append(f"| {task} | {r['label']} | {s['seeds']} | {spread} | {s['pooled']:.1f} ({lo}-{hi}) | "
                     f"{fmt(s['val'])} | {r['params']:,} | {r['size'] / 1024:.0f} KiB | {r['steps']} | "
                     f"{statistics.mean(x['seconds'] for x in rs) / 60:.1f} min | "
                     f"{statistics.mean(x['val_seconds'] for x in rs) / 60:.1f} min |")
    return "\n".join(lines)


def per_seed_table(rows):
    lines = ["| run | task | recipe | seed | val acc % | test acc % (95% interval) | held-out loss | steps | "
             "train time |", "|---|---|---|---|---|---|---|---|---|"]
    for rs in group(rows).values():
        for r in rs:
            lo, hi = r["interval"]
            lines.append(f"| {r['run']} | {r['task']} | {r['label']} | {fmt(r['seed'], '')} | {fmt(r['val'])} | "
                         f"{r['acc']:.1f} ({lo}-{hi}) | {r['loss']:.4f} | {r['steps']} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="train_llama.py --out folders (each with eval.json)")
    p.add_argument("--test", nargs="+", help="the test tasks to show (default: every task in eval.json whose "
                   "name does not end in _val)")
    p.add_argument("--per-seed", action="store_true", help="also one row per run")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "eval.json").is_file()]
    if not runs:
        p.error("none of the folders has an eval.json")
    rows = results(runs, args.test)
    print(grouped_table(rows))
    if args.per_seed:
        print("\n" + per_seed_table(rows))


if __name__ == "__main__":
    main()
