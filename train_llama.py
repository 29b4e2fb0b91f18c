"""GIFT on LLaMA 1/2/3 (llama.py): Commonsense170k in, the paper's 8-task table out.

The paper's language experiments (GIFT_QV: one Theta for all wq, one for all wv, rank 64; the authors' run:
6 epochs of Commonsense170k, random batches of 32 = 8 x 4 accumulation, AdamW without weight decay, linear
schedule with 10% warmup, lr 2.5e-4 (their README's example: the paper states no tuned value); greedy evaluation
on 8 test sets): --protocol paper, the default. --protocol llm-adapters: LLM-Adapters' own settings, under which
the paper's LoRA rows were trained. Data (the LLM-Adapters layout, read by commonsense.py):
DATA/commonsense_170k.json and DATA/dataset/<task>/test.json.

    python train_llama.py --demo                                         # < 1 min on a CPU, synthetic data
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2   # train, then evaluate all 8 sets
    torchrun --nproc_per_node=4 train_llama.py --model Meta-Llama-3-8B/original --data DATA --out runs/l3
    torchrun --nproc_per_node=8 train_llama.py --model Llama-2-70b-hf --data DATA --out runs/l70 --fsdp
    python train_llama.py --model llama-2-7b --data DATA --adapter runs/l2/adapter.safetensors --eval-only
    python train_llama.py --model llama-2-7b --data DATA --eval-only --out runs/l2-base   # the base model
    python train_llama.py --model llama-2-7b --adapter runs/l2/adapter.safetensors --generate "Is water wet?"
    python train_llama.py --model llama-2-7b --adapter runs/l2/adapter.safetensors --merge runs/l2/merged
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2 --resume   # after Ctrl-C or --stop-after
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2-lora --method lora  # the LoRA baseline
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2-la --protocol llm-adapters  # LoRA, as they did
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2-seeds --seeds 1 2 3  # mean +- std table

--model: a Meta folder (params.json, consolidated.NN.pth) or a Hub folder (config.json, model_type llama,
mistral or qwen2); the tokenizer is the one in it (tokenizer.json, tokenizer.model, original/tokenizer.model)
or --tokenizer. --targets takes Meta's names (wq, attention.wq, ...) or HF's (q_proj, ...); --preset proj /
qkvud selects the paper's other variants; --method lora trains the paper's LoRA baseline (q, k, v, up, down;
r=32, alpha 64). Explicit flags win over --protocol's settings. Precision: the weights in bf16 on GPUs, no
autocast, as the official runs; the adapter keeps fp32 master weights unless --adapter-precision bf16 (the
authors' setting). Ctrl-C (or SIGTERM) finishes the step, saves the checkpoint and exits 0; --resume continues.
"""
import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from commonsense import LORA, PRESETS, PROTOCOLS, TASKS, check_tasks, collate, evaluate, global_batches, \
    padding_fraction, seed_table, tokenize_train, validate, write_demo
from fileio import UserError, atomic_write, fingerprint, read_json, read_safetensors, read_safetensors_metadata
from gift import add_gift, parameter_summary
from harness import HelpFormatter, Run, adapter_config, adapter_state_dict, add_adapter, add_common_flags, \
    base_identity, check_adapter_base, check_new_output, check_ranges, check_vocab, cli, close_distributed, \
    compile_model, fused_adamw, load_adapter_state_dict, lock_out, merge_adapter, print0, progress, setup_distributed
from llama import Transformer, field, find_tokenizer, fsdp_shard, generate, layer_names, load_llama, read_args, \
    save_meta, sliding_window
from lora import add_lora

# -----------------------------------------------------------------------------
# The model and its adapter

EVAL_FILES = ("eval.json", "eval.md", "eval_generations.jsonl")  # an evaluation's outputs in --out


def read_adapter_config(path) -> dict:
    """The run config train() writes into an adapter's metadata (files from before --method are GIFT), each field
    checked: a list, a rank in quotes, an unknown method is one line naming the file, the field and the value."""
    config = read_safetensors_metadata(path).get("config") if str(path).endswith(".safetensors") else None
    try:
        config = json.loads(config) if isinstance(config, str) else config
    except json.JSONDecodeError:
        config = None  # adapter_config says it has none
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{path}: its run config is {str(config)[:80]!r}, expected a JSON object; give an "
                        f"adapter.safetensors written by train_llama.py")
    config = {"method": "gift", **adapter_config(path, "train_llama.py", ["targets", "rank"])}
    where = f"{path}'s config"
    field(config, "method", str, where, choices=("gift", "lora"))
    field(config, "rank", int, where, minimum=1)
    targets = config["targets"]
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{where}: targets is {targets!r}, expected a list of layer names")
    try:
        layer_names(targets)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    field(config, "share", str, where, "type", choices=("type", "all"))
    if config["method"] == "lora":
        field(config, "lora_alpha", float, where, above=0)
    for name in ("base", "model"):
        field(config, name, str, where, None)
    return config


def check_adapter_fits(path, model_path):
    """--adapter must fit --model (targets' widths, number of blocks): checked on the model built on the meta
    device (no weight read), else one line naming the adapter's base model and this one."""
    config = read_adapter_config(path)
    args = read_args(model_path)  # its sizes checked against the files' tensors: 10^6 layers fail here, at once
    with torch.device("meta"):
        skeleton = Transformer(args)
        add_adapter(skeleton, config)
    want = {k: tuple(v.shape) for k, v in adapter_state_dict(skeleton).items()}
    have = {k: tuple(v.shape) for k, v in read_safetensors(path).items()}
    if want != have:
        key = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))[0]
        raise UserError(f"--adapter {path} was trained on {config.get('model', 'another model')} and does not fit "
                        f"--model {model_path} ({key}: {have.get(key, 'absent')} in the adapter, "
                        f"{want.get(key, 'absent')} in this model); give an adapter of this model")
    return config


def load_model(args, dtype=None):
    """(model, adapter config): --model with --adapter's adapter (its weights), else a new one (psi = 0 or B = 0:
    the base model's outputs) for --method, --targets, --rank; the base model alone (config None) to evaluate
    or generate without --adapter. --adapter-precision bf16 keeps the adapter's weights in bf16 (the authors').
    model.base_id: the base's identity, written into the adapter (an adapter is refused on another base)."""
    model = load_llama(args.model, dtype=dtype)
    model.base_id = base_identity(model)
    torch.manual_seed(args.seed)  # the same phi (or A) initialisation on every rank and in every run
    if args.adapter:
        config = read_adapter_config(args.adapter)
        check_adapter_base(args.adapter, config, model, args.model, force=args.any_base)
        add_adapter(model, config)
        load_adapter_state_dict(model, read_safetensors(args.adapter))
    elif args.eval_only or args.generate:
        return model, None
    elif args.method == "gift":  # the method: Theta = (phi, psi) per target type, W' = W (I + phi psi)
        config = {"method": "gift", "targets": args.targets, "rank": args.rank, "share": args.share}
        add_gift(model, args.targets, args.rank, args.share)
    else:  # the baseline: W' = W + (alpha / r) B A
        config = {"method": "lora", "targets": args.targets, "rank": args.rank, "lora_alpha": args.lora_alpha}
        add_lora(model, args.targets, args.rank, args.lora_alpha)
    if args.adapter_precision == "bf16":  # the adapter's parameters only; the frozen weights keep --precision
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.grad_checkpointing = args.grad_checkpointing
    return model, config


# -----------------------------------------------------------------------------
# Training (the data: commonsense.py)

def train_data(args, tok, rank):
    """tokenize_train of --data's training file, cached in --out (re-runs, --resume and --seeds start at once).
    --train-on-inputs: the loss on every token (n_prompt 1: no position is masked), as LLM-Adapters' default."""
    data = tokenize_train(tok, Path(args.data) / "commonsense_170k.json", args.template, args.max_len,
                          args.cache or Path(args.out) / "cache", rank)
    return [(ids, 1) for ids, _ in data] if args.train_on_inputs else data


# What fixes a run's trajectory besides its inputs: --resume refuses a checkpoint written with other values
RUN_FIELDS = ("protocol", "epochs", "batch_size", "lr", "warmup", "warmup_steps", "weight_decay", "clip", "seed",
              "group_by_length", "template", "train_on_inputs", "max_len", "preset", "method", "targets", "rank",
              "share", "lora_alpha", "adapter_precision")


def start_run(args, dtype, tok, rank) -> Run:
    """The run in --out (harness.Run: lock, resume only with the same RUN_FIELDS, dtype and inputs by content)."""
    settings = {**{k: getattr(args, k) for k in RUN_FIELDS}, "dtype": str(dtype), "model": fingerprint(args.model),
                "tokenizer": fingerprint(tok.path), "data": fingerprint(Path(args.data) / "commonsense_170k.json"),
                "adapter": args.adapter and fingerprint(args.adapter)}  # the start, when not psi = 0 or B = 0
    return Run(args.out, settings, keys=("theta", "optimizer"), resume=args.resume, rank=rank, overwrite=args.overwrite,
               outputs=EVAL_FILES, inputs={"the base model": args.model})


def train(args, run, model, tok, rank, world, device) -> bool:
    """Trains the adapter in place; log.jsonl, checkpoint.pt (every --save-every steps, and at the end or stop)
    and adapter.safetensors in --out. True when all the steps are done (False: --stop-after, Ctrl-C)."""
    data = train_data(args, tok, rank)
    lengths, n_target = [len(ids) for ids, _ in data], [len(ids) - min(n, len(ids)) for ids, n in data]
    if args.batch_size % (args.micro_batch_size * world):
        raise UserError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x {world} processes")
    accum, steps_per_epoch = args.batch_size // (args.micro_batch_size * world), len(data) // args.batch_size
    total = args.epochs * steps_per_epoch
    if total == 0:
        raise UserError(f"{len(data)} training examples make no batch of {args.batch_size}")
    # as HF: warmup_steps, else warmup_ratio -> ceil(ratio * steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup * total)
    thetas = [p for p in model.parameters() if p.requires_grad]
    opt = fused_adamw(thetas, lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if run.checkpoint:
        load_adapter_state_dict(model, run.checkpoint["theta"])
        opt.load_state_dict(run.checkpoint["optimizer"])
        step = run.checkpoint["step"]
    # model stays the module itself (saving, evaluation); the training forward goes through ddp, which averages
    # each rank's gradients with the others' after the last micro-batch (with --fsdp, main() has sharded model)
    ddp = model
    if world > 1 and not args.fsdp:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    forward = compile_model(ddp, args.compile) if args.compile else ddp
    model.train()
    pad = padding_fraction(lengths, global_batches(lengths, args.batch_size, args.seed, 0, args.group_by_length),
                           args.micro_batch_size)
    print0(f"{'length-grouped' if args.group_by_length else 'random'} batches: {100 * pad:.1f}% of the tokens "
           f"computed are padding")
    bar = progress(total=total, initial=step, disable=rank != 0, desc="train")
    batches, epoch, end = None, -1, min(total, args.stop_after or total)
    if args.eval_every and step == 0:  # the curve's first point: the base model (psi = 0 or B = 0)
        run.log(validate(args, model, tok, rank, world, 0))
    with run.catch_signals():
        while step < end:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                batches = global_batches(lengths, args.batch_size, args.seed, epoch, args.group_by_length)
            t0, batch = time.time(), batches[step % steps_per_epoch]
            # HF's linear schedule, step for step: the first update uses lr 0, the peak is reached after warmup
            lr = args.lr * (step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            # The loss is the mean over every target token of the global batch (all micro-batches, all ranks),
            # so any split into micro-batches and processes gives the same gradient; DDP averages over ranks,
            # hence the factor world.
            denom, micro = max(1, sum(n_target[i] for i in batch)), len(batch) // (accum * world)
            loss_sum = torch.zeros((), device=device)
            for a in range(accum):
                chunk = batch[(a * world + rank) * micro:(a * world + rank + 1) * micro]
                x, y = collate([data[i] for i in chunk], device)
                with ddp.no_sync() if ddp is not model and a < accum - 1 else contextlib.nullcontext():
                    loss = forward(x, y)  # the summed cross-entropy of the micro-batch's target tokens
                    (loss * world / denom).backward()
                loss_sum += loss.detach()
            if args.fsdp:  # FSDP leaves Theta alone (fsdp_shard): average its gradient over the ranks as DDP does
                for p in thetas:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            norm = torch.nn.utils.clip_grad_norm_(thetas, args.clip or math.inf)  # the norm before clipping
            if world > 1:
                dist.all_reduce(loss_sum)
            run.check_finite(f"step {step + 1}", loss=loss_sum, gradient_norm=norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.time() - t0
            stats = {"step": step, "epoch": epoch, "loss": loss_sum.item() / denom, "lr": lr,
                     "tokens_per_s": round(sum(lengths[i] - 1 for i in batch) / seconds), "seconds": round(seconds, 3)}
            bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=stats["tokens_per_s"], refresh=False)
            bar.update()
            run.log(stats)
            if args.eval_every and (step % args.eval_every == 0 or step == total):  # the learning curve
                run.log(validate(args, model, tok, rank, world, step))
            if step % args.save_every == 0:
                run.save({"theta": adapter_state_dict(model), "optimizer": opt.state_dict()}, step)
            if run.should_stop():  # Ctrl-C / SIGTERM on any rank: this step is done; save it and stop
                break
    bar.close()
    run.save({"theta": adapter_state_dict(model), "optimizer": opt.state_dict()}, step)
    run.write_adapter(adapter_state_dict(model), {"script": "train_llama.py", **config_of(args), "model": args.model,
                                                  "base": model.base_id})  # before any evaluation: never lost
    if step < total:
        print0(run.stopped_message(step, total))
    return step == total


def config_of(args):
    """The adapter's run config for a new adapter of --method (what load_model adds)."""
    extra = {"share": args.share} if args.method == "gift" else {"lora_alpha": args.lora_alpha}
    return {"method": args.method, "targets": args.targets, "rank": args.rank, **extra, "lr": args.lr,
            "seed": args.seed}


def merge(args):
    """--model + --adapter -> a Meta checkpoint in the new folder --merge whose weights are W (I + phi psi) (GIFT)
    or W + (alpha/r) B A (LoRA), under the base model's keys; written into a temporary sibling folder that is
    renamed once complete. In the stored dtype; each layer's merge is computed in float32."""
    check_new_output(args.merge, "--merge", {"the --model folder": args.model})
    model, _ = load_model(args)
    atomic_write(args.merge, lambda tmp: save_meta(merge_adapter(model), tmp))
    print(f"merged checkpoint written to {args.merge}")


# -----------------------------------------------------------------------------
# The demo: a small model, tokenizer and data set written to a temporary folder, then the real pipeline

def demo(args):
    """The pipeline's own functions on a small synthetic setup, written to --out (or a new temporary folder) and
    kept: the base model evaluated (GIFT at step 0 is the base model), trained, evaluated again, its adapter
    merged into a Meta checkpoint. On --device (a GPU: in bf16 unless --precision fp32)."""
    t0 = time.time()
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds synchronisation (3-8x slower on a busy CPU)
    if args.out:
        check_new_output(args.out, "--out")
    _, _, _, device = setup_distributed(args.device)
    root = Path(args.out or tempfile.mkdtemp(prefix="gift_llama_demo_"))
    print(f"demo on {device}: writing a small LLaMA (Meta format), a 320-token BPE tokenizer and a SYNTHETIC "
          f"commonsense-style data set (LLM-Adapters layout) to {root}")
    model_dir, data = write_demo(root)
    out = root / "run"
    args = parse_args(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "16",
                       "--rank", "16", "--lr", "2e-2", "--eval-batch-size", "128", "--device", str(device)]
                      + (["--precision", args.precision] if args.precision else [])
                      + (["--compile", args.compile] if args.compile else []))
    variant = lambda **kw: argparse.Namespace(**{**vars(args), **kw})  # noqa: E731
    dtype, tok = precision_dtype(args.precision, device), find_tokenizer(args.model)
    run = start_run(args, dtype, tok, 0)
    model, config = load_model(args, dtype)
    model.to(device)
    print(f"{args.method}: {parameter_summary(model)}")
    base = evaluate(variant(out=str(out / "base")), model, tok, 0, 1, None)  # GIFT at step 0: the base model
    base_fm = evaluate(variant(out=str(out / "base_first_match"), extract="first_match"), model, tok, 0, 1, None)
    train(args, run, model, tok, 0, 1, device)
    tuned = evaluate(args, model, tok, 0, 1, config)
    merge(variant(adapter=str(out / "adapter.safetensors"), merge=str(out / "merged")))
    merged = load_llama(out / "merged")
    print(f"merged Meta checkpoint: {sorted(os.listdir(out / 'merged'))}, {len(merged.state_dict())} tensors")
    print(f"\nSYNTHETIC data, average accuracy over the 8 test sets:\n"
          f"  base model, the paper's exact match:     {base['avg']:5.1f}%  (it answers 'so the pick is ...')\n"
          f"  base model, LLM-Adapters' first match:   {base_fm['avg']:5.1f}%  (it knows the answers)\n"
          f"  GIFT (wq, wv, rank 16), exact match:     {tuned['avg']:5.1f}%  (the format, learned by 2 Thetas)\n"
          f"demo finished in {time.time() - t0:.0f} s; these numbers say nothing about LLaMA. Everything is in {root}:"
          f"\n  {model_dir}, {data}: the synthetic checkpoint, tokenizer and data set\n  {out}: log.jsonl, "
          f"checkpoint.pt, adapter.safetensors, eval.*, base/ and base_first_match/ (the base model's), merged/")
    return tuned


# -----------------------------------------------------------------------------
# Command line

def precision_dtype(precision, device):
    """--precision: the weights' dtype (no autocast, as the official runs); None: bf16 on a GPU, fp32 on a CPU."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[
        precision or ("bf16" if device.type == "cuda" else "fp32")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_flags(p, targets=None, gift_rank="the preset's", lora_rank=32, lora_alpha=None, out="runs/llama",
                     precision=None)
    flag = {a.dest: a for a in p._actions}
    flag["method"].default, flag["method"].help = None, "GIFT, or the LoRA baseline; None: the --protocol's"
    flag["targets"].help += "; Meta's (wq, attention.wq) or HF's (q_proj) names; None: the preset's (GIFT)"
    flag["lora_alpha"].help += "; None: 2 x rank"
    flag["adapter"].help += ", generated from with --generate"
    flag["precision"].choices.append("fp64")  # float64: the tests' exact comparisons of two code paths
    m = p.add_argument_group("this script (None: the --protocol's setting)")
    m.add_argument("--protocol", default="paper", choices=PROTOCOLS, help="paper: the authors' run (GIFT; batch 32 "
                   "= 8 x 4, 6 epochs, lr 2.5e-4, warmup 10%%, 512 tokens, their template, exact match); llm-adapters: "
                   "LLM-Adapters' commonsense command, under which the paper's LoRA rows were trained (LoRA q,k,v,up,"
                   "down r=32 alpha 64 without dropout, batch 16 = 4 x 4, 3 epochs, lr 3e-4, 100 warmup steps, 256 "
                   "tokens, Alpaca template, loss on prompt and answer, first-match answers)")
    m.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="run the recipe once per seed, into "
                   "OUT/seed-SEED, then OUT/seeds.md: mean +- std per task over the seeds")
    m.add_argument("--model", help="Meta or HF checkpoint folder")
    m.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model, or a folder holding one; None: the one in "
                   "--model (or --model/original)")
    m.add_argument("--data", help="folder with commonsense_170k.json and dataset/<task>/test.json")
    m.add_argument("--any-base", action="store_true", help="apply --adapter to a model other than the one it was "
                   "trained on (a merged model, other weights): refused without this flag")
    m.add_argument("--preset", default="qv", choices=PRESETS, help="GIFT's variant: qv: GIFT_QV, proj: GIFT_Proj, "
                   "qkvud: GIFT_QKVUD")
    m.add_argument("--adapter-precision", default="fp32", choices=["fp32", "bf16"], help="the adapter's weights "
                   "(Theta, or LoRA's A and B) and their AdamW state: fp32 master weights (ours), or bf16, the "
                   "authors' setting (the official runs kept Theta in bf16 beside the bf16 model, no autocast)")
    m.add_argument("--epochs", type=int, help="passes over the training set (paper 6, llm-adapters 3)")
    m.add_argument("--batch-size", type=int, help="global: micro x accumulation x processes (32, 16)")
    m.add_argument("--micro-batch-size", type=int, help="examples per forward on each process (8, 4)")
    m.add_argument("--lr", type=float, help="peak learning rate (AdamW). paper: 2.5e-4, the example in the authors' "
                   "README, not a value tuned in the paper (which states none, per preset or otherwise); "
                   "llm-adapters: 3e-4")
    m.add_argument("--warmup", type=float, help="warmup, a fraction of the steps (0.1, 0)")
    m.add_argument("--warmup-steps", type=int, help="warmup in steps, instead of --warmup (none, 100)")
    m.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    m.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (HF Trainer's default); 0: off")
    m.add_argument("--max-len", type=int, help="training sequences are cut to this many tokens (512, 256)")
    m.add_argument("--template", choices=["paper", "alpaca"], help="prompt and target format (paper, alpaca)")
    m.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, help="the loss on the prompt too, "
                   "not only on the answer (no, yes)")
    m.add_argument("--group-by-length", action="store_true", help="batches of similar lengths (HF's option; not "
                   "the authors'): less padding, faster steps; default: random batches, as the authors' run")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    m.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen model over the "
                   "processes (FSDP2) instead of a whole copy on each (DDP), for a model larger than one GPU")
    m.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    m.add_argument("--no-eval", action="store_true", help="train without evaluating afterwards")
    m.add_argument("--tasks", nargs="+", default=TASKS, help="test sets to evaluate: folders of DATA/dataset, the "
                   "paper's eight or your own (answers answerK, optionK, solutionK, endingK, true/false, or the "
                   "words DATA/answers.json lists)")
    m.add_argument("--extract", choices=["paper", "first_match"], help="how the answer is read from a generation: "
                   "the text after 'the correct answer is ', or the first answer word anywhere (paper, first_match)")
    m.add_argument("--eval-limit", type=int, help="evaluate the first N examples of each task; None: all")
    m.add_argument("--eval-every", type=int, help="every N steps (and at steps 0 and last), validate: the first of "
                   "--tasks (list the validation split first) into log.jsonl (curves); None: never")
    m.add_argument("--val-limit", type=int, help="--eval-every's examples (a quick subset); None: --eval-limit's")
    m.add_argument("--eval-batch-size", type=int, default=32, help="prompts per generation batch")
    m.add_argument("--max-new-tokens", type=int, default=32, help="generation length")
    m.add_argument("--generate", metavar="TEXT", help="print the greedy continuation of TEXT")
    p.set_defaults(cache=None)  # --seeds: the seeds' runs share OUT/cache
    args = p.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    given = {k for k in protocol if getattr(args, k) is not None}
    for k, v in protocol.items():  # the protocol's settings, where no flag gave one
        setattr(args, k, v if k not in given else getattr(args, k))
    if "warmup" in given and "warmup_steps" not in given:
        args.warmup_steps = None
    # a user mistake: one line, exit status 2 (main's @cli), before anything is loaded
    check_ranges(args, {"epochs": 1, "batch_size": 1, "micro_batch_size": 1, "rank": 1, "max_len": 2, "save_every": 1,
                        "stop_after": 1, "eval_limit": 1, "eval_every": 1, "val_limit": 1, "eval_batch_size": 1,
                        "max_new_tokens": 0, "warmup": 0, "warmup_steps": 0, "clip": 0, "weight_decay": 0})
    for name, value in (("lr", args.lr), ("lora-alpha", args.lora_alpha)):
        if value is not None and value <= 0:
            raise UserError(f"--{name} {value}: must be greater than 0")
    if args.warmup > 1:
        raise UserError(f"--warmup {args.warmup}: a fraction of the steps, at most 1")
    targets, rank = PRESETS[args.preset] if args.method == "gift" else LORA
    args.targets, args.rank = layer_names(args.targets or targets), args.rank or rank
    args.lora_alpha = float(args.lora_alpha or 2 * args.rank) if args.method == "lora" else None
    if args.demo:
        return args
    args.out = args.out or "runs/llama"
    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder for the run (new, or the one to --resume)")
    if not args.model:
        raise UserError("--model is required (or --demo)")
    if args.merge and not args.adapter:
        raise UserError("--merge needs --adapter (the adapter.safetensors of a run)")
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    if not (args.merge or args.generate or args.data):
        raise UserError("--data is required to train or evaluate")
    if args.fsdp and args.method == "lora":
        raise UserError("--fsdp supports GIFT only (it keeps Theta out of the shards); train LoRA with DDP")
    config = Path(args.model) / "config.json"
    window = sliding_window(read_json(config)) if config.is_file() else None
    if window and args.max_len > window and not (args.eval_only or args.generate):
        raise UserError(f"--max-len {args.max_len} > the sliding window of {args.model} ({window} tokens): "
                        f"sliding-window attention is not implemented; pass --max-len {window} or less")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise UserError("--fsdp shards the model over processes: start it with torchrun --nproc_per_node=2 or more")
    if args.seeds and (args.eval_only or args.generate or args.merge):
        raise UserError("--seeds trains once per seed: not with --eval-only, --generate or --merge")
    return args


def check_inputs(args, tok):
    """The files the command line names, checked before anything is loaded: each mistake is one line."""
    model = Path(args.model)
    if not ((model / "params.json").is_file() or (model / "config.json").is_file()):
        raise UserError(f"--model {model}: no params.json (Meta) or config.json (HF) in it; give a checkpoint folder")
    # the tokenizer against the embedding's size in the files, before the training set is tokenized; an HF folder
    # may pad its embedding past its tokenizer.json (Qwen2: 151936 rows, 151665 ids); Meta's never do
    if tok:
        check_vocab(tok, read_args(model).vocab_size, args.model, allow_padding=tok.path.endswith(".json"))
    if args.adapter:  # its settings replace --method, --targets, --rank, --share, --lora-alpha (training goes on)
        config = check_adapter_fits(args.adapter, args.model)
        args.method, args.targets, args.rank = config["method"], config["targets"], config["rank"]
        args.share, args.lora_alpha = config.get("share", args.share), config.get("lora_alpha")
    if args.merge or args.generate:
        return
    if not args.eval_only and not (Path(args.data) / "commonsense_170k.json").is_file():
        raise UserError(f"--data {args.data}: no commonsense_170k.json in it (the LLM-Adapters layout: "
                        f"DATA/commonsense_170k.json and DATA/dataset/<task>/test.json)")
    final = [] if args.no_eval or args.stop_after else args.tasks  # --eval-every's is the first of --tasks
    check_tasks(args.data, final or args.tasks[:bool(args.eval_every)], args.template)
    used = [n for n in EVAL_FILES if (Path(args.out) / n).exists()]
    if args.eval_only and used and not args.overwrite:  # never replace another evaluation's files
        raise UserError(f"--out {args.out} holds an evaluation ({', '.join(used)}): choose another --out for this "
                        f"one, or add --overwrite to replace it")


def run_recipe(args, tok, rank, world, device):
    """One run in --out: train (unless --eval-only or --generate), then evaluate; the accuracies, or None."""
    dtype, run = precision_dtype(args.precision, device), None
    if rank == 0 and args.eval_only:  # evaluation writes to --out
        lock_out(args.out)
    if not (args.generate or args.eval_only):  # a used --out, a changed setting, a malformed record: before loading
        run = start_run(args, dtype, tok, rank)
        train_data(args, tok, rank)
    model, config = load_model(args, dtype)
    if args.fsdp:  # fully_shard moves only this rank's shard to the GPU
        fsdp_shard(model, device, model.gift)
    else:
        model.to(device)
    print0(f"{args.model}: {model.args}\nadapter {config or 'none (the base model)'}: {parameter_summary(model)}")
    if args.generate:  # under --fsdp every rank generates: each forward gathers weights from all
        ids = generate(model.eval(), [tok.encode(args.generate, tok.add_bos, eos=False)], args.max_new_tokens,
                       tok.stop_ids)
        print0(args.generate + tok.decode(ids[0]))
    elif (run is None or train(args, run, model, tok, rank, world, device)) and not args.no_eval:
        return evaluate(args, model, tok, rank, world, config)  # not after --stop-after or Ctrl-C
    return None


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        return demo(args)
    rank, world, _, device = setup_distributed(args.device)
    tok = None if args.merge else find_tokenizer(args.model, args.tokenizer)
    check_inputs(args, tok)
    if args.merge:  # on the CPU
        if rank == 0:
            merge(args)
        return close_distributed()
    result = None if args.seeds else run_recipe(args, tok, rank, world, device)
    if args.seeds:  # each seed's run in OUT/seed-N (the model read again for each: mapped files, no copy kept)
        outs = [Path(args.out) / f"seed-{s}" for s in args.seeds]
        for seed, out in zip(args.seeds, outs):
            one = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out), "cache": Path(args.out) / "cache"})
            if run_recipe(one, tok, rank, world, device) is None:  # stopped (or --no-eval): no table
                break
        else:
            if rank == 0 and not args.no_eval:
                result = seed_table(args.out, args.seeds, [json.loads((o / "eval.json").read_text()) for o in outs])
    close_distributed()
    return result


if __name__ == "__main__":
    main()
