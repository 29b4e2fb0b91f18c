"""GIFT on a Vision Transformer (vit.py): FGVC / VTAB-1k fine-tuning, evaluation, merging and cluster maps.

GIFT (arXiv 2312.00700) fine-tunes a frozen ViT by generating new attn.proj weights W (I + phi psi) with one
Theta = (phi, psi) shared by all blocks (24,576 trainable numbers for ViT-B/16 at rank 16), plus a new head.
The defaults are the paper's protocol (the authors' timm runs, docs/vit.md): AdamW, 100 epochs, batch 32, timm's
cosine schedule per epoch with 10 warm-up epochs, drop_path 0.1, seed 42, fp32. --method lora: the baseline.

Run:
    python train_vit.py --demo       # synthetic checkpoint + synthetic images: load, train, eval, draw (<1 min, CPU)
    python train_vit.py --model augreg_in21k.safetensors --train CUB_200_2011/train.json \\
        --test CUB_200_2011/test.json --root CUB_200_2011/images --lr 1e-4 --out runs/cub --visualize 8
    python train_vit.py --model augreg_in21k.safetensors --preset vtab --train vtab-1k/dtd/train800val200.txt \\
        --test vtab-1k/dtd/test.txt --num-classes 47 --out runs/dtd
    torchrun --nproc_per_node=4 train_vit.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_vit.py ...same flags... --stop-after 50           # 50 steps, saved, no evaluation
    python train_vit.py ...same flags... --resume                  # continue from runs/cub/checkpoint.pt, exactly
    python train_vit.py --adapter runs/cub/adapter.safetensors --eval-only --test CUB_200_2011/test.json \\
        --root CUB_200_2011/images --visualize 8                   # evaluate an adapter, draw its cluster maps
    python train_vit.py --adapter runs/cub/adapter.safetensors --merge runs/cub/merged.safetensors  # timm names
    python train_vit.py --adapter CUB_last.pth.tar --model augreg_in21k.safetensors --eval-only --test ...

The checkpoint is written atomically after every epoch, and mid-epoch on Ctrl-C / SIGTERM (the step in progress
finishes; exit status 0) or --stop-after. Random numbers are reseeded per (epoch, step, rank), crops and flips per
(seed, epoch, image), so a resumed run repeats an uninterrupted one bit for bit, whatever --workers.
"""
import argparse
import colorsys
import hashlib
import json
import math
import os
import re
import signal
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fileio import UserError, fingerprint, write_safetensors
from gift import add_gift, cluster_head, gift_layers, parameter_summary
from harness import HelpFormatter, Run, adapter_state_dict, add_adapter, add_common_flags, check_new_output, \
    check_ranges, cli, close_distributed, fused_adamw, load_adapter_state_dict, merge_adapter, print0, progress, \
    setup_distributed
from lora import add_lora
from vit import ViTConfig, check_labels, load_image, load_vit, random_google_npz, read_adapter, read_split

# Settings that fix the training trajectory: --resume refuses a checkpoint written with others, and with other
# inputs (model, starting adapter, splits and classes: compared by content, so a moved input is the same).
RESUME_FIELDS = ("preset", "image_size", "method", "targets", "rank", "share", "lora_alpha", "epochs", "warmup",
                 "batch_size", "lr", "warmup_lr", "min_lr", "schedule", "weight_decay", "drop_path", "seed",
                 "precision")


def train(args):
    rank, world, local_rank, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be divisible by {world} processes")
    train_samples, test_samples, classes, num_classes = read_splits(args)
    init = None
    if args.adapter:  # its method, targets and rank, and its weights as the starting point
        init, start_run, _ = read_adapter(args.adapter)
        for k in ("method", "targets", "rank", "share", "lora_alpha"):
            setattr(args, k, start_run.get(k, getattr(args, k)))
        if init["head.weight"].shape[0] != num_classes:  # another task: the adapter alone, a new head
            init = {k: v for k, v in init.items() if not k.startswith("head.")}
    settings = {**{f: getattr(args, f) for f in RESUME_FIELDS}, "num_classes": num_classes,
                "model": fingerprint(args.model), "adapter": args.adapter and fingerprint(args.adapter),
                "train": split_id(train_samples), "test": split_id(test_samples)}
    run = Run(args.out, settings, keys=("adapter", "optimizer", "epoch", "in_epoch", "loss_sum"), resume=args.resume,
              rank=rank)
    ckpt = run.checkpoint
    if ckpt and args.stop_after and args.stop_after <= ckpt["step"]:
        raise UserError(f"--stop-after {args.stop_after}: {run.checkpoint_path} already holds {ckpt['step']} steps; "
                        f"give a later one, or none")

    # The model: the pretrained ViT with a new head, frozen, and the adapter (its only trainable part, with the head)
    torch.manual_seed(args.seed)  # the same new head and Theta on every rank
    model = load_vit(args.model, num_classes=num_classes, image_size=args.image_size, drop_path=args.drop_path,
                     log=print0)
    if args.method == "gift":  # W (I + phi psi): one Theta per target type, shared by every block
        thetas = add_gift(model, args.targets, args.rank, args.share)
        n_adapter = sum(p.numel() for p in thetas.parameters())
    else:                      # W + (alpha / r) B A: one pair per layer
        layers = add_lora(model, args.targets, args.rank, args.lora_alpha)
        n_adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    if init is not None:
        check_fits(model, init, args.adapter, start_run, args.model)
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
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)),
                                              batch_size=batch, **loader_options(args, device))
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
    net = compiled(ddp) if args.compile else ddp
    autocast, stopped = autocast_for(args, device), False
    with run.catch_signals():
        print0(f"training: {total} steps ({args.epochs} epochs of {steps}), from step {step}")
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)  # its order depends on (seed, epoch) alone: a resumed epoch skips its done steps
            train_set.epoch = epoch
            loader = torch.utils.data.DataLoader(train_set, batch_size=batch, sampler=list(sampler)[skip * batch:],
                                                 **loader_options(args, device))
            model.train()
            t0 = time.time()
            for i, (x, y) in enumerate(progress(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=skip,
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
                  "adapter_params": n_adapter}
        print(f"adapter ({args.method} + head + run config): "
              f"{run.write_adapter(adapter_state_dict(model, ['head']), config)}")
        if args.visualize:
            draw(model, test_set, args, args.method)
    close_distributed()
    return model


def compiled(model):  # GIFT_COMPILE_BACKEND: e.g. aot_eager, which needs no C++ compiler (the tests use it)
    return torch.compile(model, backend=os.environ.get("GIFT_COMPILE_BACKEND", "inductor"))


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


def check_fits(model, state, adapter, run, base):
    """An adapter's tensors must have this model's shapes (a new head excepted): else one line naming both."""
    want = adapter_state_dict(model, ["head"])
    bad = [k for k in sorted(state.keys() | want.keys()) if (k in state) != (k in want) and not k.startswith("head.")
           or k in state and k in want and state[k].shape != want[k].shape]
    if bad:
        k, c, shape = bad[0], model.config, lambda d: tuple(d[bad[0]].shape) if bad[0] in d else "absent"
        raise UserError(f"{adapter} was trained on {trained_on(run)} and does not fit {base} (dim {c.dim}, depth "
                        f"{c.depth}): {k} is {shape(state)} there, {shape(want)} here")


def trained_on(run):
    vit = run.get("vit")
    return (run.get("model") or run.get("checkpoint") or run.get("arch") or "an unnamed model") + (
        f", dim {vit['dim']}, depth {vit['depth']}" if vit else "")


# -----------------------------------------------------------------------------
# Data: class folders, `relative/path label` list files (VTAB-1k), VPT split JSON (FGVC)

def read_splits(args):
    """(train samples, test samples, classes, num_classes) of --train and --test, checked before any loading."""
    form = lambda spec: "folders" if os.path.isdir(spec) else os.path.splitext(spec)[1]  # noqa: E731
    if form(args.train) != form(args.test):
        raise UserError(f"--train {args.train} and --test {args.test} must have the same form (labels map alike)")
    train_samples, classes = read_split(args.train, args.root)
    test_samples, _ = read_split(args.test, args.root, classes)
    num_classes = args.num_classes or (len(classes) if classes else 1 + max(s[1] for s in train_samples))
    train_samples, test_samples = check_labels(train_samples, num_classes), check_labels(test_samples, num_classes)
    if len({label for _, label in train_samples}) < 2:  # a 1-way head is 100% right whatever it learns
        raise UserError(f"--train {args.train}: every image has the same label; a classifier needs two classes or more")
    return train_samples, test_samples, classes, num_classes


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs; the crop and flip of sample i depend on (seed, epoch, i) alone, not on which worker
    or process decodes it: a run resumed with another --workers repeats them exactly."""
    def __init__(self, samples, size, mode, seed=0):
        self.samples, self.size, self.mode, self.seed, self.epoch = samples, size, mode, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return load_image(self.samples[i][0], self.size, self.mode, rng), self.samples[i][1]


def loader_options(args, device):
    """DataLoader options: pinned memory on CUDA, and workers that leave Ctrl-C to the main process (a terminal
    sends it to every process: a worker that died of it would end the run before its checkpoint is saved)."""
    return dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                worker_init_fn=_ignore_sigint if args.workers else None)


def _ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def split_id(samples):
    """A short hash of a split as the run sees it: its images' paths relative to their common folder, labels."""
    base = os.path.commonpath([path for path, _ in samples])
    listing = [(os.path.relpath(path, base), label) for path, label in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# Evaluation: top-1 accuracy, an adapter (or the base model) on a split, merging, and the paper's cluster maps

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
    in the adapter's run config; the adapter's head."""
    state, run, stored = read_adapter(args.adapter)
    base = args.model or run.get("model") or run.get("checkpoint")  # "checkpoint": adapters of before --model
    if not base:
        raise UserError(f"{args.adapter} names no base model: give --model (it was trained on {run.get('arch')})")
    vit = ViTConfig(**run["vit"]) if "vit" in run else None
    try:
        model = load_vit(base, vit, num_classes=state["head.weight"].shape[0], image_size=vit and vit.image_size,
                         log=print0)
    except UserError as e:  # the adapter's ViTConfig is not this model's
        raise UserError(f"{args.adapter} was trained on {trained_on(run)} and does not fit {base}: {e}") from None
    add_adapter(model, run)
    check_fits(model, state, args.adapter, run, base)
    load_adapter_state_dict(model, state)
    return model, run, stored


def eval_only(args):
    """--eval-only: top-1 of --adapter on --test (beside the one stored in it; --visualize: its cluster maps), or
    of the base model --model zero-shot with its own classifier head."""
    rank, world, _, device = setup_distributed(args.device)
    if args.adapter:
        model, run, stored = adapter_model(args)
        label = f"{args.adapter} ({run['method']} r={run['rank']})"
    else:
        try:
            model = load_vit(args.model, image_size=args.image_size, log=print0)
        except UserError as e:
            if "no usable classifier head" not in str(e):
                raise
            raise UserError(f"--eval-only without --adapter evaluates the base model zero-shot, with its own "
                            f"classifier head; {args.model} has none (missing or all zeros): give --adapter") from None
        run, stored, label = {"preset": args.preset}, None, f"the base model {args.model}, zero-shot (its own head)"
    model.to(device)
    samples, classes = read_split(args.test, args.root, run.get("classes"))
    if run.get("classes") is None and classes and len(classes) != model.config.num_classes:
        raise UserError(f"{args.test} has {len(classes)} classes and the model's head {model.config.num_classes}: "
                        f"its labels would not map to the head's")
    mode = "test" if run.get("preset", args.preset) == "fgvc" else "resize"  # the run's preprocessing
    test_set = ImageDataset(check_labels(samples, model.config.num_classes), model.config.image_size, mode)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)),
                                         batch_size=max(1, args.batch_size // world), **loader_options(args, device))
    top1 = evaluate(compiled(model) if args.compile else model, loader, device, autocast_for(args, device))
    print0(f"{label} on {args.test}: top-1 {top1:.2f}% of {len(test_set)} images" + (
        f"; stored in the adapter: {stored:.2f}%" if stored is not None else "; stored in the adapter: none"
        if args.adapter else ""))
    if args.visualize and rank == 0:
        draw(model, test_set, args, run.get("method"))
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


def draw(model, test_set, args, method):
    if method != "gift":
        raise UserError(f"--visualize draws GIFT's cluster maps; this is a {method or 'base'} model")
    maps = visualize(model, test_set, args.visualize, args.vis_layers, os.path.join(args.out, "cluster_maps"))
    print(f"cluster maps of {len(maps)} correctly classified test images: "
          f"{os.path.dirname(maps[0]) if maps else 'none'}")


def _jet(v):
    """(...) values in [0, 1] -> (..., 3) RGB in [0, 255], the 'jet' colour map (dark blue at 0, red at 1)."""
    return np.stack([np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)], axis=-1) * 255


TITLE, LABEL, LEGEND = 16, 14, 36  # pixel heights of the title, the labels above each row, the colour key


@torch.no_grad()
def visualize(model, dataset, n, layers, out_dir):
    """PNG grids for n correctly classified images of `dataset` (the paper shows only those), taken in a fixed
    shuffled order. A title names the image and the rank r; one row per chosen GIFT layer (block indices `layers`,
    None = all), named above it: the image, all r clusters at once, then each cluster's map; a colour key below.
    Map k of a layer: its output tokens y (N, d_out), CLS dropped, times column k of C = W phi (d_out, r),
    upsampled bilinearly to the image, min-max normalised, zeroed under 0.5, overlaid as a heat map (alpha 0.6).
    The 'all clusters' tile colours each pixel by its strongest cluster (where that one is >= 0.5): cluster k's
    colour is the swatch beside its name."""
    from PIL import Image, ImageDraw
    c, device = model.config, next(model.parameters()).device
    g, tile = c.image_size // c.patch_size, max(c.image_size, 128)  # tiles of at least 128 px stay readable
    chosen = [(name, layer) for name, layer in gift_layers(model)
              if name.startswith("blocks.") and (layers is None or int(name.split(".")[1]) in layers)]
    if not chosen:
        raise UserError(f"--vis-layers {layers}: no GIFT layer there; {[name for name, _ in gift_layers(model)]}")
    outputs, heads = {}, {name: cluster_head(layer) for name, layer in chosen}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, layer in chosen]
    r = max(h.shape[1] for h in heads.values())
    palette = np.array([colorsys.hsv_to_rgb(k / r, 0.85, 0.95) for k in range(r)]) * 255  # (r, 3): cluster k's colour
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for i in np.random.default_rng(0).permutation(len(dataset)).tolist():  # a fixed sample across classes
        if len(written) == n:
            break
        x, y = dataset[i]
        if model(x[None].to(device)).argmax(1).item() != y:
            continue
        image = Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        base = np.asarray(image.resize((tile, tile), Image.BILINEAR), dtype=np.float32)  # (tile, tile, 3)
        canvas = Image.new("RGB", ((r + 2) * tile, TITLE + len(chosen) * (tile + LABEL) + LEGEND), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 2), f"GIFT cluster maps, rank {r}: test image {i} (label {y}); a row per layer", fill="black")
        for row, (name, _) in enumerate(chosen):
            maps = (outputs[name][0, 1:].float() @ heads[name]).T.reshape(-1, 1, g, g)  # (N,d_out)@(d_out,r)
            maps = F.interpolate(maps, size=(tile, tile), mode="bilinear", align_corners=False)[:, 0]
            lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
            maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()
            maps[maps < 0.5] = 0
            top = TITLE + row * (tile + LABEL)
            strongest = np.where(maps.max(0, keepdims=True)[..., None] > 0, palette[maps.argmax(0)][None], base)[0]
            tiles = [(f"layer {name}", base), ("all clusters", 0.4 * base + 0.6 * strongest)]
            tiles += [(f"cluster {k}", 0.4 * base + 0.6 * _jet(m)) for k, m in enumerate(maps)]
            for col, (text, pixels) in enumerate(tiles):
                canvas.paste(Image.fromarray(pixels.round().astype(np.uint8)), (col * tile, top + LABEL))
                if col > 1:  # the cluster's swatch, as in the 'all clusters' tile
                    draw.rectangle([col * tile + 2, top + 2, col * tile + 11, top + 11], fill=tuple(
                        palette[col - 2].astype(int)))
                draw.text((col * tile + (14 if col > 1 else 2), top + 1), text, fill="black")
        key = TITLE + len(chosen) * (tile + LABEL) + 4  # the heat maps' scale: jet from 0.5 (blue) to 1 (red)
        draw.text((2, key + 1), "cluster k: its map, 0.5", fill="black")
        canvas.paste(Image.fromarray(_jet(np.tile(np.linspace(0.5, 1, 128), (12, 1))).astype(np.uint8)), (150, key))
        draw.text((282, key + 1), "1 (min-max; under 0.5: none)", fill="black")
        draw.text((2, key + 18), "all clusters: each pixel in its strongest cluster's colour", fill="black")
        written.append(os.path.join(out_dir, f"test{i:05d}_label{y}.png"))
        canvas.save(written[-1])
    for hook in hooks:
        hook.remove()
    return written


# -----------------------------------------------------------------------------
# Demo: a synthetic checkpoint and data set, then the real pipeline

def make_demo(root):
    """Writes a random ViT (dim 64, depth 4, patch 8, 64 px) in Google's .npz layout and generated images of 4
    coloured-square classes in class folders. Returns (checkpoint, train dir, test dir)."""
    from PIL import Image
    checkpoint, rng = random_google_npz(os.path.join(root, "ViT-demo.npz")), np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
    for split, count in (("train", 24), ("test", 12)):
        for name, rgb in colours.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for j in range(count):
                img = rng.integers(60, 160, (80, 80, 3)).astype(np.uint8)  # grey noise, one coloured square
                s = rng.integers(20, 36)
                y0, x0 = rng.integers(0, 80 - s, 2)
                img[y0:y0 + s, x0:x0 + s] = rgb
                Image.fromarray(img).save(os.path.join(root, split, name, f"{j:03d}.png"))
    return checkpoint, os.path.join(root, "train"), os.path.join(root, "test")


def demo(args):
    t0 = time.time()
    if args.out:
        check_new_output(args.out, "--out")
    root = args.out or tempfile.mkdtemp(prefix="gift_vit_demo_")
    print("=" * 100 + "\nDEMO: the checkpoint and the data are SYNTHETIC (a random-weight ViT written in "
          "Google's .npz format,\ngenerated 80 px pictures of 4 coloured-square classes). Accuracies say nothing "
          f"about real tasks.\nFiles: {root}\n" + "=" * 100)
    checkpoint, train_dir, test_dir = make_demo(root)
    # a tiny model on a small shared CPU: one compute thread, so that it never contends with the decoding
    # workers (oversubscribed OpenMP threads can slow these small matmuls down 10x)
    torch.set_num_threads(1)
    run = os.path.join(root, "run")
    same = [*(["--device", str(args.device)] if args.device else []), "--precision", args.precision] + (
        ["--compile"] if args.compile else [])
    train(parse_args(["--model", checkpoint, "--train", train_dir, "--test", test_dir, "--out", run, "--epochs", "5",
                      "--warmup", "1", "--schedule", "step", "--batch-size", "16", "--lr", "3e-3", "--workers", "2",
                      "--visualize", "2", *same]))
    merge(parse_args(["--adapter", os.path.join(run, "adapter.safetensors"), "--merge",
                      os.path.join(run, "merged.safetensors")]))
    print(f"demo done in {time.time() - t0:.0f} s (SYNTHETIC data). Everything is in {root}:\n"
          f"  {checkpoint}, {train_dir}, {test_dir}: the synthetic checkpoint and images\n"
          f"  {run}: log.jsonl (one line per epoch), checkpoint.pt (resume), adapter.safetensors, "
          f"merged.safetensors, cluster_maps/*.png")

# -----------------------------------------------------------------------------
# Command line

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's Linear layers: what --targets may name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_flags(p, targets=["attn.proj"], gift_rank=16, lora_rank=8, lora_alpha=1.0, out="runs/vit")
    m = p.add_argument_group("the model and the data")
    m.add_argument("--model", help="the base ViT: Google .npz, timm .pth / .safetensors, HF ViT .safetensors or a "
                   "--merge output; the paper's: vit_base_patch16_224.augreg_in21k (see README)")
    m.add_argument("--checkpoint", dest="model", help=argparse.SUPPRESS)  # its name before --model
    m.add_argument("--train", help="training split: class-folder directory, VPT .json, or `path label` .txt list")
    m.add_argument("--test", help="split evaluated after every epoch (same forms)")
    m.add_argument("--root", help="where .json / .txt relative paths start; None: the split file's folder")
    m.add_argument("--num-classes", type=int, help="None: the class folders, or the largest training label + 1")
    m.add_argument("--preset", choices=["fgvc", "vtab"], default="fgvc", help="fgvc: Resize(256), RandomCrop(224), "
                   "flip / Resize(256), CenterCrop(224); vtab: resize to 224, no augmentation")
    m.add_argument("--image-size", type=int, help="None: the model's (another size resizes the position embeddings)")
    m.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoders per process")
    t = p.add_argument_group("training (the paper's protocol: timm's AdamW and cosine schedule)")
    for flag, kind, default, text in (
            ("epochs", int, 100, "passes over the training split"), ("batch-size", int, 32, "global batch"),
            ("lr", float, 1e-4, "peak learning rate"), ("warmup", int, 10, "warmup epochs"),
            ("warmup-lr", float, 1e-7, "the warmup's first learning rate"), ("min-lr", float, 1e-6, "the floor"),
            ("weight-decay", float, 1e-4, "AdamW's, on >= 2-D parameters only"),
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
    for name, bad in (("lr", args.lr <= 0), ("lora-alpha", args.lora_alpha <= 0), ("drop-path", args.drop_path >= 1),
                      ("vis-layers", min(args.vis_layers or [0]) < 0)):
        if bad:
            raise UserError(f"--{name} {getattr(args, name.replace('-', '_'))}: must be " + {
                "lr": "> 0", "lora-alpha": "> 0", "drop-path": "< 1", "vis-layers": "block indices >= 0"}[name])
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
    if not (args.demo or args.merge or args.eval_only or (args.model and args.train and args.test)):
        raise UserError("give --model, --train and --test (or --adapter FILE with --eval-only --test or --merge OUT, "
                        "or --demo)")
    for flag, want in (("train", "a folder of class folders, a VPT .json or a `path label` .txt"), ("test", "the "
                       "same"), ("root", "a folder"), ("model", "a ViT checkpoint"), ("adapter", "an adapter file")):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)} does not exist (expected {want})")
    if args.adapter and not args.model and open(args.adapter, "rb").read(4) == b"PK\x03\x04":
        raise UserError(f"--adapter {args.adapter} is a torch file (the GIFT authors' format), which names no base "
                        f"weights: give --model (vit_base_patch16_224.augreg_in21k for theirs)")
    if args.visualize and args.method == "lora" and args.train:
        raise UserError("--visualize draws GIFT's cluster maps; a LoRA run has none")
    args.rank = args.rank or {"gift": 16, "lora": 8}[args.method]
    args.out = args.out or (None if args.demo else "runs/vit")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        demo(args)
    elif args.merge:
        merge(args)
    elif args.eval_only:
        eval_only(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
