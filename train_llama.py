"""GIFT on a hand-written LLaMA 1/2/3: raw Meta or HF checkpoints in, the Commonsense170k table out.

The paper's language experiments (GIFT_QV: one Theta for all wq, one for all wv, rank 64; 6 epochs of
Commonsense170k, batch 32, AdamW, lr 2.5e-4, linear schedule with 10% warmup; greedy evaluation on 8 test
sets) with nothing but torch: the model and the checkpoint readers are here, the tokenizers in tokenizer.py.

Data (the LLM-Adapters layout): DATA/commonsense_170k.json and DATA/dataset/{boolq,piqa,social_i_qa,
hellaswag,winogrande,ARC-Easy,ARC-Challenge,openbookqa}/test.json.

    python train_llama.py --demo                                         # < 1 min on a CPU, synthetic data
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2   # train, then evaluate all 8 sets
    torchrun --nproc_per_node=4 train_llama.py --model Meta-Llama-3-8B/original --data DATA --out runs/l3
    torchrun --nproc_per_node=8 train_llama.py --model Llama-2-70b-hf --data DATA --out runs/l70 --fsdp
    python train_llama.py --model llama-2-7b --data DATA --adapter runs/l2/adapter.safetensors --eval-only
    python train_llama.py --model llama-2-7b --adapter runs/l2/adapter.safetensors --generate "Is water wet?"
    python train_llama.py --model llama-2-7b --adapter runs/l2/adapter.safetensors --merge runs/l2/merged
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2 --resume   # after an interruption
    python train_llama.py --model llama-2-7b --data DATA --out runs/l2-lora --method lora  # the LoRA baseline

--model takes a Meta folder (params.json, consolidated.NN.pth) or a Hub folder of the Llama family (config.json
with model_type llama, mistral or qwen2; model.safetensors or model.safetensors.index.json); the tokenizer is
MODEL/tokenizer.json (an HF folder's, with BOS/EOS from the folder's JSON files), MODEL/tokenizer.model or
MODEL/original/tokenizer.model, or --tokenizer. --preset proj / qkvud selects the paper's other variants.
--method lora trains the baseline the paper compares with (q, k, v, up, down; r=32, alpha 64) through the same
data, schedule, adapter file and evaluation. Precision: the weights in bf16 on GPUs and no autocast, as the
official runs; Theta (or LoRA's A, B) keeps fp32 master weights unless --theta-dtype bf16 (the official runs).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gift import parameter_summary
from tokenizer import load_tokenizer, train_tiny_tokenizer
from fileio import UserError, atomic_save, atomic_write, fingerprint, read_json, read_safetensors, write_safetensors
from harness import adapter_config, adapter_state_dict, add_adapter, check_finite, check_new_output, check_ranges, \
    check_vocab, cli, load_adapter_state_dict, lock_out, log_json, merge_adapter, print0, progress, resume_checkpoint, \
    setup_distributed, trim_log



def read_adapter_config(path) -> dict:
    """The run config train() writes into an adapter's metadata: {method, targets, rank, share, alpha, model}
    (files written before --method existed are GIFT)."""
    return {"method": "gift", **adapter_config(path, "train_llama.py", ["targets", "rank"])}


def gift_model(args, dtype=None) -> Transformer:
    """load_llama(args.model) with the adapter (GIFT or LoRA) added, on the CPU: --adapter's weights, or new ones
    (psi = 0 or B = 0, so the model's outputs are still the base model's) for --method, the preset, --targets,
    --rank. --theta-dtype bf16 stores the adapter's weights in bf16 (the official runs), else fp32 master weights."""
    config = gift_config(args)  # first: a bad adapter is an error before the model is loaded
    model = load_llama(args.model, dtype=dtype)
    torch.manual_seed(args.seed)  # the same phi (or A) initialisation on every rank and in every run
    add_adapter(model, config)
    if args.adapter:
        load_adapter_state_dict(model, read_safetensors(args.adapter))
    if args.theta_dtype == "bf16":  # the adapter's parameters only; the frozen weights keep --dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.grad_checkpointing = args.grad_checkpointing
    return model


# -----------------------------------------------------------------------------
# Data: Commonsense170k in the LLM-Adapters layout

TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
TRIGGER = "the correct answer is "  # the paper's (LoReFT's) target prefix; evaluation reads what follows it
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ANSWER_WORDS = {"boolq": "true|false", "piqa": "solution1|solution2", "hellaswag": "ending1|ending2|ending3|ending4",
                "winogrande": "option1|option2"}  # the rest: answer1..answer5 (LLM-Adapters' extract_answer)
# Another task's answers must all take one of the eight tasks' forms; its answer words follow from them
ANSWER_FORMS = {"answerK": "answer[1-9][0-9]*", "optionK": "option[1-9][0-9]*", "solutionK": "solution[1-9][0-9]*",
                "endingK": "ending[1-9][0-9]*", "true/false": "true|false"}

# Paper (v3) Table: accuracy % in TASKS order, then the average; GIFT_QV r=64, and LoRA (r=32 on q, k, v, up, down)
PAPER_LORA = {"LLaMA-1 7B": [68.9, 80.7, 77.4, 78.1, 78.8, 77.8, 61.3, 74.8, 74.7],
              "Llama-2 7B": [69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0, 77.6],
              "Llama-3 8B": [70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0, 80.8]}
PAPER = {"LLaMA-1 7B": [69.9, 83.2, 80.0, 93.2, 81.7, 85.4, 70.8, 82.5, 80.9],
         "Llama-2 7B": [72.0, 84.4, 80.9, 94.0, 85.1, 86.9, 74.5, 82.7, 82.6],
         "Llama-3 8B": [74.7, 89.2, 81.7, 96.0, 88.2, 92.7, 82.7, 88.8, 86.7]}


def read_records(path, required):
    """A JSON list of dicts, each with the required string fields; errors name the file and the index."""
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        for field in required:
            if not isinstance(r, dict) or not isinstance(r.get(field), str):
                raise UserError(f"{path}: record {i} has no string field {field!r}: {str(r)[:200]}")
    return records


def prompt_of(record, template):
    if template == "paper":  # LoReFT's commonsense prompt: the instruction and a newline
        return record["instruction"] + "\n"
    return (ALPACA_INPUT if record.get("input") else ALPACA).format(**record)


def target_of(record, template):
    return TRIGGER + record["answer"] if template == "paper" else record["output"]


def example_ids(tok, record, template, max_len):
    """(ids, n_prompt): BOS (if the tokenizer adds one) + prompt + target + EOS cut to max_len; the loss is on
    ids[n_prompt:]. Prompt and target are tokenized together (as LoReFT does), so the boundary tokenizes as in
    the text."""
    prompt = prompt_of(record, template)
    ids = tok.encode(prompt + target_of(record, template), tok.add_bos, eos=False)[:max_len - 1] + [tok.eos_id]
    return ids, len(tok.encode(prompt, tok.add_bos, eos=False))


def tokenize_train(tok, path, template, max_len, cache_dir, rank):
    """[(ids, n_prompt)] of every training example (example_ids). Cached by the file's and the tokenizer's
    identity: re-runs and --resume start at once."""
    path, stats = Path(path), [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                                for p in (path, tok.path)]
    key = hashlib.sha256(json.dumps([stats, template, max_len, tok.add_bos, tok.eos_id]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"tokens-{key}.pt"
    if rank == 0 and not cache.exists():
        required = ["instruction", "answer"] if template == "paper" else ["instruction", "output"]
        ids, offsets, n_prompt = [], [0], []
        for r in progress(read_records(path, required), desc=f"tokenizing {path.name}"):
            seq, n = example_ids(tok, r, template, max_len)
            ids += seq
            offsets.append(len(ids))
            n_prompt.append(n)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"ids": torch.tensor(ids, dtype=torch.int32), "offsets": torch.tensor(offsets),
                     "n_prompt": torch.tensor(n_prompt, dtype=torch.int32)}, cache)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's cache
    c = torch.load(cache, weights_only=True)
    o = c["offsets"].tolist()
    return [(c["ids"][o[i]:o[i + 1]].long(), n) for i, n in enumerate(c["n_prompt"].tolist())]


def global_batches(lengths, batch_size, seed, epoch):
    """The epoch's batches of indices, grouped by length as HF's group_by_length does: shuffle, cut into
    megabatches of 50 batches, sort each by length, cut into batches; then (unlike HF, which keeps them
    longest to shortest) shuffle the batches, so that an epoch is not a curriculum from long to short
    questions. The last, partial batch is dropped (under batch_size examples, different ones each epoch)."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches, mega = [], 50 * batch_size
    for i in range(0, len(perm), mega):
        chunk = sorted(perm[i:i + mega], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def collate(examples, device):
    """[(ids, n_prompt)], ids a tensor or list -> inputs (B, T) right-padded with 0, targets (B, T) with -100 off
    the target."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        ids = torch.as_tensor(ids)
        x[b, :len(ids) - 1], y[b, :len(ids) - 1] = ids[:-1], ids[1:]
        y[b, :n_prompt - 1] = -100  # position t predicts token t + 1: prompt tokens are not targets
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Training

PRESETS = {"qv": (["attention.wq", "attention.wv"], 64),  # GIFT_QV, the paper's main setting
           "proj": (["attention.wo"], 128),              # GIFT_Proj
           "qkvud": (["attention.wq", "attention.wk", "attention.wv", "feed_forward.w3", "feed_forward.w2"], 64)}
LORA = (PRESETS["qkvud"][0], 32)  # the paper's LoRA baseline (LLM-Adapters): q, k, v, up, down, r=32, alpha 2r


def gift_config(args):
    """The adapter's {method, targets, rank, share, alpha}: --adapter's, else --method's setting (GIFT: --preset;
    LoRA: the paper's baseline) with --targets, --rank and --lora-alpha over it."""
    if args.adapter:
        return read_adapter_config(args.adapter)
    targets, rank = PRESETS[args.preset] if args.method == "gift" else LORA
    rank = args.rank or rank
    config = {"method": args.method, "targets": args.targets or targets, "rank": rank}
    if args.method == "gift":
        return {**config, "share": args.share}
    return {**config, "lora_alpha": float(args.lora_alpha or 2 * rank)}


def fsdp_shard(model, device):
    """FSDP2 for a model larger than one GPU: each block's frozen weights, then the rest (embeddings, norm,
    output), are split over the processes and gathered one block at a time for its forward and backward.
    Theta (a few MB) stays whole on every rank, left out of FSDP: it stays float32 beside bf16 weights,
    train() averages its gradient over the ranks, and it is saved and loaded exactly as without FSDP."""
    from torch.distributed.fsdp import fully_shard  # here: importing it costs every other run a second
    for block in model.layers:  # moved to the device and sharded one block at a time
        fully_shard(block)
    fully_shard(model, ignored_params=set(model.gift.parameters()))
    model.gift.to(device)  # FSDP moves only what it manages


# What fixes a run's trajectory besides its inputs: --resume refuses a checkpoint written with other values
CHECKPOINT_KEYS = ("theta", "optimizer", "step")  # and "run", RUN_FIELDS and the inputs (run_settings)
RUN_FIELDS = ("epochs", "batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "template", "max_len", "preset",
              "method", "targets", "rank", "share", "lora_alpha", "theta_dtype")


def run_settings(args, dtype, tok):
    """RUN_FIELDS, the weights' dtype, and the model, tokenizer and training data by content (a moved or copied
    input is the same input): what a resumed run must share with the checkpoint's."""
    return {**{k: getattr(args, k) for k in RUN_FIELDS}, "dtype": str(dtype), "model": fingerprint(args.model),
            "tokenizer": fingerprint(tok.path), "data": fingerprint(Path(args.data) / "commonsense_170k.json")}


def train(args, model, tok, rank, world, device):
    """Trains model.gift in place; writes log.jsonl, checkpoint.pt (every --save-every steps) and
    adapter.safetensors (Theta, and the run config in its metadata) to --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = train_data(args, tok, rank)
    lengths = [len(ids) for ids, _ in data]
    n_target = [len(ids) - min(n, len(ids)) for ids, n in data]
    if args.batch_size % (args.micro_batch_size * world):
        raise UserError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x {world} processes")
    accum = args.batch_size // (args.micro_batch_size * world)
    steps_per_epoch = len(data) // args.batch_size
    total = args.epochs * steps_per_epoch
    if total == 0:
        raise UserError(f"{len(data)} training examples make no batch of {args.batch_size}")
    warmup = math.ceil(args.warmup * total)  # as HF: warmup_ratio -> ceil(ratio * steps)
    thetas = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(thetas, lr=args.lr, weight_decay=args.weight_decay)
    step, ckpt_path = 0, out / "checkpoint.pt"
    run = run_settings(args, model.tok_embeddings.weight.dtype, tok)
    ckpt = resume_checkpoint(ckpt_path, args.resume, run, CHECKPOINT_KEYS, device)
    if ckpt:
        load_adapter_state_dict(model, ckpt["theta"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    saved = step  # the step of the checkpoint on disk (0: none yet)
    # model stays the module itself (saving, evaluation); the training forward goes through ddp, which averages
    # each rank's gradients with the others' after the last micro-batch (with --fsdp, main() has sharded model)
    ddp = model
    if world > 1 and not args.fsdp:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)

    def save(step):
        nonlocal saved
        if rank == 0:
            atomic_save({"theta": adapter_state_dict(model), "optimizer": opt.state_dict(), "step": step,
                         "run": run}, ckpt_path)
        saved = step

    model.train()
    bar = progress(total=total, initial=step, disable=rank != 0, desc="train")
    if rank == 0:  # the log keeps the steps the checkpoint holds: a resumed run logs each step once
        trim_log(out / "log.jsonl", "step", step)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    batches, epoch = None, -1
    while step < total and step < (args.stop_after or total):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = global_batches(lengths, args.batch_size, args.seed, epoch)
        t0, batch = time.time(), batches[step % steps_per_epoch]
        # HF's linear schedule, step for step: the first update uses lr 0, the peak is reached after warmup
        lr = args.lr * (step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        # The loss is the mean over every target token of the global batch (all micro-batches, all ranks):
        # so any split into micro-batches and processes gives the same gradient. DDP averages over ranks,
        # hence the factor world.
        denom = max(1, sum(n_target[i] for i in batch))
        micro = len(batch) // (accum * world)
        loss_sum = torch.zeros((), device=device)
        for a in range(accum):
            chunk = batch[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            x, y = collate([data[i] for i in chunk], device)
            with ddp.no_sync() if ddp is not model and a < accum - 1 else contextlib.nullcontext():
                loss = ddp(x, y)
                (loss * world / denom).backward()
            loss_sum += loss.detach()
        if args.fsdp:  # FSDP leaves Theta alone (fsdp_shard): average its gradient over the ranks as DDP does
            for p in thetas:
                dist.all_reduce(p.grad)
                p.grad /= world
        norm = torch.nn.utils.clip_grad_norm_(thetas, args.clip or math.inf)  # the norm before clipping
        if world > 1:
            dist.all_reduce(loss_sum)
        check_finite(f"step {step + 1}", f"{ckpt_path} (step {saved}) is kept" if saved else "nothing was saved",
                     loss=loss_sum, gradient_norm=norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens = sum(lengths[i] - 1 for i in batch)
        seconds = time.time() - t0
        stats = {"step": step, "epoch": epoch, "loss": loss_sum.item() / denom, "lr": lr,
                 "tokens_per_s": round(tokens / seconds), "seconds": round(seconds, 3)}
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=stats["tokens_per_s"], refresh=False)  # update() draws
        bar.update()
        if log:
            log_json(log, stats)
        if step % args.save_every == 0:
            save(step)
    bar.close()
    if log:
        log.close()
    save(step)
    if step < total:
        print0(f"stopped at step {step} of {total} (--stop-after): {ckpt_path} holds it; to continue, run the same "
               f"command with --resume (and a later --stop-after, or none)")
    if rank == 0:
        config = {"script": "train_llama.py", **gift_config(args), "model": str(args.model)}
        write_safetensors(out / "adapter.safetensors", adapter_state_dict(model), {"config": json.dumps(config)})
    return step


def merge(args):
    """--model + --adapter -> a Meta checkpoint in the new folder --merge whose weights are W (I + phi psi) (GIFT)
    or W + (alpha/r) B A (LoRA), under the base model's keys; written into a temporary sibling folder that is
    renamed once complete."""
    check_new_output(args.merge, "--merge", {"the --model folder": args.model})
    model = gift_model(args)  # in the stored dtype; the merge of each layer is computed in float32
    atomic_write(args.merge, lambda tmp: save_meta(merge_adapter(model), tmp))
    print(f"merged checkpoint written to {args.merge}")


# -----------------------------------------------------------------------------
# Evaluation: greedy generation on the 8 test sets, the paper's exact match

def read_test_set(data, task, template="paper"):
    """(records, answer words) of DATA/dataset/<task>/test.json, each record with the fields the template's
    target needs (the held-out loss is on it). The answer words (a regex, for --extract first_match) of the
    paper's eight tasks are LLM-Adapters'; another task's follow from its gold answers, which must all be of
    one form of ANSWER_FORMS."""
    path = Path(data) / "dataset" / task / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--tasks names folders of DATA/dataset)")
    records = read_records(path, ["instruction", "answer"] + (["output"] if template == "alpaca" else []))
    if task in TASKS:
        return records, ANSWER_WORDS.get(task, "answer1|answer2|answer3|answer4|answer5")
    answers = sorted({r["answer"].strip() for r in records})
    for words in ANSWER_FORMS.values():
        if all(re.fullmatch(words, a) for a in answers):
            return records, words
    odd = [a for a in answers if not any(re.fullmatch(w, a) for w in ANSWER_FORMS.values())] or answers
    raise ValueError(f"{path}: gold answers {', '.join(map(repr, odd[:3]))} are not of one supported form; the "
                     f"evaluation reads {', '.join(ANSWER_FORMS)} (one form per task)")


def extract(text, how, words):
    if how == "paper":  # LoReFT: what follows the first "the correct answer is ", stripped
        i = text.find(TRIGGER)
        return text[i + len(TRIGGER):].strip() if i >= 0 else ""
    found = re.findall(words, text)
    return found[0] if found else ""  # LLM-Adapters: the first answer word anywhere in the generation


def paper_model(a: ModelArgs):
    """Which of the paper's three models this is (they differ in vocabulary and norm_eps), or None."""
    if (a.dim, a.n_layers) != (4096, 32):
        return None
    if a.vocab_size == 128256:
        return "Llama-3 8B"
    if a.vocab_size == 32000:
        return "LLaMA-1 7B" if a.norm_eps == 1e-6 else "Llama-2 7B"
    return None


@torch.no_grad()
def evaluate(args, model, tok, rank, world):
    """Accuracy (%) per task; each rank generates for every world-th example. Also the held-out loss: the mean
    cross-entropy per target token, as in training. Writes eval.json, eval.md and eval_generations.jsonl to
    --out on rank 0."""
    model.eval()
    acc, rows, stats = {}, [], {"n": {}, "loss": {}}
    # Under FSDP every forward gathers the blocks' weights from all ranks, so the ranks must run the same
    # batches in lockstep: each generates every example (no speed-up), rank 0 writes.
    part, parts = (0, 1) if args.fsdp else (rank, world)
    for task in args.tasks:
        records, words = read_test_set(args.data, task, args.template)
        records = records[:args.eval_limit or None]
        mine = list(range(part, len(records), parts))
        prompts = {i: tok.encode(prompt_of(records[i], args.template), tok.add_bos, eos=False) for i in mine}
        order = sorted(mine, key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
        correct, gens = 0, []
        for k in progress(range(0, len(order), args.eval_batch_size), desc=task, disable=rank != 0):
            idx = order[k:k + args.eval_batch_size]
            for i, ids in zip(idx, generate(model, [prompts[i] for i in idx], args.max_new_tokens, tok.stop_ids)):
                text = tok.decode(ids)
                pred = extract(text, args.extract, words)
                correct += pred == records[i]["answer"].strip()
                gens.append({"task": task, "index": i, "generation": text, "prediction": pred,
                             "answer": records[i]["answer"]})
        loss = n_tokens = 0.0
        for k in range(0, len(order), args.eval_batch_size):
            x, y = collate([example_ids(tok, records[i], args.template, args.max_len)
                            for i in order[k:k + args.eval_batch_size]], model.tok_embeddings.weight.device)
            loss += model(x, y).item()
            n_tokens += (y != -100).sum().item()
        counts = torch.tensor([correct, len(mine), loss, n_tokens], dtype=torch.float64)
        if parts > 1:
            dist.all_reduce(counts)
            everyone = [None] * world
            dist.all_gather_object(everyone, gens)
            gens = [g for part in everyone for g in part]
        acc[task] = 100 * counts[0].item() / max(1, counts[1].item())
        stats["n"][task], stats["loss"][task] = int(counts[1]), counts[2].item() / max(1, counts[3].item())
        rows += sorted(gens, key=lambda g: g["index"])
        print0(f"{task}: {acc[task]:.1f}% of {int(counts[1])}, held-out loss {stats['loss'][task]:.4f}")
    acc["avg"] = sum(acc.values()) / len(acc)
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        write_results(args, acc, paper_model(model.args), rows, stats, trainable)
    return acc


def wilson_interval(accuracy, n, z=1.96):
    """The 95% Wilson score interval (%) of an accuracy (%) measured on n examples: unlike p +- 1.96 se, it
    stays within 0..100 and is not empty at 0% or 100%."""
    if n == 0:
        return [0.0, 100.0]
    p, q = accuracy / 100, z * z / n
    mid, half = (p + q / 2) / (1 + q), z * math.sqrt(p * (1 - p) / n + q / (4 * n)) / (1 + q)
    return [round(max(0.0, 100 * (mid - half)), 1), round(min(100.0, 100 * (mid + half)), 1)]  # no -0.0 at 0%


def write_results(args, acc, paper, rows, stats, trainable):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = gift_config(args)
    method = {"gift": "GIFT", "lora": "LoRA"}[config["method"]]
    ref = dict(zip(TASKS + ["avg"], (PAPER if method == "GIFT" else PAPER_LORA)[paper])) if paper else {}
    setting = "GIFT_QV r=64" if method == "GIFT" else "LoRA r=32"
    stats["interval95"] = {task: wilson_interval(acc[task], n) for task, n in stats["n"].items()}
    head = (f"| task | {method} r={config['rank']}, {trainable:,} params: accuracy % | 95% interval | n | "
            f"held-out loss |" + (f" paper ({paper}, {setting}) |" if paper else ""))
    lines = [head, "|---|---|---|---|---|" + ("---|" if paper else "")]
    for task, a in acc.items():
        lo, hi = stats["interval95"].get(task, ("", ""))
        extra = f" {lo}-{hi} | {stats['n'][task]} | {stats['loss'][task]:.4f} |" if task in stats["n"] else " | | |"
        lines.append(f"| {task} | {a:.1f} |{extra}" + (f" {ref[task]:.1f} |" if paper else ""))
    table = "\n".join(lines)
    print(table)
    (out / "eval.md").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps({"accuracy": acc, **stats, "paper": ref or None, "adapter": config,
                                               "trainable_params": trainable,
                                               "protocol": {"template": args.template, "extract": args.extract,
                                                            "max_new_tokens": args.max_new_tokens}}, indent=2))
    with open(out / "eval_generations.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# -----------------------------------------------------------------------------
# The demo: a small model, tokenizer and data set written to a temporary folder, then the real pipeline

DEMO_KINDS = {"animal": ["cat", "dog", "fish", "bird", "horse"], "color": ["red", "blue", "green", "pink", "gray"],
              "food": ["bread", "milk", "rice", "apple", "soup"], "place": ["park", "city", "beach", "farm", "lake"]}
DEMO_ANSWERS = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"], "winogrande": ["option1", "option2"],
                "hellaswag": ["ending1", "ending2", "ending3", "ending4"]}  # the others: answer1..answer3


def demo_records(task, n, g, phrase=TRIGGER):
    """Synthetic commonsense-style records in the LLM-Adapters layout: what kind of thing does a word name?"""
    answers = DEMO_ANSWERS.get(task, ["answer1", "answer2", "answer3"])
    kinds, out = list(DEMO_KINDS)[:len(answers)], []
    for _ in range(n):
        k, i = int(torch.randint(len(answers), (1,), generator=g)), int(torch.randint(5, (1,), generator=g))
        word = DEMO_KINDS[kinds[k]][i]
        if len(answers) == 2:  # answers[0] means "an animal"
            question = f"Is a {word} an animal?" + ("" if task == "boolq" else f" {answers[0]}: yes {answers[1]}: no")
        else:
            question = f"What is a {word}? " + " ".join(f"{a}: {kind}" for a, kind in zip(answers, kinds))
        out.append({"instruction": f"{question}\nAnswer format: {'/'.join(answers)}", "input": "",
                    "output": phrase + answers[k], "answer": answers[k]})
    return out


def write_demo(root: Path, pretrain_steps=200):
    """Writes root/data (train and 8 test sets), root/model (tokenizer.model, params.json,
    consolidated.00.pth). The model is "pretrained" (all weights) on the same facts phrased "so the pick is
    <answer>": it knows the answers but not the paper's answer format, which GIFT then teaches it."""
    g = torch.Generator().manual_seed(0)
    data, model_dir = root / "data", root / "model"
    train = [r for task in TASKS for r in demo_records(task, 60, g)]
    for task in TASKS:
        (data / "dataset" / task).mkdir(parents=True)
        (data / "dataset" / task / "test.json").write_text(json.dumps(demo_records(task, 16, g)))
    (data / "commonsense_170k.json").write_text(json.dumps(train))
    model_dir.mkdir()
    tok = load_tokenizer(train_tiny_tokenizer([prompt_of(r, "paper") + r["output"] for r in train], 320,
                                              model_dir / "tokenizer.model"))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=32, rope_theta=500000.0, max_seq_len=256))
    pre = [r for task in TASKS for r in demo_records(task, 100, g, phrase="so the pick is ")]
    pre = [(torch.tensor(tok.encode(prompt_of(r, "paper") + r["output"], bos=True, eos=True)),
            len(tok.encode(prompt_of(r, "paper"), bos=True, eos=False))) for r in pre]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in progress(range(pretrain_steps), desc="pretraining the demo model"):
        x, y = collate([pre[i] for i in torch.randint(len(pre), (32,), generator=g)], "cpu")
        loss = model(x, y) / (y != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_meta(model, model_dir)
    return model_dir, data


def demo(args):
    """The pipeline's own functions on a small synthetic setup, written to --out (or a new temporary folder) and
    kept: the base model evaluated (GIFT at step 0 is the base model), trained, evaluated again, its adapter
    merged into a Meta checkpoint."""
    t0 = time.time()
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds synchronisation (3-8x slower on a busy CPU)
    if args.out:
        check_new_output(args.out, "--out")
    root = Path(args.out or tempfile.mkdtemp(prefix="gift_llama_demo_"))
    print("demo: writing a small LLaMA (Meta format), a 320-token BPE tokenizer and a SYNTHETIC "
          f"commonsense-style data set (LLM-Adapters layout) to {root}")
    model_dir, data = write_demo(root)
    out = root / "run"
    args = parse_args(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "16",
                       "--rank", "16", "--lr", "2e-2", "--eval-batch-size", "128"])
    variant = lambda **kw: argparse.Namespace(**{**vars(args), **kw})  # noqa: E731
    model, tok, device = gift_model(args), find_tokenizer(args.model), torch.device("cpu")
    print(f"{args.method}: {parameter_summary(model)}")
    base = evaluate(variant(out=str(out / "base")), model, tok, 0, 1)
    base_fm = evaluate(variant(out=str(out / "base_first_match"), extract="first_match"), model, tok, 0, 1)
    train(args, model, tok, 0, 1, device)
    tuned = evaluate(args, model, tok, 0, 1)
    merge(variant(adapter=str(out / "adapter.safetensors"), merge=str(out / "merged")))
    merged = load_llama(out / "merged")
    print(f"merged Meta checkpoint: {sorted(os.listdir(out / 'merged'))}, {len(merged.state_dict())} tensors")
    print(f"\nSYNTHETIC data, average accuracy over the 8 test sets:\n"
          f"  base model, the paper's exact match:     {base['avg']:5.1f}%  (it answers 'so the pick is ...')\n"
          f"  base model, LLM-Adapters' first match:   {base_fm['avg']:5.1f}%  (it knows the answers)\n"
          f"  GIFT (wq, wv, rank 16), exact match:     {tuned['avg']:5.1f}%  (the format, learned by 2 Thetas)\n"
          f"demo finished in {time.time() - t0:.0f} s; these numbers say nothing about LLaMA. "
          f"Everything is in {root}:\n"
          f"  {model_dir}, {data}: the synthetic checkpoint, tokenizer and data set\n"
          f"  {out}: log.jsonl, checkpoint.pt (resume), adapter.safetensors, eval.md / eval.json / "
          f"eval_generations.jsonl, base/ and base_first_match/ (the base model's), merged/ (Meta checkpoint)")


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GIFT fine-tuning of LLaMA 1/2/3 on Commonsense170k and its 8-task "
                                "evaluation (examples: the top of train_llama.py)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", action="store_true", help="run the whole pipeline on a small synthetic setup "
                   "(under a minute on a CPU)")
    p.add_argument("--model", help="Meta or HF checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model, or a folder holding one; None: the one in "
                   "--model (or --model/original)")
    p.add_argument("--data", help="folder with commonsense_170k.json and dataset/<task>/test.json")
    p.add_argument("--out", help="checkpoint.pt, log.jsonl, adapter.safetensors, eval.*; None: runs/llama (demo: a "
                   "new temporary folder)")
    p.add_argument("--method", default="gift", choices=["gift", "lora"], help="the adapter trained")
    p.add_argument("--preset", default="qv", choices=PRESETS, help="GIFT's variant: qv: GIFT_QV, proj: GIFT_Proj, "
                   "qkvud: GIFT_QKVUD")
    p.add_argument("--targets", nargs="+", help="adapted layers by module name suffix; None: the preset's (GIFT), "
                   "wq wk wv w3 w2 (LoRA)")
    p.add_argument("--rank", type=int, help="rank; None: the preset's (GIFT), 32 (LoRA)")
    p.add_argument("--share", default="type", choices=["type", "all"], help="GIFT: one Theta per target, or one "
                   "for all")
    p.add_argument("--lora-alpha", type=float, help="LoRA: the update is (alpha/r) B A; None: 2 x rank")
    p.add_argument("--theta-dtype", default="fp32", choices=["fp32", "bf16"], help="the adapter's weights (Theta, "
                   "or LoRA's A and B) and their AdamW state: fp32 master weights (ours), or bf16 as the official "
                   "runs, which kept Theta in bf16 beside the bf16 model without autocast")
    p.add_argument("--epochs", type=int, default=6, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="global: micro x accumulation x processes")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward on each process")
    p.add_argument("--lr", type=float, default=2.5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (HF Trainer's default); 0: off")
    p.add_argument("--max-len", type=int, default=512, help="training sequences are cut to this many tokens")
    p.add_argument("--seed", type=int, default=42, help="Theta's initialisation and the batch order")
    p.add_argument("--template", default="paper", choices=["paper", "alpaca"], help="prompt and target format")
    p.add_argument("--extract", default="paper", choices=["paper", "first_match"],
                   help="how the answer is read from a generation")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float64"],
                   help="model weights (Theta stays float32); auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen model over the "
                   "processes (FSDP2) instead of a whole copy on each (DDP), for a model larger than one GPU")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--stop-after", type=int, help="stop at this step, the schedule unchanged (--resume continues); "
                   "None: at the end")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--adapter", help="adapter.safetensors for --eval-only, --generate, --merge")
    p.add_argument("--eval-only", action="store_true", help="evaluate without training")
    p.add_argument("--no-eval", action="store_true", help="train without evaluating afterwards")
    p.add_argument("--tasks", nargs="+", default=TASKS, help="test sets to evaluate: folders of DATA/dataset, the "
                   "paper's eight or your own (answers answerK, optionK, solutionK, endingK or true/false)")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N examples of each task; None: all")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length")
    p.add_argument("--generate", metavar="TEXT", help="print the greedy continuation of TEXT")
    p.add_argument("--merge", metavar="OUT", help="write --model + --adapter merged as a Meta checkpoint to the new "
                   "folder OUT")
    args = p.parse_args(argv)
    # a user mistake: one line, exit status 2 (main's @cli), before anything is loaded
    if args.demo:
        return args
    args.out = args.out or "runs/llama"
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
    check_ranges(args, {"epochs": 1, "batch_size": 1, "micro_batch_size": 1, "rank": 1, "max_len": 2, "save_every": 1,
                        "stop_after": 1, "eval_limit": 1, "eval_batch_size": 1, "max_new_tokens": 0, "warmup": 0,
                        "clip": 0})
    return args


def check_inputs(args):
    """The files the command line names, checked before anything is loaded: each mistake is one line."""
    model = Path(args.model)
    if not ((model / "params.json").is_file() or (model / "config.json").is_file()):
        raise UserError(f"--model {model}: no params.json (Meta) or config.json (HF) in it; give a checkpoint folder")
    if args.adapter:
        read_adapter_config(args.adapter)
    if args.merge or args.generate:
        return
    if not args.eval_only and not (Path(args.data) / "commonsense_170k.json").is_file():
        raise UserError(f"--data {args.data}: no commonsense_170k.json in it (the LLM-Adapters layout: "
                        f"DATA/commonsense_170k.json and DATA/dataset/<task>/test.json)")
    for task in [] if args.no_eval else args.tasks:
        path = Path(args.data) / "dataset" / task / "test.json"
        if not path.is_file():
            found = sorted(p.parent.name for p in (Path(args.data) / "dataset").glob("*/test.json"))
            raise UserError(f"--tasks {task}: there is no {path} (the tasks in {args.data}: "
                            f"{', '.join(found) or 'none'})")
        try:  # a malformed record or an answer form the evaluation cannot read: before hours of training
            records, _ = read_test_set(args.data, task, args.template)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not records:  # 0% of nothing would pull the average down
            raise UserError(f"{path}: no records; leave {task} out of --tasks")


def train_data(args, tok, rank):
    """tokenize_train of --data's training file, cached in --out."""
    return tokenize_train(tok, Path(args.data) / "commonsense_170k.json", args.template, args.max_len,
                          Path(args.out) / "cache", rank)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        return demo(args)
    rank, world, _, device = setup_distributed()
    check_inputs(args)
    if args.merge:  # on the CPU
        if rank == 0:
            merge(args)
        return None
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32, "float64": torch.float64}[args.dtype]
    tok = find_tokenizer(args.model, args.tokenizer)
    if rank == 0 and not args.generate:  # training and evaluation write to --out
        lock_out(args.out)
    if not (args.generate or args.eval_only):  # a used --out, a changed setting, a malformed record: before loading
        ckpt_path = Path(args.out) / "checkpoint.pt"
        if not resume_checkpoint(ckpt_path, args.resume, run_settings(args, dtype, tok), CHECKPOINT_KEYS) \
                and args.resume:
            print0(f"--resume: no {ckpt_path} yet, starting a new run")
        train_data(args, tok, rank)
    model = gift_model(args, dtype)
    # an HF folder may pad its embedding past its tokenizer.json (Qwen2: 151936 rows, 151665 ids); Meta's never do
    check_vocab(tok, model.args.vocab_size, args.model, allow_padding=tok.path.endswith(".json"))
    if args.fsdp:  # fully_shard moves only this rank's shard to the GPU
        fsdp_shard(model, device)
    else:
        model.to(device)
    print0(f"{args.model}: {model.args}\nadapter {gift_config(args)}: {parameter_summary(model)}")
    result = None
    if args.generate:  # under --fsdp every rank generates: each forward gathers weights from all
        ids = generate(model.eval(), [tok.encode(args.generate, tok.add_bos, eos=False)], args.max_new_tokens,
                       tok.stop_ids)
        print0(args.generate + tok.decode(ids[0]))
    else:
        if not args.eval_only:
            train(args, model, tok, rank, world, device)
        if not args.no_eval:
            result = evaluate(args, model, tok, rank, world)
    if dist.is_initialized():
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts)
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
