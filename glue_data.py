"""GLUE for train_glue.py: the six tasks of the GIFT paper, their TSV files, per-size presets (each with its
source), the metrics, the table of runs (mean +- std over seeds) and the demo's generated data set.

    rows = read_tsv("glue_data/RTE/dev.tsv", TASKS["rte"])    # [(sentence A, sentence B or None, label or score)]
    python train_glue.py --table runs/*                       # table(): a row per backbone, method and rank
"""
import math
from collections import namedtuple
from pathlib import Path

import torch

from encoder import DEMO_WORDS, encode_example, load_text_tokenizer, max_tokens, write_demo_model
from fileio import UserError, read_json, utf8_text
from harness import progress

# A GLUE task: its folder in the GLUE download, the column names of sentence A and B (B None: one sentence) and of
# the label, the label strings in id order (None: a regression score), the metric, the epochs of the two size
# presets (see PRESETS), and the column names of a file without a header row (CoLA).
Task = namedtuple("Task", "folder text label labels metric epochs columns", defaults=[()])
TASKS = {"sst2": Task("SST-2", ("sentence", None), "label", ("0", "1"), "accuracy", (60, 10)),
         "mrpc": Task("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", (30, 20)),
         "cola": Task("CoLA", ("sentence", None), "label", ("0", "1"), "mcc", (80, 20),
                      ("source", "label", "original_label", "sentence")),
         "qnli": Task("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy",
                      (25, 10)),
         "rte": Task("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy",
                     (80, 20)),
         "stsb": Task("STS-B", ("sentence1", "sentence2"), "score", None, "pearson", (40, 10))}

# The size presets: (index into Task.epochs, batch, max length, where the numbers come from). A model with hidden
# size >= 1024 takes the Large one (the GIFT paper's batch 128 / length 128 rule), any other the Base one.
LORA = "the LoRA paper (Hu et al. 2021, Table 9; microsoft/LoRA examples/NLU/roberta_{}_*.sh)"
PRESETS = {"RoBERTa-Base": (0, 64, 512, f"epochs: {LORA.format('base')}; batch 64, max length 512: the GIFT paper"),
           "RoBERTa-Large": (1, 128, 128, f"epochs: {LORA.format('large')}; batch 128, max length 128: the GIFT "
                                          f"paper")}

# The paper's GLUE averages (v3, %) over the six tasks on dev (REFERENCE.md gives no per-task cells).
PAPER = {("RoBERTa-Base", "gift"): 85.1, ("RoBERTa-Base", "lora"): 86.6,
         ("RoBERTa-Large", "gift"): 87.5, ("RoBERTa-Large", "lora"): 87.8}
PAPER_SEEDS = (42, 43, 44, 45, 46)  # the runs each cell averages (see docs/glue.md for the source)


def preset(config, task: Task):
    """(name, epochs, batch size, max length, source) of the size preset for this model and task."""
    name = "RoBERTa-Large" if config.hidden_size >= 1024 else "RoBERTa-Base"
    i, batch, max_len, source = PRESETS[name]
    return name, task.epochs[i], batch, min(max_len, max_tokens(config)), source


def read_tsv(path, task: Task):
    """[(sentence A, sentence B or None, label id or score)]. Fields are split on tabs with no quoting, as the
    GLUE files are written (a quote is an ordinary character); every row must have the header's field count; a
    score must be a finite number."""
    with utf8_text(path):
        lines = [line.rstrip("\r") for line in Path(path).read_text(encoding="utf-8-sig").split("\n")]  # MRPC: BOM
    lines = lines[:-1] if lines[-1] == "" else lines
    names, first = (task.columns, 0) if task.columns else (lines[0].split("\t") if lines else [], 1)
    want = [c for c in (*task.text, task.label) if c is not None]
    if any(c not in names for c in want):
        raise UserError(f"{path}: columns {want} expected in the header, found {names} (is it {task.folder}?)")
    a, b, y = (names.index(c) if c is not None else None for c in (*task.text, task.label))
    rows = []
    for i, line in enumerate(lines[first:], first + 1):
        f = line.split("\t")
        if len(f) != len(names):
            raise UserError(f"{path}:{i}: {len(f)} tab-separated fields, expected {len(names)} ({names})")
        if task.labels is None:
            try:
                label = float(f[y])
            except ValueError:
                raise UserError(f"{path}:{i}: score {f[y]!r} is not a number") from None
            if not math.isfinite(label):  # float() takes "nan" and "inf": a NaN loss, or a crash in evaluation
                raise UserError(f"{path}:{i}: score {f[y]!r} is not a finite number")
        elif f[y] in task.labels:
            label = task.labels.index(f[y])
        else:
            raise UserError(f"{path}:{i}: label {f[y]!r} is not one of {task.labels}")
        rows.append((f[a], f[b] if b is not None else None, label))
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def load_splits(model_dir, config, data, task, max_len, splits):
    """[(ids, types, label)] of each split; the tokenizer is checked against the model before any weight is read,
    and every file is read (and checked) before any is tokenized."""
    tok, cls, sep = load_text_tokenizer(model_dir, config)
    rows = [read_tsv(Path(data, f"{s}.tsv"), task) for s in splits]
    return [[(*encode_example(tok, cls, sep, config.model_type, a, b, max_len), y) for a, b, y in
             progress(r, desc=f"tokenizing {s}")] for s, r in zip(splits, rows)]


def score(metric, preds, labels):
    """The paper's metrics, in percent: accuracy, Matthews correlation (CoLA), Pearson correlation (STS-B)."""
    p, y = torch.tensor(preds, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)
    if metric == "accuracy":
        return 100 * (p == y).double().mean().item()
    if metric == "pearson":
        p, y = p - p.mean(), y - y.mean()
        return 100 * ((p * y).sum() / (p.norm() * y.norm()).clamp_min(1e-300)).item()
    tp, tn = ((p == 1) & (y == 1)).sum().item(), ((p == 0) & (y == 0)).sum().item()
    fp, fn = ((p == 1) & (y == 0)).sum().item(), ((p == 0) & (y == 1)).sum().item()
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 100 * (tp * tn - fp * fn) / denom if denom else 0.0  # 0 for a constant prediction, as sklearn


def mean_std(values):
    """(mean, sample standard deviation with n - 1; 0 for one value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def table(dirs):
    """The six-task table of finished runs (their results.json), a row per (backbone, method, rank): each cell
    the mean +- std (%) over the row's seeds and their number, as the paper's table; the average over the six
    tasks' means beside the paper's. Two runs of one task with one seed in a row are an error (counted twice)."""
    rows, seen = {}, {}
    for path in (Path(d) / "results.json" for d in dirs):
        if not path.is_file():
            raise UserError(f"{path} does not exist (a finished run writes it)")
        r = read_json(path)
        if r["task"] not in TASKS or not isinstance(r["best"], (int, float)) or not math.isfinite(r["best"]):
            raise UserError(f"{path}: task {r['task']!r}, best {r['best']!r}: not a result of train_glue.py")
        key = (r["backbone"] or r["model"], r["method"], r.get("rank"))
        if (other := seen.setdefault((*key, r["task"], r.get("seed")), path)) != path:
            raise UserError(f"{other} and {path} are both {r['task']} seed {r.get('seed')} of {key[0]} {key[1]}: "
                            f"give each run once")
        rows.setdefault(key, {}).setdefault(r["task"], []).append(r["best"])
    lines = ["| backbone | method | rank | " + " | ".join(f"{TASKS[t].folder} (%)" for t in TASKS) +
             " | avg (%) | paper avg (%) |", "|---" * (len(TASKS) + 5) + "|"]
    for (backbone, method, rank), scores in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        stats = {t: mean_std(v) for t, v in scores.items()}
        avg = f"{sum(m for m, _ in stats.values()) / len(TASKS):.1f}" if len(stats) == len(TASKS) else "-"
        cells = " | ".join(f"{stats[t][0]:.1f} ± {stats[t][1]:.1f} (n={len(scores[t])})" if t in stats else "-"
                           for t in TASKS)
        paper = PAPER.get((backbone, method), "-") if rank in (None, 32 if method == "gift" else 8) else "-"
        lines.append(f"| {backbone} | {method} | {rank or '-'} | {cells} | {avg} | {paper} |")
    lines.append("cells: mean ± sample std over n seeds of each run's best dev epoch (%); the paper's per-task cells "
                 "are not given here (docs/glue.md)")
    print(text := "\n".join(lines))
    return text


def make_demo(root):
    """root/model (encoder.write_demo_model) and root/data/SST-2 (train.tsv, dev.tsv: is the review positive?)."""
    g = torch.Generator().manual_seed(0)
    pick = lambda seq: seq[int(torch.randint(len(seq), (), generator=g))]  # noqa: E731
    data = root / "data" / "SST-2"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 640), ("dev", 160)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(torch.randint(2, (), generator=g))
            words = [pick(DEMO_WORDS[None]) for _ in range(int(torch.randint(4, 9, (), generator=g)))]
            words.insert(int(torch.randint(len(words) + 1, (), generator=g)), pick(DEMO_WORDS[label]))
            lines.append(" ".join(words) + f" .\t{label}")
        (data / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return write_demo_model(root / "model"), data
