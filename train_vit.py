"""GIFT on a Vision Transformer (vit.py): FGVC / VTAB-1k fine-tuning, evaluation, merging and cluster maps.

GIFT (arXiv 2312.00700) fine-tunes a frozen ViT by generating new attn.proj weights W (I + phi psi) with one
Theta = (phi, psi) shared by all blocks (24,576 trainable numbers for ViT-B/16 at rank 16), plus a new head.
The defaults are the paper's protocol (the authors' timm runs, docs/vit.md): AdamW, 100 epochs, batch 32, timm's
cosine schedule per epoch with 10 warm-up epochs, drop_path 0.1, seed 42, fp32. --preset vtab: VTAB-1k's data
handling (resize to 224, no augmentation) and weight decay 0. --method lora: the baseline.

Run:
    python train_vit.py --demo       # synthetic checkpoint + synthetic images: load, train, eval, draw (<1 min, CPU)
    python train_vit.py --model augreg_in21k.safetensors --train CUB_200_2011/train.json \\
        --test CUB_200_2011/test.json --root CUB_200_2011/images --lr 1e-4 --out runs/cub --visualize 8
    python train_vit.py --model augreg_in21k.safetensors --preset vtab --train vtab-1k/dtd/train800val200.txt \\
        --test vtab-1k/dtd/test.txt --out runs/dtd --seeds 42 43 44    # runs/dtd/seed-N, runs/dtd/table.md
    python train_vit.py --table runs/*/seed-*                      # VTAB-1k: per task, per group, mean of 19
    torchrun --nproc_per_node=4 train_vit.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_vit.py ...same flags... --stop-after 50           # 50 steps, saved, no evaluation; then --resume
    python train_vit.py --adapter runs/cub/adapter.safetensors --eval-only --test CUB_200_2011/test.json \\
        --root CUB_200_2011/images --visualize 8 --out runs/evals  # top-1 and cluster maps into runs/evals
    python train_vit.py --adapter runs/cub/adapter.safetensors --merge runs/cub/merged.safetensors  # timm names
    python train_vit.py --adapter CUB_last.pth.tar --model augreg_in21k.safetensors --eval-only --test ...

The checkpoint is written atomically after each epoch's training (before its evaluation), and on Ctrl-C / SIGTERM
(the step finishes; exit status 0) or --stop-after; --resume repeats an uninterrupted run bit for bit.
"""
import argparse
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fileio import UserError, atomic_write, fingerprint, write_safetensors
from gift import add_gift, cluster_head, gift_layers, parameter_summary
from harness import HelpFormatter, Run, adapter_state_dict, add_adapter, add_common_flags, base_identity, \
    check_adapter_base, check_new_output, check_ranges, cli, close_distributed, compile_model, fused_adamw, \
    load_adapter_state_dict, merge_adapter, print0, progress, setup_distributed
from images import ImageDataset, check_labels, cluster_figure, demo_images, loader, read_split, read_splits, \
    split_id, vtab_table, vtab_task
from lora import add_lora
from vit import build_vit, check_adapter_shapes, load_vit, random_google_npz, read_adapter, read_vit, \
    trained_on

# Settings that fix the training trajectory: --resume refuses a checkpoint written with others, and with other
# inputs (model, starting adapter, splits and classes: compared by content, so a moved input is the same).
RESUME_FIELDS = ("preset", "image_size", "method", "targets", "rank", "share", "lora_alpha", "epochs", "warmup", "lr",
                 "batch_size", "warmup_lr", "min_lr", "schedule", "weight_decay", "drop_path", "seed", "precision")


def train(args):
    rank, world, local_rank, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be divisible by {world} processes")
    train_samples, test_samples, classes, num_classes = read_splits(args.train, args.test, args.root, args.num_classes)
    init = None
    if args.adapter:  # its method, targets and rank, and its weights as the starting point
        init, start_run, _ = read_adapter(args.adapter)
        for k in ("method", "targets", "rank", "share", "lora_alpha"):
            setattr(args, k, start_run.get(k, getattr(args, k)))
        if init.get("head.weight") is None or init["head.weight"].shape[0] != num_classes:  # a new head
            init = {k: v for k, v in init.items() if not k.startswith("head.")}
    settings = {**{f: getattr(args, f) for f in RESUME_FIELDS}, "num_classes": num_classes,
                "model": fingerprint(args.model), "adapter": args.adapter and fingerprint(args.adapter),
                "train": split_id(train_samples), "test": split_id(test_samples)}
    run = Run(args.out, settings, keys=("adapter", "optimizer", "epoch", "in_epoch", "loss_sum"), resume=args.resume,
              rank=rank, overwrite=args.overwrite, outputs=("cluster_maps",), inputs={"the base model": args.model})
    ckpt = run.checkpoint
    if ckpt and args.stop_after and args.stop_after <= ckpt["step"]:
        raise UserError(f"--stop-after {args.stop_after}: {run.checkpoint_path} already holds {ckpt['step']} steps; "
                        f"give a later one, or none")

    # The model: the pretrained ViT with a new head, frozen, and the adapter (its only trainable part, with the head)
    w, config = read_vit(args.model)  # the architecture from the header: a starting adapter is checked against it
    if init is not None:
        check_adapter_shapes(init, start_run, replace(config, num_classes=num_classes), args.adapter, args.model,
                             add_adapter, lambda m: adapter_state_dict(m, ["head"]))
    torch.manual_seed(args.seed)  # the same new head and Theta on every rank
    model = build_vit(args.model, w, config, num_classes, args.image_size, args.drop_path, log=print0)
    base = base_identity(model, skip=["head"])  # recorded in the adapter: it runs on this base only
    if args.method == "gift":  # W (I + phi psi): one Theta per target type, shared by every block
        thetas = add_gift(model, args.targets, args.rank, args.share)
        n_adapter = sum(p.numel() for p in thetas.parameters())
    else:                      # W + (alpha / r) B A: one pair per layer
        layers = add_lora(model, args.targets, args.rank, args.lora_alpha)
        n_adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    if init is not None:
        check_adapter_base(args.adapter, start_run, model, args.model, ["head"], args.any_base)
        load_adapter_state_dict(model, init)
        print0(f"starting from {args.adapter}" + ("" if "head.weight" in init else " (a new head: other classes)"))
    model.head.requires_grad_(True)  # the new head trains with the adapter
    model.to(device)
    print0(f"{args.method} on {args.targets}, rank {args.rank}" + (f", share={args.share}" if args.method == "gift"
           else f", alpha {args.lora_alpha:g}") + f": {n_adapter:,} adapter parameters; {parameter_summary(model)}")

    # The data: the paper's preprocessing; every test image once over all ranks (a DistributedSampler would repeat)
    size, modes = model.config.image_size, ("train", "test") if args.preset == "fgvc" else ("resize", "resize")
    train_set, test_set = ImageDataset(train_samples, size, modes[0], args.seed), ImageDataset(test_samples, size,
                                                                                                modes[1])
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    batch = args.batch_size // world
    test_loader = loader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)), batch, args.workers,
                         device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fused_adamw([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr)
    steps = math.ceil(len(sampler) / batch)
    total, unit = args.epochs * steps, 1 if args.schedule == "epoch" else steps  # schedule time: epochs, or steps
    lr_at = lambda epoch, i: cosine_lr(epoch * steps + i if unit > 1 else epoch, args.lr, args.epochs * unit,  # noqa
                                       args.warmup * unit, args.warmup_lr, args.min_lr)
    start, skip, step, loss_sum = 0, 0, 0, torch.zeros(2, device=device)  # loss_sum: sum of losses, samples
    if ckpt:  # epoch: the one in progress; in_epoch: its steps done; loss_sum: theirs, over all ranks
        load_adapter_state_dict(model, ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        start, skip, step = ckpt["epoch"], ckpt["in_epoch"], ckpt["step"]
        loss_sum = ckpt["loss_sum"].to(device) * (rank == 0)
        print0(f"resumed from {run.checkpoint_path}: {step} of {total} steps done")
    state = lambda epoch, done: {"adapter": adapter_state_dict(model, ["head"]), "optimizer": opt.state_dict(),  # noqa
                                 "epoch": epoch, "in_epoch": done, "loss_sum": loss_sum.cpu()}

    # plain DDP suits a Theta shared by every block: autograd sums its gradient over the blocks before DDP's
    # hook fires once per step, and the frozen backbone is not synchronised at all
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
    net = compile_model(ddp, args.compile) if args.compile else ddp
    autocast, stopped = autocast_for(args, device), False
    with run.catch_signals():
        print0(f"training: {total} steps ({args.epochs} epochs of {steps}), from step {step}")
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)  # its order depends on (seed, epoch) alone: a resumed epoch skips its done steps
            train_set.epoch = epoch
            batches = loader(train_set, batch, args.workers, device, sampler=list(sampler)[skip * batch:])
            model.train()
            t0 = time.time()
            for i, (x, y) in enumerate(progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", initial=skip,
                                                total=steps, disable=rank != 0, leave=False), skip):
                # drop_path's masks from (seed, epoch, step, rank): the same whether or not the run was resumed
                torch.manual_seed(int(np.random.SeedSequence([args.seed, epoch, i, rank]).generate_state(1)[0]))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch, i)
                with autocast():
                    loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # no clipping: the norm of DDP's mean grads
                run.check_finite(f"epoch {epoch + 1}, step {i + 1}", loss=loss, gradient_norm=norm)
                opt.step()
                loss_sum += torch.stack([loss.detach().float() * len(y), torch.tensor(float(len(y)), device=device)])
                step += 1
                if run.should_stop() or (args.stop_after and args.stop_after <= step < total):
                    stopped = (epoch, i + 1)
                    break
            if stopped:
                break
            skip = 0
            if world > 1:
                dist.all_reduce(loss_sum)
            run.save(state(epoch, steps), step)  # saved before its evaluation can fail (--resume: evaluates it)
            top1 = evaluate(net, test_loader, device, autocast)
            record = {"epoch": epoch + 1, "step": step, "train_loss": round((loss_sum[0] / loss_sum[1]).item(), 6),
                      "test_top1": round(top1, 4), "lr": lr_at(epoch, steps - 1),
                      "seconds": round(time.time() - t0, 2), "method": args.method, "adapter_params": n_adapter}
            run.log(record)
            loss_sum.zero_()
            run.save(state(epoch + 1, 0), step)
            print0(json.dumps(record))  # the epoch's bar has closed: a line of its own
            if run.should_stop() and epoch + 1 < args.epochs:  # interrupted during the evaluation
                stopped = (epoch + 1, 0)
                break
    if stopped and stopped[1]:  # mid-epoch: the steps' losses of all ranks go into the checkpoint
        if world > 1:
            dist.all_reduce(loss_sum)
        run.save(state(*stopped), step)
    del ddp, net  # their Reducer holds the process group: freed after destroy_process_group, gloo can hang
    if stopped:
        print0(run.stopped_message(step, total))
    elif rank == 0:
        top1 = json.loads(open(run.log_path).readlines()[-1])["test_top1"] if args.epochs else None
        config = {**{k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
                  "script": "train_vit.py", "vit": asdict(model.config), "classes": classes, "test_top1": top1,
                  "adapter_params": n_adapter, "base": base}
        print(f"adapter ({args.method} + head + run config): "
              f"{run.write_adapter(adapter_state_dict(model, ['head']), config)}")
        if args.visualize:
            draw(model, test_set, args, args.method, os.path.join(args.out, "cluster_maps"))
    close_distributed()
    return model


def cosine_lr(t, lr, total, warmup, warmup_lr, min_lr):
    """timm's CosineLRScheduler as the paper's runs used it (one cycle, warmup_prefix=False) at time t, an epoch
    (--schedule epoch: t_in_epochs) or a step (--schedule step): a linear warmup from warmup_lr over `warmup`,
    then min_lr + (lr - min_lr)(1 + cos(pi t / total)) / 2 with t counted from 0, not from the warmup's end."""
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def autocast_for(args, device):
    """--precision bf16: bf16 autocast (master weights stay fp32). fp32, the paper's: no autocast; on GPUs with
    TF32, matmuls run in it, as the authors' train.py set (torch.backends.cuda.matmul.allow_tf32 = True)."""
    if device.type == "cuda" and args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


# -----------------------------------------------------------------------------
# Evaluation: top-1 accuracy, an adapter (or the base model) on a split, merging, the paper's cluster maps, tables

@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Top-1 accuracy (%) over all ranks' shares of the split."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, seen
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[1]).item()


def adapter_model(args):
    """(ViT with --adapter loaded, run config, stored top-1): the base weights from --model, else the model named
    in the adapter's run config; the adapter's head. Its shapes are checked against the base's header before the
    base is loaded, and the base against the one it was trained on (--any-base: not) before it is applied."""
    state, run, stored = read_adapter(args.adapter)
    base = args.model or run.get("model") or run.get("checkpoint")  # "checkpoint": adapters of before --model
    if not base:
        raise UserError(f"{args.adapter} names no base model: give --model (it was trained on {run.get('arch')})")
    try:
        w, config = read_vit(base, run.get("vit"))
    except UserError as e:  # the adapter's ViTConfig is not this model's
        raise UserError(f"{args.adapter} was trained on {trained_on(run)} and does not fit {base}: {e}") from None
    if state.get("head.weight") is None or state["head.weight"].dim() != 2:
        raise UserError(f"{args.adapter}: no classifier head (head.weight, classes x dim) in it")
    config = replace(config, num_classes=state["head.weight"].shape[0])
    check_adapter_shapes(state, run, config, args.adapter, base, add_adapter, lambda m: adapter_state_dict(m, ["head"]))
    model = build_vit(base, w, config, config.num_classes, config.image_size, log=print0)
    check_adapter_base(args.adapter, run, model, base, ["head"], args.any_base)
    add_adapter(model, run)
    load_adapter_state_dict(model, state)
    return model, run, stored


def eval_only(args):
    """--eval-only: top-1 of --adapter on --test (beside the one stored in it; --visualize: its cluster maps), or
    of the base model --model zero-shot with its own classifier head. With --out (or --visualize): written to
    OUT/eval_<model>_on_<split>.json (and _maps/); another evaluation's files are never replaced (--overwrite)."""
    rank, world, _, device = setup_distributed(args.device)
    tag = lambda p: re.sub(r"[^\w.-]+", "_", "-".join(Path(os.path.abspath(p)).with_suffix("").parts[-2:]))  # noqa
    name = args.out and os.path.join(args.out, f"eval_{tag(args.adapter or args.model)}_on_{tag(args.test)}")
    if name and not args.overwrite and (os.path.exists(name + ".json") or os.path.exists(name + "_maps")):
        raise UserError(f"{name}.json holds this evaluation already: add --overwrite to replace it, or another --out")
    if args.adapter:
        model, run, stored = adapter_model(args)
        label = f"{args.adapter} ({run['method']} r={run['rank']})"
    else:  # the base model, with its own head: e.g. one written by --merge
        model = load_vit(args.model, image_size=args.image_size, log=print0)
        run, stored, label = {"preset": args.preset}, None, f"the base model {args.model}, zero-shot (its own head)"
    model.to(device)
    samples, classes = read_split(args.test, args.root, run.get("classes"))
    if run.get("classes") is None and classes and len(classes) != model.config.num_classes:
        raise UserError(f"{args.test} has {len(classes)} classes and the model's head {model.config.num_classes}: "
                        f"its labels would not map to the head's")
    mode = "test" if (run.get("preset") or args.preset) == "fgvc" else "resize"  # the run's preprocessing
    test_set = ImageDataset(check_labels(samples, model.config.num_classes), model.config.image_size, mode)
    batches = loader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)),
                     max(1, args.batch_size // world), args.workers, device)
    net = compile_model(model, args.compile) if args.compile else model
    top1 = evaluate(net, batches, device, autocast_for(args, device))
    print0(f"{label} on {args.test}: top-1 {top1:.2f}% of {len(test_set)} images" + (
        f"; stored in the adapter: {stored:.2f}%" if stored is not None else "; stored in the adapter: none"
        if args.adapter else ""))
    if rank == 0 and name:
        os.makedirs(args.out, exist_ok=True)
        result = {"model": label, "test": args.test, "images": len(test_set), "test_top1": top1, "stored": stored}
        atomic_write(name + ".json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        if args.visualize:
            draw(model, test_set, args, run.get("method"), name + "_maps")
    close_distributed()
    return top1


def merge(args):
    """--adapter + its base model -> --merge OUT: a plain ViT state dict (timm names), safetensors, whose targeted
    weights are W (I + phi psi) (GIFT) or W + (alpha/r) B A (LoRA); its ViTConfig in the metadata. OUT must be new."""
    if os.path.isdir(args.merge):
        raise UserError(f"--merge {args.merge} is a folder: give the file to write, e.g. "
                        f"{os.path.join(args.merge, 'merged.safetensors')}")
    _, run, _ = read_adapter(args.adapter)  # small: read first, to check OUT against its base before loading
    check_new_output(args.merge, "--merge", {"the base checkpoint": args.model or run.get("model") or
                                             run.get("checkpoint"), "the adapter": args.adapter})
    model, run, _ = adapter_model(args)
    os.makedirs(os.path.dirname(args.merge) or ".", exist_ok=True)
    write_safetensors(args.merge, merge_adapter(model).state_dict(),
                      {"config": json.dumps({**run, "vit": asdict(model.config)})})
    print(f"merged model (timm names, loads with load_vit): {args.merge}")
    return args.merge


@torch.no_grad()
def draw(model, dataset, args, method, out_dir):
    """--visualize N: PNG cluster maps (images.cluster_figure) of N correctly classified images of dataset (the
    paper shows only those) in a fixed shuffled order, a row per GIFT layer (--vis-layers: those blocks). Map k of
    a layer: its output tokens y (N, d_out), CLS dropped, times column k of C = W phi (d_out, r)."""
    if method != "gift":
        raise UserError(f"--visualize draws GIFT's cluster maps; this is a {method or 'base'} model")
    chosen = [(name, layer) for name, layer in gift_layers(model) if name.startswith("blocks.") and (
        args.vis_layers is None or int(name.split(".")[1]) in args.vis_layers)]
    if not chosen:
        raise UserError(f"--vis-layers {args.vis_layers}: no GIFT layer there; {[n for n, _ in gift_layers(model)]}")
    outputs, heads, g = {}, {name: cluster_head(layer) for name, layer in chosen}, model.config.image_size // \
        model.config.patch_size
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)) for name, layer in
             chosen]
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    written, r = [], max(h.shape[1] for h in heads.values())
    for i in np.random.default_rng(0).permutation(len(dataset)).tolist():  # a fixed sample across classes
        if len(written) == args.visualize:
            break
        x, y = dataset[i]
        if model(x[None].to(next(model.parameters()).device)).argmax(1).item() == y:
            rows = [(n, (outputs[n][0, 1:].float() @ heads[n]).T.reshape(-1, g, g).cpu()) for n, _ in chosen]
            written.append(os.path.join(out_dir, f"test{i:05d}_label{y}.png"))
            cluster_figure(x, rows, f"GIFT cluster maps, rank {r}: test image {i} (label {y}); a row per layer").save(
                written[-1])
    for hook in hooks:
        hook.remove()
    print(f"cluster maps of {len(written)} correctly classified test images: {out_dir if written else 'none'}")
    return written


def table(runs):
    """The table of finished runs (folders holding adapter.safetensors): each run's task from its --train folder
    (VTAB-1k's names, in their groups; any other task in a group of its own), its test top-1 by seed."""
    scores = {}  # task -> {seed: top-1 (%)}
    for out in runs:
        _, run, top1 = read_adapter(os.path.join(out, "adapter.safetensors"))
        folder = os.path.basename(os.path.dirname(os.path.abspath(run.get("train") or out)))
        task, seed = vtab_task(folder) or folder, run.get("seed")
        if top1 is None or seed in scores.get(task, {}):
            raise UserError(f"--table {out}: " + (f"a second run of {task} with seed {seed}" if top1 is not None else
                                                  "no test top-1 in its adapter (trained 0 epochs?)"))
        scores.setdefault(task, {})[seed] = top1
    return vtab_table(scores)


# -----------------------------------------------------------------------------
# Demo: a synthetic checkpoint and data set, then the real pipeline

def demo(args):
    if args.out:
        check_new_output(args.out, "--out")
    t0, root = time.time(), args.out or tempfile.mkdtemp(prefix="gift_vit_demo_")
    print("=" * 100 + "\nDEMO: the checkpoint and the data are SYNTHETIC (a random-weight ViT written in Google's .npz "
          f"format,\ngenerated 80 px pictures of 4 coloured-square classes): accuracies say nothing about real tasks."
          f"\nFiles: {root}\n" + "=" * 100)
    checkpoint = random_google_npz(os.path.join(root, "ViT-demo.npz"))  # dim 64, depth 4, patch 8, 64 px
    train_dir, test_dir = demo_images(root, np.random.default_rng(0))
    # a tiny model on a small shared CPU: one compute thread, so that it never contends with the decoding
    # workers (oversubscribed OpenMP threads can slow these small matmuls down 10x)
    torch.set_num_threads(1)
    run = os.path.join(root, "run")
    same = [*(["--device", str(args.device)] if args.device else []), "--precision", args.precision] + (
        ["--compile", args.compile] if args.compile else [])
    train(parse_args(["--model", checkpoint, "--train", train_dir, "--test", test_dir, "--out", run, "--epochs", "5",
                      "--warmup", "1", "--schedule", "step", "--batch-size", "16", "--lr", "3e-3", "--workers", "2",
                      "--visualize", "2", *same]))
    merge(parse_args(["--adapter", os.path.join(run, "adapter.safetensors"), "--merge",
                      os.path.join(run, "merged.safetensors")]))
    print(f"demo done in {time.time() - t0:.0f} s (SYNTHETIC data). In {root}: ViT-demo.npz, train/, test/ (the "
          f"synthetic checkpoint and images); run/: log.jsonl, checkpoint.pt, adapter.safetensors, merged.safetensors, "
          f"cluster_maps/*.png")


# -----------------------------------------------------------------------------
# Command line

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's Linear layers: what --targets may name
PRESETS = {"fgvc": 1e-4, "vtab": 0.0}  # --weight-decay's default: CUB's (the paper), VTAB's (issue 19; docs/vit.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_flags(p, targets=["attn.proj"], gift_rank=16, lora_rank=8, lora_alpha=1.0, out="runs/vit")
    m = p.add_argument_group("the model and the data")
    m.add_argument("--model", help="the base ViT: Google .npz, timm .pth / .safetensors, an HF ViT folder or "
                   ".safetensors, or a --merge output; the paper's: vit_base_patch16_224.augreg_in21k (see README)")
    m.add_argument("--any-base", action="store_true", help="apply --adapter to a model other than the one it was "
                   "trained on (a merged model, other weights): refused without this")
    m.add_argument("--train", help="training split: class-folder directory, VPT .json, or `path label` .txt list")
    m.add_argument("--test", help="split evaluated after every epoch (same forms)")
    m.add_argument("--root", help="where .json / .txt relative paths start; None: the split file's folder")
    m.add_argument("--num-classes", type=int, help="None: the class folders, or the largest training label + 1")
    m.add_argument("--preset", choices=list(PRESETS), default="fgvc", help="fgvc: Resize(256), RandomCrop(224), flip "
                   "/ Resize(256), CenterCrop(224), weight decay 1e-4; vtab: resize to 224, no augmentation, wd 0")
    m.add_argument("--image-size", type=int, help="None: the model's (another size resizes the position embeddings)")
    m.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoders per process")
    m.add_argument("--seeds", type=int, nargs="+", help="run once per seed into OUT/seed-N; a table in OUT/table.md")
    m.add_argument("--table", nargs="+", metavar="RUN", help="print the table (VTAB-1k: per task, group, mean of "
                   "19) of finished runs' folders, and exit")
    t = p.add_argument_group("training (the paper's protocol: timm's AdamW and cosine schedule)")
    for flag, kind, default, text in (
            ("epochs", int, 100, "passes over the training split"), ("batch-size", int, 32, "global batch"),
            ("lr", float, 1e-4, "peak learning rate"), ("warmup", int, 10, "warmup epochs"),
            ("warmup-lr", float, 1e-7, "the warmup's first learning rate"), ("min-lr", float, 1e-6, "the floor"),
            ("weight-decay", float, None, "AdamW's, on >= 2-D parameters only; None: the preset's"),
            ("drop-path", float, 0.1, "stochastic depth rate of the last block"),
            ("visualize", int, 0, "N: cluster maps of N correctly classified test images (GIFT), in OUT")):
        t.add_argument("--" + flag, type=kind, default=default, help=text)
    t.add_argument("--schedule", choices=["epoch", "step"], default="epoch", help="the learning rate changes once "
                   "per epoch (timm's default, the paper's runs) or at every step")
    t.add_argument("--vis-layers", type=int, nargs="+", help="block indices drawn by --visualize; None: all")
    args = p.parse_args(argv)
    # a user mistake: one line, exit status 2 (main's cli wrapper), before anything is loaded
    check_ranges(args, {"epochs": 0, "batch_size": 1, "rank": 1, "warmup": 0, "workers": 0, "visualize": 0,
                        "stop_after": 1, "num_classes": 2, "image_size": 1, "warmup_lr": 0, "min_lr": 0,
                        "weight_decay": 0, "drop_path": 0})
    for name, bad, want in (("lr", args.lr <= 0, "> 0"), ("lora-alpha", args.lora_alpha <= 0, "> 0"),
                            ("drop-path", args.drop_path >= 1, "< 1"), ("vis-layers", min(args.vis_layers or [0]) < 0,
                                                                        "block indices >= 0")):
        if bad:
            raise UserError(f"--{name} {getattr(args, name.replace('-', '_'))}: must be {want}")
    for target in args.targets:  # a name suffix of a block's Linear layer: qkv, attn.proj, blocks.3.mlp.fc1, ...
        if not any(n == (leaf := re.sub(r"^(blocks\.)?\d+\.", "", target)) or n.endswith("." + leaf) for n in LINEARS):
            raise UserError(f"--targets {target}: no layer of the ViT is named so; valid: {', '.join(LINEARS)} "
                            f"(or their last part, e.g. proj; one block's: blocks.N.attn.proj)")
    if args.out and os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder (new, or a run's to --resume)")
    if args.merge and not args.adapter:
        raise UserError("--merge OUT needs --adapter FILE")
    if args.eval_only and (args.train or not args.test or not (args.adapter or args.model)):
        raise UserError("--eval-only needs --test and --adapter (or --model, a base model with its own head); "
                        "not --train")
    if args.adapter and args.test and not (args.train or args.eval_only or args.merge):
        raise UserError("--adapter with --test alone: add --eval-only to evaluate it, or --train to start from it")
    if not (args.demo or args.merge or args.eval_only or args.table or (args.model and args.train and args.test)):
        raise UserError("give --model, --train and --test (or --adapter FILE with --eval-only --test or --merge OUT, "
                        "--table RUN..., or --demo)")
    for flag, want in (("train", "a folder of class folders, a VPT .json or a `path label` .txt"), ("test", "the "
                       "same"), ("root", "a folder"), ("model", "a ViT checkpoint"), ("adapter", "an adapter file")):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)} does not exist (expected {want})")
    if args.adapter and not args.model and open(args.adapter, "rb").read(4) == b"PK\x03\x04":
        raise UserError(f"--adapter {args.adapter} is a torch file (the GIFT authors' format), which names no base "
                        f"weights: give --model (vit_base_patch16_224.augreg_in21k for theirs)")
    if args.visualize and args.method == "lora" and args.train:
        raise UserError("--visualize draws GIFT's cluster maps; a LoRA run has none")
    args.seeds = args.seeds and list(dict.fromkeys(args.seeds))  # each seed once: one run folder each
    args.rank = args.rank or {"gift": 16, "lora": 8}[args.method]
    args.weight_decay = PRESETS[args.preset] if args.weight_decay is None else args.weight_decay
    args.out = args.out or (None if args.demo or args.eval_only and not args.visualize else "runs/vit")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.table), end="")
    elif args.demo:
        demo(args)
    elif args.merge:
        merge(args)
    elif args.eval_only:
        eval_only(args)
    elif args.seeds:  # the recipe once per seed into OUT/seed-N, then one table (mean +- std) in OUT/table.md
        runs = [os.path.join(args.out, f"seed-{seed}") for seed in args.seeds]
        for seed, out in zip(args.seeds, runs):
            train(argparse.Namespace(**{**vars(args), "seed": seed, "out": out, "seeds": None}))
            if not os.path.exists(os.path.join(out, "adapter.safetensors")):
                return  # stopped (Ctrl-C, --stop-after): --resume continues this seed, then the next ones
        if int(os.environ.get("RANK", 0)) == 0:
            text = table(runs)
            atomic_write(os.path.join(args.out, "table.md"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            print(f"{text}written to {os.path.join(args.out, 'table.md')}")
    else:
        train(args)


if __name__ == "__main__":
    main()
