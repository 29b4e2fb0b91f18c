"""Commonsense170k (the LLM-Adapters layout) for train_llama.py: the prompts and targets (the paper's, from
LoReFT, or Alpaca's), tokenization with a cache, length-grouped batches, the test sets and how an answer is read
from a generation, the paper's numbers, and the demo's synthetic data and model.

DATA/commonsense_170k.json (train) and DATA/dataset/<task>/test.json: JSON lists of records with "instruction",
"answer" (and "input", "output" for the alpaca template).
"""
import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from fileio import UserError, atomic_save, read_json
from harness import progress
from llama import ModelArgs, Transformer, save_meta
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
    ids[n_prompt:]. Prompt and target are tokenized together (as LoReFT does): the boundary is as in the text."""
    prompt = prompt_of(record, template)
    ids = tok.encode(prompt + target_of(record, template), tok.add_bos, eos=False)[:max_len - 1] + [tok.eos_id]
    return ids, len(tok.encode(prompt, tok.add_bos, eos=False))


def tokenize_train(tok, path, template, max_len, cache_dir, rank):
    """[(ids, n_prompt)] of every training example (example_ids) of the file path, cached in cache_dir by the
    file's and the tokenizer's identity; under torchrun rank 0 writes the cache, the others wait for it."""
    path = Path(path)
    stats = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (path, tok.path)]
    key = json.dumps([stats, template, max_len, tok.add_bos, tok.eos_id])
    cache = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
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
