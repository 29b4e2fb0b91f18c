"""GIFT on RoBERTa / BERT for GLUE: HF checkpoints in, the paper's sequence-classification table out.

The paper's third benchmark: GIFT_QV (one Theta for every `query`, one for every `value`, rank 32) plus a new
head, trained on six GLUE tasks (SST-2, MRPC, CoLA, QNLI, RTE, STS-B) with AdamW, linear schedule, 6% warmup,
batch 64 / max length 512 (Base), 128 / 128 (Large), scored on dev after every epoch, the best epoch reported
(Matthews correlation for CoLA, Pearson for STS-B, accuracy otherwise). The model is encoder.py.

    python train_glue.py --demo                        # generated data + a random RoBERTa in HF format (<1 min, CPU)
    python train_glue.py --model roberta-base --task rte --data glue_data/RTE --out runs/rte
    torchrun --nproc_per_node=4 train_glue.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_glue.py ...same flags... --resume                  # continue from runs/rte/checkpoint.pt, exactly
    python train_glue.py --method lora --model roberta-base ...      # the LoRA baseline (r=8, alpha 16, q and v)
    python train_glue.py --adapter runs/rte/adapter.safetensors --data glue_data/RTE --eval-only  # score an adapter
    python train_glue.py --adapter runs/rte/best.safetensors --merge runs/rte-merged  # a new HF folder, plain weights
    python train_glue.py --model runs/rte-merged --data glue_data/RTE --eval-only     # score a merged folder
    python train_glue.py --table runs/*                             # the six-task table beside the paper's

The paper's lr and weight decay were chosen per task from a grid (lr 1e-4 ... 1e-3, wd 0 ... 0.01), runs repeated
with seeds 42-46. Pairs longer than --max-len are cut as HF's `longest_first` truncation in tokenizers 0.23.3
(0.23.2 differs: max length 9, 10 + 9 words, it keeps 2 words of the first where 0.23.3 keeps 3). Training starts
a new adapter and head; --eval-only without --adapter scores a merged folder with its own head (a base model
has none). Ctrl-C / SIGTERM / --stop-after N: the step ends, is saved, no evaluation, exit 0; --resume continues.
A mistake is one line `error: ...` (exit status 2) before any model is loaded.
"""
import argparse
import json
import math
import os
import tempfile
import time
from collections import namedtuple
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from encoder import DEMO_WORDS, SequenceClassifier, check_targets, collate, encode_example, load_model, \
    load_text_tokenizer, loss_fn, max_tokens, paper_defaults, paper_size, read_config, save_classifier, write_demo_model
from fileio import UserError, atomic_write, fingerprint, read_json, read_safetensors, utf8_text
from gift import add_gift, parameter_summary
from harness import HelpFormatter, Run, adapter_config, adapter_state_dict, add_adapter, add_common_flags, \
    check_finite, check_new_output, check_ranges, cli, close_distributed, fused_adamw, load_adapter_state_dict, \
    merge_adapter, print0, progress, setup_distributed
from lora import add_lora


# A GLUE task: its folder in the GLUE download, the column names of sentence A and B (B None: one sentence) and of
# the label, the label strings in id order (None: a regression score), the metric, the default epochs (LoRA's
# RoBERTa-base runs, microsoft/LoRA examples/NLU), and the column names of a file without a header row (CoLA).
Task = namedtuple("Task", "folder text label labels metric epochs columns", defaults=[()])
TASKS = {"sst2": Task("SST-2", ("sentence", None), "label", ("0", "1"), "accuracy", 60),
         "mrpc": Task("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", 30),
         "cola": Task("CoLA", ("sentence", None), "label", ("0", "1"), "mcc", 80,
                      ("source", "label", "original_label", "sentence")),
         "qnli": Task("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy", 25),
         "rte": Task("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy", 80),
         "stsb": Task("STS-B", ("sentence1", "sentence2"), "score", None, "pearson", 40)}

# What fixes a run's trajectory besides its inputs: --resume refuses a checkpoint written with other values
RUN_FIELDS = ("task", "method", "targets", "rank", "share", "lora_alpha", "epochs", "batch_size", "lr", "head_lr",
              "weight_decay", "head_weight_decay", "warmup", "max_len", "seed", "precision")


def train(args):
    """GIFT (or LoRA) and a new head on --model, trained on train.tsv, scored on dev.tsv every epoch. Writes OUT/
    log.jsonl, checkpoint.pt, best.safetensors (the best epoch's), adapter.safetensors, results.json."""
    rank, world, _, device = setup_distributed(args.device)
    task, config = TASKS[args.task], read_config(args.model)
    if args.batch_size % world:  # each process takes every world-th example of a global batch
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be divisible by {world} processes")
    # a used --out, a changed setting or input: found before anything is loaded
    run = Run(args.out, run_settings(args), ("adapter", "optimizer", "step", "history", "loss_sum"), args.resume,
              rank, log_key="epoch")  # on return, the frame drops DDP before main's close_distributed
    ckpt = run.checkpoint
    if ckpt and args.stop_after and ckpt["step"] >= args.stop_after:
        raise UserError(f"--stop-after {args.stop_after}: {run.checkpoint_path} is at step {ckpt['step']} already")
    train_set, dev_set = load_splits(args.model, config, args.data, task, args.max_len, ("train", "dev"))
    torch.manual_seed(args.seed)  # the same new head, phi and LoRA A on every process and in every run
    model = load_model(args.model, num_labels=1 if task.labels is None else len(task.labels), log=print0)
    if args.method == "gift":  # W (I + phi psi), one Theta = (phi, psi) per target type, the backbone frozen
        add_gift(model, args.targets, args.rank, args.share)
    else:                      # W + (alpha/r) B A in every targeted layer
        add_lora(model, args.targets, args.rank, args.lora_alpha)
    model.classifier.requires_grad_(True)  # the new head trains in full
    model.to(device)
    print0(f"{args.method} on {args.targets}, rank {args.rank}: {parameter_summary(model)} (with the head)")
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)  # the last, partial batch is kept (as the paper)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup * total)  # as the authors' script: int(warmup_ratio * steps)
    groups = [(p, (args.head_lr, args.head_weight_decay) if n.startswith("classif") else (args.lr, args.weight_decay))
              for n, p in model.named_parameters() if p.requires_grad]
    # weight decay on matrices only (biases are never decayed), head and adapter each with its own lr and wd
    opt = fused_adamw([{"params": [p], "lr": lr, "base_lr": lr, "weight_decay": wd if p.ndim >= 2 else 0.0}
                       for p, (lr, wd) in groups])
    step, history, loss_sum = 0, [], [0.0, 0]
    if ckpt:
        load_adapter_state_dict(model, ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history, loss_sum = ckpt["step"], ckpt["history"], ckpt["loss_sum"]
        print0(f"resumed from {run.checkpoint_path} at step {step} of {total}")
    saved = step  # the step of the checkpoint on disk (0: none yet)

    def save():  # progress in epochs evaluated (the log's key); the step inside the state
        nonlocal saved
        run.save({"adapter": adapter_state_dict(model, ["classifier"]), "optimizer": opt.state_dict(), "step": step,
                  "history": history, "loss_sum": loss_sum}, len(history))
        saved = step

    net = compile_model(model) if args.compile else model
    # DDP over the trainable tensors only: the frozen backbone is never synchronised. `model` stays the module.
    ddp = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p, _ in groups]
    with run.catch_signals():
        for epoch in range(len(history), args.epochs):  # a run stopped at an epoch's end evaluates it on resume
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            first = step - epoch * steps_per_epoch
            bar = progress(total=steps_per_epoch, initial=first, disable=rank != 0, leave=False,
                           desc=f"epoch {epoch + 1}/{args.epochs}")
            t0 = time.time()
            for k in range(first, steps_per_epoch):
                batch = order[k * args.batch_size:(k + 1) * args.batch_size]
                # reseeded per (step, rank): dropout draws the same masks whether or not the run was resumed
                torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
                net.train()
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(step, warmup, total)
                mine = batch[rank::world]  # a process left without examples (a last batch < world) runs one, weight 0
                ids, types, mask, labels = collate([train_set[i] for i in mine or batch[:1]], args.pad, device)
                with autocast(args, device):
                    loss = loss_fn(ddp(ids, types, mask), labels) * bool(mine)
                (loss * world / len(batch)).backward()  # the mean over the global batch (DDP averages processes)
                norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # no clipping: the norm of DDP's mean grads
                total_loss = loss.detach().float()
                if world > 1:
                    dist.all_reduce(total_loss)  # every process stops at the same step
                check_finite(f"step {step + 1}", f"{run.checkpoint_path} (step {saved}) is kept" if saved else
                             "nothing was saved", loss=total_loss, gradient_norm=norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_sum = [loss_sum[0] + total_loss.item(), loss_sum[1] + len(batch)]
                bar.update()
                if run.should_stop() or step == args.stop_after:  # Ctrl-C / SIGTERM / --stop-after: no evaluation
                    bar.close()
                    save()
                    print0(run.stopped_message(step, total))
                    return history
                if args.save_every and step % args.save_every == 0 and k < steps_per_epoch - 1:
                    save()  # mid-epoch; the epoch's last step is saved below, with its evaluation
            bar.close()
            value = evaluate(net, dev_set, task.metric, args.pad, args, device)
            history.append({"epoch": epoch + 1, "step": step, "train_loss": round(loss_sum[0] / loss_sum[1], 6),
                            f"dev_{task.metric}": round(value, 4), "lr": opt.param_groups[0]["lr"],
                            "seconds": round(time.time() - t0, 1)})
            loss_sum = [0.0, 0]
            run.log(history[-1])
            print0(json.dumps(history[-1]))  # the epoch's bar has closed: a line of its own
            if value > max((h[f"dev_{task.metric}"] for h in history[:-1]), default=-math.inf):
                # the paper reports the best epoch (the first of equals, as the authors' saver)
                run.write_adapter(adapter_state_dict(model, ["classifier"]), adapter_config_of(args, model),
                                  "best.safetensors")
            save()
    run.write_adapter(adapter_state_dict(model, ["classifier"]), adapter_config_of(args, model))
    if rank == 0:
        write_results(args, model, history)
    return history


def compile_model(model):  # --compile; GIFT_COMPILE_BACKEND picks another backend (the CPU test: aot_eager)
    return torch.compile(model, backend=os.environ.get("GIFT_COMPILE_BACKEND", "inductor"))


def autocast(args, device):  # --precision bf16: autocast (the adapter and head keep fp32 weights); else a no-op
    return torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")


def lr_factor(step, warmup, total):  # HF's linear schedule: 0 at the first update, the peak after warmup, 0 at total
    return step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def run_settings(args):
    """What a resumed run must share with the checkpoint's: RUN_FIELDS, and the inputs by content (moved: the same)."""
    return {**{f: getattr(args, f) for f in RUN_FIELDS}, "model": fingerprint(args.model),
            "train": fingerprint(Path(args.data, "train.tsv")), "dev": fingerprint(Path(args.data, "dev.tsv"))}


# ----------------------------------------------------------------------------- GLUE's TSV files (a folder per task)
def read_tsv(path, task: Task):
    """[(sentence A, sentence B or None, label id or score)]. Fields are split on tabs with no quoting, as the
    GLUE files are written (a quote is an ordinary character); every row must have the header's field count."""
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
        elif f[y] in task.labels:
            label = task.labels.index(f[y])
        else:
            raise UserError(f"{path}:{i}: label {f[y]!r} is not one of {task.labels}")
        rows.append((f[a], f[b] if b is not None else None, label))
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def load_splits(model_dir, config, data, task, max_len, splits):
    """[(ids, types, label)] of each split; the tokenizer is checked against the model before any weight is read."""
    tok, cls, sep = load_text_tokenizer(model_dir, config)
    return [[(*encode_example(tok, cls, sep, config.model_type, a, b, max_len), y) for a, b, y in
             progress(read_tsv(Path(data, f"{s}.tsv"), task), desc=f"tokenizing {s}")] for s in splits]


# ----------------------------------------------------------------------------- evaluation and the table
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


@torch.no_grad()
def evaluate(net, examples, metric, pad, args, device):
    """The metric (%) over all examples; each process scores every world-th one, in length order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net.eval()
    mine, out = sorted(range(rank, len(examples), world), key=lambda i: len(examples[i][0])), []
    for k in range(0, len(mine), args.eval_batch_size):
        idx = mine[k:k + args.eval_batch_size]
        ids, types, mask, _ = collate([examples[i] for i in idx], pad, device)
        with autocast(args, device):
            logits = net(ids, types, mask)
        out += zip(idx, (logits[:, 0] if logits.shape[1] == 1 else logits.argmax(1)).tolist())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = [p for part in parts for p in part]
    out.sort()
    return score(metric, [p for _, p in out], [examples[i][2] for i, _ in out])


def evaluate_only(args):
    """--eval-only: --adapter on its base (--model, else its own), or a merged folder with its head, on dev.tsv."""
    device = setup_distributed(args.device)[3]
    run = read_adapter_config(args.adapter) if args.adapter else {}
    model_dir, task = args.model or run["model"], TASKS[args.task]
    config = read_config(model_dir)  # the tokenizer is checked below, before the weights are read
    max_len = args.max_len or run.get("max_len") or paper_defaults(config)[1]
    dev, = load_splits(model_dir, config, args.data, task, max_len, ["dev"])
    model = (model_with_adapter(args.adapter, args.model)[1] if args.adapter else load_model(model_dir, log=print0))
    net = compile_model(model.to(device)) if args.compile else model.to(device)
    value = evaluate(net, dev, task.metric, config.pad_token_id, args, device)
    print0(f"{args.task} dev {task.metric}: {value:.2f} (" + (f"{run['method']} r={run['rank']} adapter {args.adapter}"
           f" on the base model {model_dir})" if args.adapter else f"the merged model {model_dir}, its own head)"))
    return value


# The paper's GLUE averages (v3) over the six tasks on dev; the authors keep each run's best epoch, seeds 42-46.
PAPER = {("RoBERTa-Base", "gift"): 85.1, ("RoBERTa-Base", "lora"): 86.6,
         ("RoBERTa-Large", "gift"): 87.5, ("RoBERTa-Large", "lora"): 87.8}


def write_results(args, model, history):
    task, key = TASKS[args.task], f"dev_{TASKS[args.task].metric}"
    best = max(history, key=lambda h: h[key])  # the first of equals
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classif"))
    result = {"task": args.task, "method": args.method, "model": str(args.model), "backbone": paper_size(model.config),
              "metric": task.metric, "best": best[key], "best_epoch": best["epoch"], "epochs": len(history),
              "trainable_without_head": trainable, "seed": args.seed}
    atomic_write(Path(args.out) / "results.json", lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    paper = PAPER.get((result["backbone"], args.method))
    print(f"{args.task} ({task.metric}, dev): best {best[key]:.2f} at epoch {best['epoch']} of {len(history)}; "
          f"{args.method}, {trainable:,} trainable parameters without the head"
          + (f"; the paper's {args.method} average over six tasks on {result['backbone']}: {paper}" if paper else ""))


def table(dirs):
    """The six-task table of runs (results.json), a row per (backbone, method); an average needs all six tasks."""
    rows = {}
    for path in (Path(d) / "results.json" for d in dirs):
        if not path.is_file():
            raise UserError(f"{path} does not exist (a finished run writes it)")
        r = read_json(path)
        rows.setdefault((r["backbone"] or r["model"], r["method"]), {}).setdefault(r["task"], []).append(r["best"])
    lines = ["| backbone | method | " + " | ".join(TASKS[t].folder for t in TASKS) + " | avg | paper avg |",
             "|---" * (len(TASKS) + 4) + "|"]
    for (backbone, method), scores in sorted(rows.items()):
        # several seeds per task: their median (the upper one of an even count), the LoRA paper's convention
        med = {t: sorted(v)[len(v) // 2] for t, v in scores.items()}
        avg = f"{sum(med.values()) / len(TASKS):.1f}" if len(med) == len(TASKS) else "-"
        cells = " | ".join(f"{med[t]:.1f}" if t in med else "-" for t in TASKS)
        lines.append(f"| {backbone} | {method} | {cells} | {avg} | {PAPER.get((backbone, method), '-')} |")
    print(text := "\n".join(lines))
    return text


# ----------------------------------------------------------------------------- adapter files (Theta or LoRA, head)
def adapter_config_of(args, model):
    """The run config written into an adapter's metadata: the base model and the task it was trained on."""
    return {"script": "train_glue.py", **{f: getattr(args, f) for f in RUN_FIELDS}, "model": str(args.model),
            "data": str(args.data), "encoder": asdict(model.config)}


def read_adapter_config(path) -> dict:
    return adapter_config(path, "train_glue.py", ["model", "task", "encoder", "method", "targets", "rank", "max_len"])


def model_with_adapter(path, model_dir=None):
    run, state = read_adapter_config(path), read_safetensors(path)
    model = load_model(model_dir or run["model"], num_labels=run["encoder"]["num_labels"], log=print0)
    add_adapter(model, run)  # frozen, with the adapter of the file's method, targets and rank
    load_adapter_state_dict(model, state)  # its Thetas (or LoRA factors) and head
    return run, model


def merge(args):
    """--adapter written into its base (--model, else its own): a new HF folder, as transformers writes one."""
    run = read_adapter_config(args.adapter)  # small: read first, to check OUT against the inputs before loading
    base = Path(args.model or run["model"])
    check_new_output(args.merge, "--merge", {"the --model folder": base, "the adapter": args.adapter})
    model = merge_adapter(model_with_adapter(args.adapter, args.model)[1])  # W (I + phi psi) or W + s B A
    save_classifier(args.merge, model.state_dict(), base, TASKS[run["task"]].labels, run["task"])
    print(f"merged model (HF folder, {run['method']} written into the weights): {args.merge}")
    return Path(args.merge)


# ----------------------------------------------------------------------------- demo: random RoBERTa, generated task
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


def demo(args):
    t0 = time.time()
    if args.out:
        check_new_output(args.out, "--out")
    root = Path(args.out or tempfile.mkdtemp(prefix="gift_glue_demo_"))
    print("=" * 100 + "\nDEMO: the checkpoint and the data are SYNTHETIC (a random-weight RoBERTa written in HF's "
          "format,\ngenerated SST-2-style reviews). Scores say nothing about GLUE.\n" + f"Files: {root}\n" + "=" * 100)
    model_dir, data = make_demo(root)
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds synchronisation on a small shared CPU
    run = ["--precision", args.precision, *(["--device", str(args.device)] if args.device else []),
           *(["--compile"] if args.compile else [])]
    for method in ("gift", "lora"):
        main(["--model", str(model_dir), "--task", "sst2", "--data", str(data), "--epochs", "12", "--batch-size",
              "32", "--lr", "3e-3", "--method", method, "--out", str(root / method), *run])
    merged = main(["--adapter", str(root / "gift" / "best.safetensors"), "--merge", str(root / "gift" / "merged")])
    value = main(["--model", str(merged), "--data", str(data), "--eval-only", *run])
    table([root / "gift", root / "lora"])
    print(f"demo done in {time.time() - t0:.0f} s (SYNTHETIC data); the merged best epoch scores {value:.2f} on dev.\n"
          f"Outputs: {root}/gift and {root}/lora (runs), {merged} (the merged HF folder)")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_flags(p, targets=["query", "value"], gift_rank=32, lora_rank=8, lora_alpha=16.0,
                     out="runs/glue-TASK-METHOD", precision="fp32")
    g = p.add_argument_group("GLUE")
    g.add_argument("--model", help="HF folder: config.json, model.safetensors (or pytorch_model.bin), tokenizer.json")
    g.add_argument("--task", choices=TASKS, help="GLUE task")
    g.add_argument("--data", help="the task's folder of the GLUE download (train.tsv, dev.tsv)")
    g.add_argument("--table", nargs="+", metavar="RUN", help="print the six-task table of finished runs and exit")
    g.add_argument("--epochs", type=int, help="None: the task's, from LoRA's RoBERTa-base runs (SST-2 60, MRPC 30, "
                   "CoLA 80, QNLI 25, RTE 80, STS-B 40)")
    g.add_argument("--batch-size", type=int, help="global batch; None: 64 (Base), 128 (hidden size >= 1024)")
    g.add_argument("--max-len", type=int, help="tokens per example; None: 512 (Base), 128 (hidden size >= 1024)")
    g.add_argument("--lr", type=float, default=5e-4, help="adapter learning rate (the paper's grid: 1e-4, 2.5e-4, "
                   "5e-4, 7.5e-4, 1e-3)")
    g.add_argument("--head-lr", type=float, help="head learning rate; None: --lr (the paper's grid ties them)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="adapter AdamW weight decay (the paper's grid: "
                   "0, 1e-4, 1e-3, 0.01)")
    g.add_argument("--head-weight-decay", type=float, help="head weight decay, matrices only; None: --weight-decay")
    g.add_argument("--warmup", type=float, default=0.06, help="warmup, a fraction of the steps")
    g.add_argument("--eval-batch-size", type=int, default=128, help="examples per forward on dev.tsv")
    g.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps (0: per epoch only)")
    return p.parse_args(argv)


def check_args(args):
    """User errors before any model is loaded (one line `error: ...`, exit 2); fills in what the inputs imply."""
    if args.demo or args.table:
        return
    if args.merge and not args.adapter:
        raise UserError("--merge OUT needs --adapter FILE (the adapter.safetensors of a run)")
    if args.adapter and not (args.merge or args.eval_only):
        raise UserError("--adapter FILE goes with --eval-only (score it) or --merge OUT (merge it); train_glue.py "
                        "starts every training run from a new adapter and head")
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    if args.eval_only and not args.data:
        raise UserError("--eval-only needs --data (the task's folder with dev.tsv)")
    if not (args.merge or args.eval_only and (args.adapter or args.model) or args.model and args.task and args.data):
        raise UserError("give --model, --task and --data (or --demo, --adapter FILE with --eval-only or --merge OUT, "
                        "--model MERGED with --eval-only, --table RUN...)")
    check_ranges(args, {"epochs": 1, "batch_size": 1, "rank": 1, "max_len": 5, "eval_batch_size": 1, "save_every": 0,
                        "stop_after": 1, "warmup": 0, "weight_decay": 0, "head_weight_decay": 0})
    for name, value in (("lr", args.lr), ("head-lr", args.head_lr), ("lora-alpha", args.lora_alpha)):
        if value is not None and not value > 0:  # 0 would train nothing, or scale LoRA's update away
            raise UserError(f"--{name} {value}: must be greater than 0")
    if args.warmup > 1:
        raise UserError(f"--warmup {args.warmup}: a fraction of the steps, at most 1")
    adapter = read_adapter_config(args.adapter) if args.adapter else None  # its run config names the base model
    folder = Path(args.model or adapter["model"])
    config = read_config(folder, complete=True)
    if args.max_len and args.max_len > max_tokens(config):
        raise UserError(f"--max-len {args.max_len}: {folder} takes at most {max_tokens(config)} tokens")
    if adapter:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
        mine, its = ({k: c.get(k) for k in keys} for c in (asdict(config), adapter["encoder"]))
        if mine != its:
            show = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
            raise UserError(f"--adapter {args.adapter} was trained on {adapter['model']} ({show(its)}); the model "
                            f"{folder} is another ({show(mine)}): give the adapter's own base model")
        if args.task not in (None, adapter["task"]) and not args.merge:
            raise UserError(f"--task {args.task}: {args.adapter} was trained on {adapter['task']}")
    if args.merge:
        return
    if args.eval_only:  # the task of the adapter, or of a merged folder (its config.json's finetuning_task)
        args.task = adapter["task"] if adapter else args.task or read_json(folder / "config.json").get(
            "finetuning_task")
        if args.task not in TASKS:
            raise UserError(f"{folder / 'config.json'}: no GLUE task (finetuning_task {args.task!r}), not a merged "
                            f"model: score a base model with --adapter FILE, or give --task")
    for split in ("dev",) if args.eval_only else ("train", "dev"):
        if not Path(args.data, f"{split}.tsv").is_file():
            raise UserError(f"--data {args.data}: " + ("no such folder" if not os.path.isdir(args.data) else
                            f"no {split}.tsv") + " (give a task's folder of the GLUE download, e.g. glue_data/RTE)")
    if not args.eval_only:
        check_training(args, config)


def check_training(args, config):
    """--targets, the adapter tried on a weightless model, --out; then the defaults that depend on the model."""
    check_targets(config, args.targets)
    args.rank = args.rank or (32 if args.method == "gift" else 8)
    try:
        with torch.device("meta"):
            model = SequenceClassifier(config)
            add_gift(model, args.targets, args.rank, args.share) if args.method == "gift" else \
                add_lora(model, args.targets, args.rank, args.lora_alpha)
    except ValueError as e:
        raise UserError(f"--targets {' '.join(args.targets)} --rank {args.rank}: {e}") from None
    args.out = args.out or f"runs/glue-{args.task}-{args.method}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder (a new one, or a run's with --resume)")
    args.epochs = args.epochs or TASKS[args.task].epochs
    args.batch_size, max_len = (args.batch_size or paper_defaults(config)[0]), paper_defaults(config)[1]
    args.max_len, args.pad = args.max_len or max_len, config.pad_token_id
    args.head_lr = args.lr if args.head_lr is None else args.head_lr
    args.head_weight_decay = args.weight_decay if args.head_weight_decay is None else args.head_weight_decay


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.demo or args.table or args.merge:
        return demo(args) if args.demo else table(args.table) if args.table else merge(args)
    try:
        return evaluate_only(args) if args.eval_only else train(args)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
