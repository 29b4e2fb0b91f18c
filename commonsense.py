"""Commonsense170k (the LLM-Adapters layout) for train_llama.py: the two protocols (the paper's, from LoReFT, and
LLM-Adapters'), the prompts and targets, tokenization with a cache, the batches (random, or grouped by length),
the test sets and how an answer is read from a generation, the evaluation and its tables (one run, or several
seeds), the paper's numbers with their sources, and the demo's synthetic data and model.

DATA/commonsense_170k.json (train) and DATA/dataset/<task>/test.json: JSON lists of records with "instruction",
"answer" (and "input", "output" for the alpaca template). A folder whose answers are words or phrases ("get
weather") has DATA/answers.json: {"answers": [the allowed answers], "list_in_prompt": true or false}; its answers
are compared after normalise(), and list_in_prompt appends "Answer format: a/b/c" to every instruction.
"""
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fileio import UserError, atomic_save, read_json
from harness import print0, progress
from llama import ModelArgs, Transformer, generate, save_meta
from tokenizer import load_tokenizer, train_tiny_tokenizer

# -----------------------------------------------------------------------------
# The training data

TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
TRIGGER = "the correct answer is "  # the paper's (LoReFT's) target prefix; evaluation reads what follows it
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


# The two protocols (--protocol): the settings each one fixes unless a flag gives its own. "paper": the authors'
# run (their run_commonsense.sh: train.py -e 6, batch 8 x 4 accumulation, warmup ratio 0.1, wd 0, greedy, the
# LoReFT template; lr on the command line, 2.5e-4 in their README's example). "llm-adapters": LLM-Adapters'
# commonsense command (finetune.py: batch 16 of micro-batches 4, 3 epochs, lr 3e-4, cutoff 256, 100 warmup steps,
# Alpaca template, loss on prompt and answer (train_on_inputs), LoRA q,k,v,up,down r=32 alpha 64), with its
# evaluation's first-match answer extraction: the protocol of the paper's LoRA rows.
PROTOCOLS = {"paper": {"method": "gift", "epochs": 6, "batch_size": 32, "micro_batch_size": 8, "lr": 2.5e-4,
                       "warmup": 0.1, "warmup_steps": None, "max_len": 512, "template": "paper", "extract": "paper",
                       "train_on_inputs": False},
             "llm-adapters": {"method": "lora", "epochs": 3, "batch_size": 16, "micro_batch_size": 4, "lr": 3e-4,
                              "warmup": 0.0, "warmup_steps": 100, "max_len": 256, "template": "alpaca",
                              "extract": "first_match", "train_on_inputs": True}}
# GIFT's variants in the paper (--preset): targets and rank; the paper's LoRA (LLM-Adapters'): q, k, v, up, down
PRESETS = {"qv": (["attention.wq", "attention.wv"], 64),  # GIFT_QV, the paper's main setting
           "proj": (["attention.wo"], 128),              # GIFT_Proj
           "qkvud": (["attention.wq", "attention.wk", "attention.wv", "feed_forward.w3", "feed_forward.w2"], 64)}
VARIANTS = {"qv": "GIFT_QV", "proj": "GIFT_Proj", "qkvud": "GIFT_QKVUD"}
LORA = (PRESETS["qkvud"][0], 32)  # r=32, alpha 2r = 64


def read_records(path, required, answers=False):
    """A JSON list of dicts, each with the required string fields (and "input", when present, a string or null);
    answers: each "answer" must be more than blanks (an empty gold answer would match every generation the
    evaluation reads nothing from). Errors name the file, the record's index, the field and what was found."""
    records = read_json(path)
    if not isinstance(records, list):
        got = "a JSON object" if isinstance(records, dict) else type(records).__name__
        raise UserError(f"{path}: expected a JSON list of records, got {got}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is {str(r)[:100]} ({type(r).__name__}), expected a JSON object")
        for field in required:
            if field not in r:
                raise UserError(f"{path}: record {i} has no field {field!r}: {str(r)[:200]}")
            if not isinstance(r[field], str):
                raise UserError(f"{path}: record {i}'s {field} is {r[field]!r} ({type(r[field]).__name__}), "
                                f"expected a string")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise UserError(f"{path}: record {i}'s input is {r['input']!r}, expected a string (or none)")
        if answers and not r["answer"].strip():
            raise UserError(f"{path}: record {i}'s answer is {r['answer']!r}, expected a non-empty answer")
    return records


def read_answers(data):
    """DATA/answers.json checked: None if there is none, else {"answers": [normalised, distinct], "list_in_prompt"}."""
    path = Path(data) / "answers.json"
    if not path.is_file():
        return None
    spec = read_json(path)
    answers = spec.get("answers") if isinstance(spec, dict) else None
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and normalise(a) for a in answers)):
        raise UserError(f"{path}: \"answers\" is {str(answers)[:100]!r}, expected a list of non-empty strings")
    if len({normalise(a) for a in answers}) != len(answers):
        raise UserError(f"{path}: two answers are the same after normalisation (lower case, blanks, trailing "
                        f"punctuation): {answers}")
    if not isinstance(spec.get("list_in_prompt", False), bool):
        raise UserError(f"{path}: \"list_in_prompt\" is {spec['list_in_prompt']!r}, expected true or false")
    return {"answers": answers, "list_in_prompt": spec.get("list_in_prompt", False)}


def with_answer_list(records, answers):
    """The records with "Answer format: a/b/c" after each instruction, when answers.json asks for it."""
    if not (answers and answers["list_in_prompt"]):
        return records
    listed = "\n\nAnswer format: " + "/".join(answers["answers"])
    return [{**r, "instruction": r["instruction"] + listed} for r in records]


def prompt_of(record, template):
    if template == "paper":  # LoReFT's commonsense prompt: the instruction and a newline
        return record["instruction"] + "\n"
    return (ALPACA_INPUT if record.get("input") else ALPACA).format(**record)


def target_of(record, template):
    return TRIGGER + record["answer"] if template == "paper" else record["output"]


def example_ids(tok, record, template, max_len):
    """(ids, n_prompt): BOS (if the tokenizer adds one) + prompt + target + EOS cut to max_len; the loss is on
    ids[n_prompt:]. Prompt and target are tokenized together (as LoReFT does): the boundary is as in the text."""
    prompt = prompt_of(record, template)
    ids = tok.encode(prompt + target_of(record, template), tok.add_bos, eos=False)[:max_len - 1] + [tok.eos_id]
    return ids, len(tok.encode(prompt, tok.add_bos, eos=False))


def tokenize_train(tok, path, template, max_len, cache_dir, rank):
    """[(ids, n_prompt)] of every training example (example_ids) of the file path, cached in cache_dir by the
    file's and the tokenizer's identity; under torchrun rank 0 writes the cache, the others wait for it."""
    path = Path(path)
    answers = read_answers(path.parent)
    stats = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (path, tok.path)]
    key = json.dumps([stats, template, max_len, tok.add_bos, tok.eos_id, answers])
    cache = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if rank == 0 and not cache.exists():
        required = ["instruction", "answer"] if template == "paper" else ["instruction", "output"]
        ids, offsets, n_prompt = [], [0], []
        for r in progress(with_answer_list(read_records(path, required), answers), desc=f"tokenizing {path.name}"):
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


def global_batches(lengths, batch_size, seed, epoch, group_by_length=False):
    """The epoch's global batches of indices, a new order each epoch (seeded by seed + epoch). By default random
    batches, as the authors' run (HF Trainer's RandomSampler over the data; its generator is not ours, so the
    order differs from theirs). group_by_length (HF's option, not the authors'): cut the shuffled indices into
    megabatches of 50 batches, sort each by length, cut into batches, then (unlike HF, which keeps them longest
    to shortest) shuffle the batches, so that an epoch is not a curriculum from long to short questions: less
    padding (padding_fraction), so more examples per second. The last, partial batch is dropped (HF keeps it):
    every step has the same number of examples, different ones each epoch."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [perm[k:k + batch_size] for k in range(0, len(perm) - batch_size + 1, batch_size)]
    batches, mega = [], 50 * batch_size
    for i in range(0, len(perm), mega):
        chunk = sorted(perm[i:i + mega], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def padding_fraction(lengths, batches, micro):
    """The fraction of the tokens computed that are padding, when each micro-batch (micro consecutive examples of
    a batch, as the training loop cuts them) is padded to its longest example: what --group-by-length saves."""
    real = padded = 0
    for batch in batches:
        for k in range(0, len(batch), micro):
            n = [lengths[i] for i in batch[k:k + micro]]
            real, padded = real + sum(n), padded + max(n) * len(n)
    return 1 - real / max(1, padded)


def collate(examples, device):
    """[(ids, n_prompt)] -> inputs (B, T) right-padded with 0, targets (B, T) with -100 off the target."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        ids = torch.as_tensor(ids)
        x[b, :len(ids) - 1], y[b, :len(ids) - 1] = ids[:-1], ids[1:]
        y[b, :n_prompt - 1] = -100  # position t predicts token t + 1: prompt tokens are not targets
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# The test sets: reading an answer, the paper's numbers

ANSWER_WORDS = {"boolq": "true|false", "piqa": "solution1|solution2", "hellaswag": "ending1|ending2|ending3|ending4",
                "winogrande": "option1|option2"}  # the rest: answer1..answer5 (LLM-Adapters' extract_answer)
# Another task's answers must all take one of the eight tasks' forms; its answer words follow from them
ANSWER_FORMS = {"answerK": "answer[1-9][0-9]*", "optionK": "option[1-9][0-9]*", "solutionK": "solution[1-9][0-9]*",
                "endingK": "ending[1-9][0-9]*", "true/false": "true|false"}
# Paper (v3) Table: accuracy % in TASKS order, then the average; GIFT_QV r=64, and LoRA (r=32 on q, k, v, up, down)
PAPER = {"GIFT": {"LLaMA-1 7B": [69.9, 83.2, 80.0, 93.2, 81.7, 85.4, 70.8, 82.5, 80.9],
                  "Llama-2 7B": [72.0, 84.4, 80.9, 94.0, 85.1, 86.9, 74.5, 82.7, 82.6],
                  "Llama-3 8B": [74.7, 89.2, 81.7, 96.0, 88.2, 92.7, 82.7, 88.8, 86.7]},
         "LoRA": {"LLaMA-1 7B": [68.9, 80.7, 77.4, 78.1, 78.8, 77.8, 61.3, 74.8, 74.7],
                  "Llama-2 7B": [69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0, 77.6],
                  "Llama-3 8B": [70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0, 80.8]}}


def read_test_set(data, task, template="paper"):
    """(records, answer words) of DATA/dataset/<task>/test.json, each record with the fields the template's
    target needs (the held-out loss is on it). The answer words (a regex, for --extract first_match) of the
    paper's eight tasks are LLM-Adapters'; another task's follow from its gold answers, which must all be of
    one form of ANSWER_FORMS, or be among DATA/answers.json's (then the words are that list)."""
    path = Path(data) / "dataset" / task / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--tasks names folders of DATA/dataset)")
    records = read_records(path, ["instruction", "answer"] + (["output"] if template == "alpaca" else []), True)
    spec = read_answers(data)
    if spec and task not in TASKS:
        allowed = {normalise(a) for a in spec["answers"]}
        odd = [i for i, r in enumerate(records) if normalise(r["answer"]) not in allowed]
        if odd:
            raise UserError(f"{path}: record {odd[0]}'s answer {records[odd[0]]['answer']!r} is not one of "
                            f"{Path(data) / 'answers.json'}'s answers ({', '.join(spec['answers'][:10])})")
        return with_answer_list(records, spec), tuple(spec["answers"])
    if task in TASKS:  # an answer outside the task's words (True, answer 1) would be scored wrong, silently
        words = ANSWER_WORDS.get(task, "answer1|answer2|answer3|answer4|answer5")
        odd = [i for i, r in enumerate(records) if not re.fullmatch(words, r["answer"].strip())]
        if odd:
            raise UserError(f"{path}: record {odd[0]}'s answer is {records[odd[0]]['answer']!r}, expected one of "
                            f"{task}'s answers ({words.replace('|', ', ')})")
        return records, words
    answers = sorted({r["answer"].strip() for r in records})
    for words in ANSWER_FORMS.values():
        if all(re.fullmatch(words, a) for a in answers):
            return records, words
    odd = [a for a in answers if not any(re.fullmatch(w, a) for w in ANSWER_FORMS.values())] or answers
    raise UserError(f"{path}: gold answers {', '.join(map(repr, odd[:3]))} are not of one supported form; the "
                     f"evaluation reads {', '.join(ANSWER_FORMS)} (one form per task)")


def check_tasks(data, tasks, template):
    """The test sets of --tasks, read and checked before any training: a missing folder, a malformed record, an
    answer form the evaluation cannot read, an empty set (0% of nothing would pull the average down)."""
    for task in tasks:
        path = Path(data) / "dataset" / task / "test.json"
        if not path.is_file():
            found = sorted(p.parent.name for p in (Path(data) / "dataset").glob("*/test.json"))
            raise UserError(f"--tasks {task}: there is no {path} (the tasks in {data}: {', '.join(found) or 'none'})")
        if not read_test_set(data, task, template)[0]:
            raise UserError(f"{path}: no records; leave {task} out of --tasks")


def normalise(text):
    """How answers of an answers.json folder are compared: lower case, every run of blanks one space, no trailing
    .,;:!? ("Get  Weather." is "get weather"). Nothing else is rewritten: "get_weather" is not "get weather"."""
    return " ".join(text.lower().split()).rstrip(".,;:!? ")


def extract(text, how, words):
    """The answer a generation gives. words: the task's answer regex, or (answers.json) its tuple of answers."""
    if isinstance(words, tuple):  # answer words: the first line after the trigger (all of it without one)
        if how == "paper":
            _, found, rest = text.partition(TRIGGER)
            return normalise((rest if found else text).split("\n")[0])
        words = "|".join(re.escape(normalise(a)) for a in sorted(words, key=len, reverse=True))
        found = re.findall(rf"\b(?:{words})\b", normalise(text))
        return found[0] if found else ""
    if how == "paper":  # LoReFT: what follows the first "the correct answer is ", stripped
        i = text.find(TRIGGER)
        return text[i + len(TRIGGER):].strip() if i >= 0 else ""
    found = re.findall(words, text)
    return found[0] if found else ""  # LLM-Adapters: the first answer word anywhere in the generation


def is_correct(prediction, answer, words):
    """An extracted prediction against the gold answer: exact, after normalise() for answers.json tasks."""
    return prediction == (normalise(answer) if isinstance(words, tuple) else answer.strip())


def paper_model(a: ModelArgs):
    """Which of the paper's three models this is (they differ in vocabulary and norm_eps), or None."""
    if (a.dim, a.n_layers) != (4096, 32) or a.vocab_size not in (32000, 128256):
        return None
    return "Llama-3 8B" if a.vocab_size == 128256 else "LLaMA-1 7B" if a.norm_eps == 1e-6 else "Llama-2 7B"


def wilson_interval(accuracy, n, z=1.96):
    """The 95% Wilson score interval (%) of an accuracy (%) measured on n examples: unlike p +- 1.96 se, it
    stays within 0..100 and is not empty at 0% or 100%."""
    if n == 0:
        return [0.0, 100.0]
    p, q = accuracy / 100, z * z / n
    mid, half = (p + q / 2) / (1 + q), z * math.sqrt(p * (1 - p) / n + q / (4 * n)) / (1 + q)
    return [round(max(0.0, 100 * (mid - half)), 1), round(min(100.0, 100 * (mid + half)), 1)]  # no -0.0 at 0%


# -----------------------------------------------------------------------------
# The evaluation: greedy generation on the test sets; the table of one run, and of several seeds

SHORT = {"attention.wq": "q", "attention.wk": "k", "attention.wv": "v", "attention.wo": "o",
         "feed_forward.w1": "gate", "feed_forward.w3": "up", "feed_forward.w2": "down"}
# Where the paper's numbers come from: its GIFT rows are its own runs; its LoRA rows are quoted from the papers
# that trained LoRA under LLM-Adapters' protocol (--protocol llm-adapters), not under the GIFT paper's
PAPER_ROWS = {"GIFT": "GIFT_QV r=64", "LoRA": "LoRA q,k,v,up,down r=32 alpha 64"}
PAPER_SOURCES = {"GIFT": "the GIFT paper's own runs (its protocol, --protocol paper)",
                 "LLaMA-1 7B": "LLM-Adapters (Hu et al., 2023), trained under its own protocol (--protocol "
                               "llm-adapters); quoted by the GIFT paper",
                 "Llama-2 7B": "DoRA (Liu et al., 2024, Table 1), trained under LLM-Adapters' protocol (--protocol "
                               "llm-adapters); quoted by the GIFT paper"}
PAPER_SOURCES["Llama-3 8B"] = PAPER_SOURCES["Llama-2 7B"]


def adapter_label(config) -> str:
    """The row name of an adapter's run config: method, targets (HF's short names), rank, LoRA's alpha, GIFT's
    sharing, and the paper's name when it is one of its variants; the base model (config None): zero-shot."""
    if config is None:
        return "base model (zero-shot)"
    short = [re.sub(r"^(layers\.\d+\.)?(.+)$", lambda m: (m[1] or "") + SHORT.get(m[2], m[2]), t)
             for t in config["targets"]]
    label = f"{'LoRA' if config['method'] == 'lora' else 'GIFT'} {','.join(short)} r={config['rank']}"
    if config["method"] == "lora":
        return label + f" alpha {config['lora_alpha']:g}"
    if config.get("share") == "all":
        return label + ", one Theta for all"
    variant = [VARIANTS[k] for k, v in PRESETS.items() if v == (list(config["targets"]), config["rank"])]
    return label + (f" ({variant[0]})" if variant else "")


@torch.no_grad()
def score_task(args, model, tok, task, limit, part, parts):
    """Greedy generations for the first `limit` examples of a test set (every parts-th from part; under torchrun
    the counts are summed over the ranks): (counts [correct, n, summed target loss, target tokens], generations
    of every rank). The loss is the held-out cross-entropy per target token, as in training."""
    records, words = read_test_set(args.data, task, args.template)
    records = records[:limit or None]
    mine = list(range(part, len(records), parts))
    prompts = {i: tok.encode(prompt_of(records[i], args.template), tok.add_bos, eos=False) for i in mine}
    order = sorted(mine, key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    correct, gens, loss, n_tokens = 0, [], 0.0, 0
    for k in progress(range(0, len(order), args.eval_batch_size), desc=task,
                      disable=dist.is_initialized() and dist.get_rank() != 0):
        idx = order[k:k + args.eval_batch_size]
        for i, ids in zip(idx, generate(model, [prompts[i] for i in idx], args.max_new_tokens, tok.stop_ids)):
            text = tok.decode(ids)
            pred = extract(text, args.extract, words)
            correct += is_correct(pred, records[i]["answer"], words)
            gens.append({"task": task, "index": i, "generation": text, "prediction": pred,
                         "answer": records[i]["answer"]})
        x, y = collate([example_ids(tok, records[i], args.template, args.max_len) for i in idx],
                       model.tok_embeddings.weight.device)
        loss += model(x, y).item()
        n_tokens += (y != -100).sum().item()
    counts = torch.tensor([correct, len(mine), loss, n_tokens], dtype=torch.float64)
    if parts > 1:
        dist.all_reduce(counts)
        everyone = [None] * parts
        dist.all_gather_object(everyone, gens)
        gens = [g for part in everyone for g in part]
    return counts.tolist(), sorted(gens, key=lambda g: g["index"])


def eval_parts(args, rank, world):
    # Under FSDP every forward gathers the blocks' weights from all ranks, so the ranks must run the same
    # batches in lockstep: each generates every example (no speed-up), rank 0 writes.
    return (0, 1) if args.fsdp else (rank, world)


@torch.no_grad()
def validate(args, model, tok, rank, world, step) -> dict:
    """--eval-every's record for log.jsonl: the first of --tasks (the validation split), its first --val-limit
    examples (None: --eval-limit's, or all), accuracy % and held-out loss; the model is left in training mode."""
    t0, was_training = time.time(), model.training
    model.eval()
    (correct, n, loss, n_tokens), _ = score_task(args, model, tok, args.tasks[0], args.val_limit or args.eval_limit,
                                                 *eval_parts(args, rank, world))
    model.train(was_training)
    record = {"step": step, "val_task": args.tasks[0], "val_accuracy": round(100 * correct / max(1, n), 2),
              "val_loss": round(loss / max(1, n_tokens), 5), "val_n": int(n), "val_seconds": round(time.time() - t0, 2)}
    print0(f"step {step}: {args.tasks[0]} {record['val_accuracy']:.1f}% of {int(n)}, loss {record['val_loss']}")
    return record


@torch.no_grad()
def evaluate(args, model, tok, rank, world, config):
    """Accuracy (%) per task; each rank generates for every world-th example. Also the held-out loss: the mean
    cross-entropy per target token, as in training. Writes eval.json, eval.md and eval_generations.jsonl to
    --out on rank 0. config: the adapter's run config, None for the base model (zero-shot)."""
    model.eval()
    acc, rows, stats = {}, [], {"n": {}, "correct": {}, "loss": {}}
    for task in args.tasks:
        (correct, n, loss, n_tokens), gens = score_task(args, model, tok, task, args.eval_limit,
                                                        *eval_parts(args, rank, world))
        acc[task] = 100 * correct / max(1, n)
        stats["n"][task], stats["correct"][task] = int(n), int(correct)
        stats["loss"][task] = loss / max(1, n_tokens)
        rows += gens
        print0(f"{task}: {acc[task]:.1f}% of {int(n)}, held-out loss {stats['loss'][task]:.4f}")
    acc["avg"] = sum(acc.values()) / len(acc)
    if rank == 0:
        write_results(args, acc, None if config is None else paper_model(model.args), rows, stats, config,
                      sum(p.numel() for p in model.parameters() if p.requires_grad) if config else 0)
    return acc


def write_results(args, acc, paper, rows, stats, config, trainable):
    """eval.md (the table, beside the paper's numbers for its own models, their source named), eval.json,
    eval_generations.jsonl."""
    out, method = Path(args.out), config and {"gift": "GIFT", "lora": "LoRA"}[config["method"]]
    out.mkdir(parents=True, exist_ok=True)
    label = adapter_label(config) + (f", {trainable:,} params" if config else "")
    ref = dict(zip(TASKS + ["avg"], PAPER[method][paper])) if paper else {}
    source = paper and PAPER_SOURCES["GIFT" if method == "GIFT" else paper]
    stats["interval95"] = {task: wilson_interval(acc[task], n) for task, n in stats["n"].items()}
    lines = [f"| task | {label}: accuracy | 95% interval | n | held-out loss |" + (
        f" paper: {PAPER_ROWS[method]} on {paper} |" if paper else ""), "|---|---|---|---|---|" + "---|" * bool(paper)]
    for task, a in acc.items():
        lo, hi = stats["interval95"].get(task, ("", ""))
        extra = f" {lo}-{hi}% | {stats['n'][task]} | {stats['loss'][task]:.4f} |" if task in stats["n"] else " | | |"
        lines.append(f"| {task} | {a:.1f}% |{extra}" + (f" {ref[task]:.1f}% |" if paper else ""))
    protocol = {"protocol": getattr(args, "protocol", None), "template": args.template, "extract": args.extract,
                "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    lines += [f"\nProtocol: {', '.join(f'{k} {v}' for k, v in protocol.items())}."] + (
        [f"Paper column: {source}."] if paper else [])
    print("\n".join(lines))
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    (out / "eval.json").write_text(json.dumps({"accuracy": acc, **stats, "paper": ref or None, "paper_source": source,
                                               "adapter": config, "model": label, "trainable_params": trainable,
                                               "protocol": protocol}, indent=2))
    with open(out / "eval_generations.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def seed_table(out, seeds, evals) -> dict:
    """OUT/seeds.md and OUT/seeds.json from each seed's eval.json (evals, in seeds' order): per task the mean
    +- standard deviation (sample, n - 1) of the seeds' accuracies, and the 95% Wilson interval of the pooled
    predictions (all seeds' test examples together: correct / total)."""
    rows, tasks = {}, [t for t in evals[0]["accuracy"] if t != "avg"]
    for task in tasks + ["avg"]:
        accs = [e["accuracy"][task] for e in evals]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        rows[task] = {"mean": mean, "std": std, "per_seed": accs}
        if task != "avg":
            n, correct = sum(e["n"][task] for e in evals), sum(e["correct"][task] for e in evals)
            rows[task] |= {"pooled_n": n, "pooled_interval95": wilson_interval(100 * correct / max(1, n), n)}
    lines = [f"| task | {evals[0]['model']}: mean +- std over {len(seeds)} seeds | pooled 95% interval | "
             + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|---|" + "---|" * len(seeds)]
    for task, r in rows.items():
        lo, hi = r.get("pooled_interval95", ("", ""))
        lines.append(f"| {task} | {r['mean']:.1f}% +- {r['std']:.1f}% | {f'{lo}-{hi}%' if lo != '' else ''} | "
                     + " | ".join(f"{a:.1f}%" for a in r["per_seed"]) + " |")
    print("\n".join(lines))
    Path(out, "seeds.md").write_text("\n".join(lines) + "\n")
    Path(out, "seeds.json").write_text(json.dumps({"seeds": list(seeds), "model": evals[0]["model"],
                                                   "protocol": evals[0]["protocol"], "tasks": rows}, indent=2))
    return rows


# -----------------------------------------------------------------------------
# The demo's synthetic world: records of the eight tasks' forms, a small model that knows the facts

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
