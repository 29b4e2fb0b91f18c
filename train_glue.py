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
    python train_glue.py ...same flags... --seeds 42 43 44 45 46  # once per seed into OUT/seed-N, then the table
    python train_glue.py --table runs/*                             # mean +- std over seeds beside the paper's

Epochs, batch and max length come from a size preset (glue_data.PRESETS, each with its source, printed by the run;
a flag given wins). The paper's lr and weight decay were chosen per task from a grid (lr 1e-4 ... 1e-3, wd 0 ...
0.01). Pairs longer than --max-len are cut as HF's `longest_first` truncation in tokenizers 0.23.3. An adapter
records the base it was trained on: on another model (a merged one too) it is refused unless --any-base. Training
starts a new adapter and head; --eval-only without --adapter scores a merged folder with its own head (a base model
has none) and writes no file. Ctrl-C / SIGTERM / --stop-after N: the step ends, is saved, no evaluation, exit 0;
--resume continues. Each epoch is saved before its evaluation. A mistake is one line `error: ...` (exit status 2)
before any model is loaded. The protocol, paper vs this repository: docs/glue.md.
"""
import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from encoder import SequenceClassifier, check_targets, collate, field, load_model, loss_fn, max_tokens, paper_size, \
    read_config, save_classifier
from fileio import UserError, atomic_write, check_float, fingerprint, read_json, read_safetensors, \
    read_safetensors_metadata
from gift import add_gift, parameter_summary
from glue_data import PAPER, TASKS, load_splits, make_demo, preset, score, table
from harness import HelpFormatter, Run, adapter_config, adapter_state_dict, add_adapter, add_common_flags, \
    base_identity, check_adapter_base, check_finite, check_new_output, check_ranges, cli, close_distributed, \
    compile_model, fused_adamw, load_adapter_state_dict, merge_adapter, print0, progress, setup_distributed
from lora import add_lora


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
              rank, log_key="epoch", overwrite=args.overwrite, outputs=("results.json", "best.safetensors"),
              inputs={"the base model": args.model})  # on return, the frame drops DDP before close_distributed
    print0(args.preset)
    ckpt = run.checkpoint
    if ckpt and args.stop_after and ckpt["step"] >= args.stop_after:
        raise UserError(f"--stop-after {args.stop_after}: {run.checkpoint_path} is at step {ckpt['step']} already")
    train_set, dev_set = load_splits(args.model, config, args.data, task, args.max_len, ("train", "dev"))
    torch.manual_seed(args.seed)  # the same new head, phi and LoRA A on every process and in every run
    model = load_model(args.model, num_labels=1 if task.labels is None else len(task.labels), log=print0)
    base = base_identity(model, skip=["classifier"])  # recorded in the adapter: another base is refused
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

    net = compile_model(model, args.compile) if args.compile else model
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
            save()  # the epoch's training is on disk before its evaluation: a crash there loses nothing
            value = evaluate(net, dev_set, task.metric, args.pad, args, device)
            history.append({"epoch": epoch + 1, "step": step, "train_loss": round(loss_sum[0] / loss_sum[1], 6),
                            f"dev_{task.metric}": round(value, 4), "lr": opt.param_groups[0]["lr"],
                            "seconds": round(time.time() - t0, 1)})
            loss_sum = [0.0, 0]
            run.log(history[-1])
            print0(json.dumps(history[-1]))  # the epoch's bar has closed: a line of its own
            if value > max((h[f"dev_{task.metric}"] for h in history[:-1]), default=-math.inf):
                # the paper reports the best epoch (the first of equals, as the authors' saver)
                run.write_adapter(adapter_state_dict(model, ["classifier"]), adapter_config_of(args, model, base),
                                  "best.safetensors")
            save()
    run.write_adapter(adapter_state_dict(model, ["classifier"]), adapter_config_of(args, model, base))
    if rank == 0:
        write_results(args, model, history)
    return history


def autocast(args, device):  # --precision bf16: autocast (the adapter and head keep fp32 weights); else a no-op
    return torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")


def lr_factor(step, warmup, total):  # HF's linear schedule: 0 at the first update, the peak after warmup, 0 at total
    return step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def run_settings(args):
    """What a resumed run must share with the checkpoint's: RUN_FIELDS, and the inputs by content (moved: the same)."""
    return {**{f: getattr(args, f) for f in RUN_FIELDS}, "model": fingerprint(args.model),
            "train": fingerprint(Path(args.data, "train.tsv")), "dev": fingerprint(Path(args.data, "dev.tsv"))}


# ----------------------------------------------------------------------------- evaluation
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
    max_len = args.max_len or run.get("max_len") or preset(config, task)[3]
    dev, = load_splits(model_dir, config, args.data, task, max_len, ["dev"])
    model = model_with_adapter(args.adapter, args.model, args.any_base)[1] if args.adapter else load_model(model_dir,
                                                                                                       log=print0)
    net = compile_model(model.to(device), args.compile) if args.compile else model.to(device)
    value = evaluate(net, dev, task.metric, config.pad_token_id, args, device)
    print0(f"{args.task} dev {task.metric}: {value:.2f} (" + (f"{run['method']} r={run['rank']} adapter {args.adapter}"
           f" on the base model {model_dir})" if args.adapter else f"the merged model {model_dir}, its own head)"))
    return value


def write_results(args, model, history):
    task, key = TASKS[args.task], f"dev_{TASKS[args.task].metric}"
    best = max(history, key=lambda h: h[key])  # the first of equals
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classif"))
    result = {"task": args.task, "method": args.method, "model": str(args.model), "backbone": paper_size(model.config),
              "metric": task.metric, "best": best[key], "best_epoch": best["epoch"], "epochs": len(history),
              "trainable_without_head": trainable, "seed": args.seed, "rank": args.rank, "preset": args.preset}
    atomic_write(Path(args.out) / "results.json", lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    paper = PAPER.get((result["backbone"], args.method))
    print(f"{args.task} ({task.metric}, dev): best {best[key]:.2f} at epoch {best['epoch']} of {len(history)}; "
          f"{args.method}, {trainable:,} trainable parameters without the head"
          + (f"; the paper's {args.method} average over six tasks on {result['backbone']}: {paper}%" if paper else ""))


# ----------------------------------------------------------------------------- adapter files (Theta or LoRA, head)
def adapter_config_of(args, model, base):
    """The run config written into an adapter's metadata: the base model and the task it was trained on."""
    return {"script": "train_glue.py", **{f: getattr(args, f) for f in RUN_FIELDS}, "model": str(args.model),
            "data": str(args.data), "encoder": asdict(model.config), "base": base}


def read_adapter_config(path) -> dict:
    """The run config in an adapter's metadata, each field the script uses checked for type and range."""
    meta = read_safetensors_metadata(path) if str(path).endswith(".safetensors") else {}
    try:
        config = json.loads(meta["config"]) if isinstance(meta, dict) and "config" in meta else {}
    except json.JSONDecodeError:
        config = {}  # adapter_config names it
    except TypeError:
        config = None
    if not (isinstance(meta, dict) and isinstance(config, dict)):
        raise UserError(f"{path}: its metadata{'' if isinstance(meta, dict) else ' is not a JSON object of strings'}"
                        f"{' config is not a JSON object' if isinstance(meta, dict) else ''}; give an "
                        f"adapter.safetensors written by train_glue.py")
    run = adapter_config(path, "train_glue.py", ["model", "task", "encoder", "method", "targets", "rank", "max_len"])
    where = f"{path} (its run config)"
    field(run, where, "model", str), field(run, where, "rank", int, ge=1), field(run, where, "max_len", int, ge=5)
    task, targets = TASKS[field(run, where, "task", str, choices=list(TASKS))], field(run, where, "targets", list)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{where}: field 'targets' is {targets!r}, expected a list of layer names")
    if field(run, where, "method", str, choices=["gift", "lora"]) == "gift":
        field(run, where, "share", str, "type", choices=["type", "all"])
    else:
        field(run, where, "lora_alpha", float, gt=0)
    encoder = field(run, where, "encoder", dict)
    for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        field(encoder, f"{where} encoder", k, int, ge=1)
    field(encoder, f"{where} encoder", "num_labels", int, choices=[1 if task.labels is None else len(task.labels)])
    return run


def check_adapter_file(path, run, config, folder):
    """The adapter's tensors (dtype and shape, from the file's header) against what its run config builds on this
    model (weightless): a mismatch is found before any weight is loaded."""
    try:
        with torch.device("meta"):
            model = SequenceClassifier(replace(config, num_labels=run["encoder"]["num_labels"]))
            add_adapter(model, run)
    except ValueError as e:
        raise UserError(f"{path}: its run config does not fit {folder}: {e}") from None
    want = {k: tuple(t.shape) for k, t in adapter_state_dict(model, ["classifier"]).items()}
    have = {k: tuple(t.shape) for k, t in check_float(path, read_safetensors(path)).items()}
    for k in sorted(want.keys() | have.keys()):
        if want.get(k) != have.get(k):
            raise UserError(f"{path}: tensor {k!r} is {have.get(k) or 'missing'}; its run config ({run['method']} "
                            f"r={run['rank']} on {' '.join(run['targets'])}) on {folder} needs {want.get(k) or 'none'}")


def model_with_adapter(path, model_dir=None, any_base=False):
    run, state = read_adapter_config(path), read_safetensors(path)
    here = model_dir or run["model"]
    model = load_model(here, num_labels=run["encoder"]["num_labels"], log=print0)
    check_adapter_base(path, run, model, here, skip=["classifier"], force=any_base)  # e.g. its own merged model
    add_adapter(model, run)  # frozen, with the adapter of the file's method, targets and rank
    load_adapter_state_dict(model, state)  # its Thetas (or LoRA factors) and head
    return run, model


def merge(args):
    """--adapter written into its base (--model, else its own): a new HF folder, as transformers writes one."""
    run = read_adapter_config(args.adapter)  # small: read first, to check OUT against the inputs before loading
    base = Path(args.model or run["model"])
    check_new_output(args.merge, "--merge", {"the --model folder": base, "the adapter": args.adapter})
    model = merge_adapter(model_with_adapter(args.adapter, args.model, args.any_base)[1])  # W (I + phi psi), W + s BA
    save_classifier(args.merge, model.state_dict(), base, TASKS[run["task"]].labels, run["task"])
    print(f"merged model (HF folder, {run['method']} written into the weights): {args.merge}")
    return Path(args.merge)


# ----------------------------------------------------------------------------- demo: random RoBERTa, generated task
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
           *(["--compile", args.compile] if args.compile else [])]
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
    g.add_argument("--table", nargs="+", metavar="RUN", help="print the six-task table of finished runs (mean +- std "
                   "over seeds) and exit")
    g.add_argument("--seeds", nargs="+", type=int, metavar="N", help="run once per seed (instead of --seed), each "
                   "into OUT/seed-N, then write OUT/table.md; the paper's: 42 43 44 45 46")
    g.add_argument("--any-base", action="store_true", help="apply --adapter to a model that is not the one it was "
                   "trained on (its merged model, other weights): the result is not the adapter's")
    g.add_argument("--epochs", type=int, help="None: the size preset's, from the LoRA paper's Table 9 (Base: SST-2 60, "
                   "MRPC 30, CoLA 80, QNLI 25, RTE 80, STS-B 40; Large: 10, 20, 20, 10, 20, 10)")
    g.add_argument("--batch-size", type=int, help="global batch; None: 64 (Base), 128 (hidden size >= 1024: Large)")
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
    for a in p._actions:  # the shared help promises training from an adapter, which this script refuses
        if a.dest == "adapter":
            a.help = "an adapter.safetensors of this script: scored with --eval-only, merged with --merge (training " \
                     "always starts a new adapter and head)"
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
    if args.seeds and (args.eval_only or args.merge or len(set(args.seeds)) < len(args.seeds)):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: distinct seeds, for training runs")
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
        check_adapter_file(args.adapter, adapter, config, folder)
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
    name, epochs, batch, max_len, source = preset(config, TASKS[args.task])
    given = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("epochs", "batch_size", "max_len")
                      if getattr(args, k))
    args.preset = (f"preset {name} (hidden size {config.hidden_size}): {epochs} epochs, batch {batch}, max length "
                   f"{max_len} ({source})" + (f"; given, and used instead: {given}" if given else ""))
    args.epochs, args.batch_size = args.epochs or epochs, args.batch_size or batch
    args.max_len, args.pad = args.max_len or max_len, config.pad_token_id
    args.head_lr = args.lr if args.head_lr is None else args.head_lr
    args.head_weight_decay = args.weight_decay if args.head_weight_decay is None else args.head_weight_decay


def seeds(args):
    """--seeds: the recipe once per seed, each into OUT/seed-N, one after the other; then the table of them
    (printed, and written to OUT/table.md). A run stopped early (Ctrl-C, --stop-after) ends the sequence."""
    runs = []
    for seed in args.seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(Path(args.out, f"seed-{seed}"))})
        if len(train(one)) < args.epochs:
            print0(f"--seeds: the run of seed {seed} stopped early; the same command with --resume continues")
            return runs
        runs.append(one.out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = table(runs)
        atomic_write(Path(args.out, "table.md"), lambda t: Path(t).write_text(text + "\n", encoding="utf-8"))
    return runs



@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.demo or args.table or args.merge:
        return demo(args) if args.demo else table(args.table) if args.table else merge(args)
    try:
        return evaluate_only(args) if args.eval_only else seeds(args) if args.seeds else train(args)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
