"""GIFT on RoBERTa / BERT for GLUE: HF checkpoints in, the paper's sequence-classification table out.

The paper's third benchmark: GIFT_QV (one Theta for every `query`, one for every `value`, rank 32: 98,304
trainable numbers on RoBERTa-Base, 131,072 on Large) plus a new classification / regression head, trained on
six GLUE tasks (SST-2, MRPC, CoLA, QNLI, RTE, STS-B) with AdamW, a linear schedule with 6% warmup, batch 64
and max length 512 (Base) / batch 128 and max length 128 (Large), and scored on each task's dev set after
every epoch, the best epoch reported (Matthews correlation for CoLA, Pearson for STS-B, accuracy otherwise).
This file holds the whole pipeline: a ~100-line encoder with HF's module names, a strict loader for HF
folders, the GLUE TSV readers, DDP training with exact resume, adapters, merging, a demo and the table.

    python train_glue.py --demo                        # generated data + a random RoBERTa in HF format (<1 min, CPU)
    python train_glue.py --model roberta-base --task rte --data glue_data/RTE --out runs/rte
    torchrun --nproc_per_node=4 train_glue.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_glue.py ...same flags... --resume                  # continue from runs/rte/checkpoint.pt, exactly
    python train_glue.py --method lora --model roberta-base ...      # the LoRA baseline (r=8, alpha 16, q and v)
    python train_glue.py --adapter runs/rte/adapter.safetensors --data glue_data/RTE --eval-only  # score an adapter
    python train_glue.py --adapter runs/rte/best.safetensors --merge runs/rte-merged  # a new HF folder, plain weights
    python train_glue.py --model runs/rte-merged --data glue_data/RTE --eval-only     # score a merged folder
    python train_glue.py --table runs/*                             # the six-task table beside the paper's

--model: an HF folder of RobertaForMaskedLM / RobertaModel / BertModel / BertForPreTraining weights (config.json,
model.safetensors or pytorch_model.bin, tokenizer.json), e.g. FacebookAI/roberta-base or roberta-large as
downloaded. --data: a task folder of the standard GLUE download (train.tsv, dev.tsv). The paper's learning
rate and weight decay were chosen per task from a grid (lr 1e-4 ... 1e-3, wd 0 ... 0.01, the head with the
same values) and the runs repeated with seeds 42-46; see --help for the defaults used here.

An --adapter names its base model (--model overrides it). A mistake (a bad flag or file, a used --out, a changed
setting or input on --resume, an --adapter of another script) is one line `error: ...` and exit status 2,
before any model is loaded; a non-finite loss stops the run, naming the step and keeping the last checkpoint.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gift import parameter_summary
from tokenizer import load_tokenizer
from fileio import UserError, atomic_save, atomic_write, fingerprint, read_json, read_safetensors, utf8_text, \
    write_safetensors
from harness import adapter_config, add_adapter, check_finite, check_new_output, check_ranges, check_vocab, cli, \
    lock_out, log_json, merge_adapter, print0, progress, resume_checkpoint, setup_distributed, trim_log

# -----------------------------------------------------------------------------
# The model: BERT / RoBERTa with HF's module names, so that HF state dicts load key for key


@dataclass
class EncoderConfig:  # the fields of HF's config.json that the forward uses
    model_type: str = "roberta"           # "roberta" or "bert": position ids, special tokens, head
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514    # RoBERTa: 512 tokens + its padding_idx offset of 2
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    pad_token_id: int = 1
    hidden_dropout_prob: float = 0.1      # dropout stays on in the frozen backbone while training, as in HF
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    initializer_range: float = 0.02       # std of the new head's weights
    num_labels: int = 2                   # 1: regression (STS-B)


GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # HF name -> F.gelu's approximate


def max_tokens(c: EncoderConfig):
    """RoBERTa's positions start after padding_idx (514 embeddings hold 512 tokens), BERT's at 0."""
    return c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "roberta" else 0)


class Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids, types, mask):  # (B, T) each -> (B, T, D)
        if ids.shape[1] > max_tokens(self.c):
            raise ValueError(f"{ids.shape[1]} tokens: this model takes at most {max_tokens(self.c)}")
        if self.c.model_type == "roberta":  # fairseq's positions: real tokens count from padding_idx + 1
            pos = torch.cumsum(mask, 1) * mask + self.c.pad_token_id  # padding keeps position padding_idx
        else:
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return F.dropout(self.LayerNorm(x), self.c.hidden_dropout_prob, self.training)


class SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads, self.p = c.num_attention_heads, c.attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, x, mask):  # (B, T, D), mask (B, 1, 1, T) True = attend -> (B, T, D)
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731 (B, H, T, hd)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, D)


class AddNorm(nn.Module):
    """HF's *Output blocks (post-norm): LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in, c: EncoderConfig):
        super().__init__()
        self.p = c.hidden_dropout_prob
        self.dense, self.LayerNorm = nn.Linear(d_in, c.hidden_size), nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + F.dropout(self.dense(x), self.p, self.training))


class Layer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.act = GELU[c.hidden_act]
        self.attention = nn.ModuleDict({"self": SelfAttention(c), "output": AddNorm(c.hidden_size, c)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.intermediate_size)})
        self.output = AddNorm(c.intermediate_size, c)

    def forward(self, x, mask):
        h = self.attention["output"](self.attention["self"](x, mask), x)
        return self.output(F.gelu(self.intermediate["dense"](h), approximate=self.act), h)


class Backbone(nn.Module):  # HF's RobertaModel / BertModel
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))})
        if c.model_type == "bert":  # BERT classifies tanh(W h_CLS + b); RoBERTa's head has its own dense layer
            self.pooler = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.hidden_size)})


class SequenceClassifier(nn.Module):
    """HF's RobertaForSequenceClassification / BertForSequenceClassification: same keys, same logits."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = self.config = config
        if c.model_type not in ("roberta", "bert") or c.hidden_act not in GELU or c.hidden_size % c.num_attention_heads:
            raise ValueError(f"unsupported encoder config {c}")
        self.add_module(c.model_type, Backbone(c))  # keys roberta.* or bert.*, as HF's
        self.p = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        if c.model_type == "roberta":
            self.classifier = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.hidden_size),
                                             "out_proj": nn.Linear(c.hidden_size, c.num_labels)})
        else:
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        for m in self.classifier.modules():  # a new head, initialised as HF does
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=c.initializer_range)
                nn.init.zeros_(m.bias)

    @property
    def backbone(self) -> Backbone:
        return getattr(self, self.config.model_type)

    def forward(self, ids, types, mask):  # (B, T) token ids, token types, 1 = real token -> (B, num_labels)
        body, p = self.backbone, self.p
        x = body.embeddings(ids, types, mask)
        attend = mask[:, None, None, :].bool()  # (B, 1, 1, T): every query sees the real tokens only
        for layer in body.encoder["layer"]:
            x = layer(x, attend)
        x = x[:, 0]  # the first token, <s> / [CLS]
        if self.config.model_type == "roberta":
            x = F.dropout(torch.tanh(self.classifier["dense"](F.dropout(x, p, self.training))), p, self.training)
            return self.classifier["out_proj"](x).float()
        return self.classifier(F.dropout(torch.tanh(body.pooler["dense"](x)), p, self.training)).float()


# -----------------------------------------------------------------------------
# HF folders: config.json, model.safetensors (or pytorch_model.bin), tokenizer.json

# Pretrained heads of other tasks that a base checkpoint carries and a sequence classifier does not use.
OTHER_HEADS = {"roberta": ("lm_head.", "roberta.pooler."), "bert": ("cls.",)}


def read_config(folder) -> EncoderConfig:
    path = Path(folder) / "config.json"
    hf = read_json(path)  # a missing field is an error naming the file and the field
    if not isinstance(hf, dict):
        raise UserError(f"{path}: not an HF config (a JSON object is expected)")
    kind = hf.get("model_type")
    if kind not in ("roberta", "bert"):
        raise UserError(f"{path}: model_type {kind!r}; this script runs 'roberta' and 'bert' encoders")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise UserError(f"{path}: only absolute position embeddings and encoders (is_decoder false) are supported")
    if hf.get("hidden_act", "gelu") not in GELU:
        raise UserError(f"{path}: hidden_act {hf['hidden_act']!r} is not one of {sorted(GELU)}")
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "layer_norm_eps"):
        if not isinstance(hf[k], (int, float)) or isinstance(hf[k], bool) or hf[k] <= 0:
            raise UserError(f"{path}: field {k!r} is {hf[k]!r}, a positive number is expected")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise UserError(f"{path}: hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads "
                        f"{hf['num_attention_heads']}")
    known = {f.name for f in fields(EncoderConfig)} - {"num_labels"}
    c = EncoderConfig(**{k: v for k, v in hf.items() if k in known and v is not None})
    c.pad_token_id = hf.get("pad_token_id") if hf.get("pad_token_id") is not None else (1 if kind == "roberta" else 0)
    c.num_labels = len(hf["id2label"]) if "id2label" in hf else 2  # a classifier's own head; else replaced
    return c


def read_weights(folder) -> dict:
    """{key: tensor} with HF's current names: BERT's old LayerNorm gamma / beta renamed, the model-type prefix
    added to a bare RobertaModel / BertModel file, and the position_ids / token_type_ids buffers dropped."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        w = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        try:
            w = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # a broken zip, pickle or storage each raise their own error
            raise UserError(f"{folder / 'pytorch_model.bin'}: cannot read it ({type(e).__name__}); truncated?") \
                from None
    else:
        raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded files: not supported)")
    kind = read_config(folder).model_type
    out = {}
    for key, t in w.items():
        if key.endswith((".position_ids", ".token_type_ids")):
            continue
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = f"{kind}.{key}"
        if "LayerNorm." in key or "layer_norm." in key:
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[key] = t
    return out


def load_model(folder, num_labels=None) -> SequenceClassifier:
    """A SequenceClassifier with the weights of an HF folder. num_labels: a new head of that many outputs
    (other heads in the file are reported and left out); None: the file's own classifier (a merged model).
    Every backbone weight must be there with its shape; any other unused tensor is an error."""
    config = read_config(folder)
    if num_labels is not None:
        config.num_labels = num_labels
    model = SequenceClassifier(config)
    w, path = read_weights(folder), Path(folder)
    ignorable = OTHER_HEADS[config.model_type] + (("classifier.",) if num_labels is not None else ())
    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            if key.startswith("classifier.") and num_labels is not None:
                continue
            if key not in w:
                raise UserError(f"{path}: weight {key!r} is missing" + (" (a base model has no classifier: score "
                                "it with --adapter)" if key.startswith("classifier.") else ""))
            t = w.pop(key)
            if t.shape != param.shape:
                raise UserError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {tuple(param.shape)} "
                                f"from config.json")
            param.copy_(t)
    unknown = sorted(k for k in w if not k.startswith(ignorable))
    if unknown:
        raise UserError(f"{path}: tensors this {config.model_type} model has no place for: {unknown[:8]}")
    ignored = sorted({prefix for k in w for prefix in ignorable if k.startswith(prefix)})
    print0(f"loaded {path}: {config.num_hidden_layers} layers, hidden {config.hidden_size}"
           f"{f'; new head for {num_labels} outputs' if num_labels else ''}; not used: {', '.join(ignored) or 'none'}")
    return model


def load_text_tokenizer(folder, config: EncoderConfig):
    """(tokenizer, cls id, sep id) from folder/tokenizer.json. The ids of <s> </s> (RoBERTa) or [CLS] [SEP]
    (BERT) come from the file's added_tokens; the tokenizer must fit the embedding."""
    path = Path(folder) / "tokenizer.json"
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the tokenizer {path}: {e}") from None
    # an HF model may pad its embedding past its tokenizer: fewer ids than rows are fine, more are not
    check_vocab(tok, config.vocab_size, folder, allow_padding=True)
    names = ("<s>", "</s>") if config.model_type == "roberta" else ("[CLS]", "[SEP]")
    added = {t["content"]: t["id"] for t in read_json(path).get("added_tokens", [])}
    if not all(n in added for n in names):
        raise UserError(f"{path}: no added tokens {names} (is it a {config.model_type} tokenizer?)")
    return tok, added[names[0]], added[names[1]]


# -----------------------------------------------------------------------------
# GLUE: the standard TSV layout (one folder per task with train.tsv and dev.tsv)


@dataclass(frozen=True)
class Task:
    folder: str             # the GLUE download's folder name
    text: tuple             # column names of sentence A and B (B None: single sentence)
    label: str              # column name of the label
    labels: tuple | None    # label strings in id order; None: a regression score
    metric: str             # "mcc", "pearson" or "accuracy"
    epochs: int             # default epochs: LoRA's RoBERTa-base runs (microsoft/LoRA examples/NLU)
    columns: tuple = ()     # for a file without a header row (CoLA): the column names


TASKS = {"sst2": Task("SST-2", ("sentence", None), "label", ("0", "1"), "accuracy", 60),
         "mrpc": Task("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", 30),
         "cola": Task("CoLA", ("sentence", None), "label", ("0", "1"), "mcc", 80,
                      ("source", "label", "original_label", "sentence")),
         "qnli": Task("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy", 25),
         "rte": Task("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy", 80),
         "stsb": Task("STS-B", ("sentence1", "sentence2"), "score", None, "pearson", 40)}

# The paper's GLUE averages (v3) over the six tasks above on the dev sets; the authors' scripts keep each run's best
# epoch and repeat the final runs with seeds 42-46.
PAPER = {("RoBERTa-Base", "gift"): 85.1, ("RoBERTa-Base", "lora"): 86.6,
         ("RoBERTa-Large", "gift"): 87.5, ("RoBERTa-Large", "lora"): 87.8}


def task_file(data, split):
    return Path(data) / f"{split}.tsv"


def read_tsv(path, task: Task):
    """[(sentence A, sentence B or None, label id or score)]. Fields are split on tabs with no quoting, as the
    GLUE files are written (a quote is an ordinary character); every row must have the header's field count."""
    with utf8_text(path):
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")  # utf-8-sig: MRPC starts with a BOM
    lines = [line.rstrip("\r") for line in lines]
    if lines and lines[-1] == "":
        lines.pop()
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


def truncate_pair(a, b, budget):
    """HF's 'longest_first' truncation as the tokenizers library computes it: the shorter sequence keeps
    its length if it fits in half the budget and the longer one gets the rest, else they split it evenly
    (the second one gets the odd token)."""
    if len(a) + len(b) <= budget:
        return a, b
    swap = len(a) > len(b)
    n1, n2 = sorted((len(a), len(b)))
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    if swap:
        n1, n2 = n2, n1
    return a[:n1], b[:n2]


def encode_example(tok, cls, sep, kind, a, b, max_len):
    """(ids, token types): RoBERTa <s> A </s></s> B </s> (types all 0), BERT [CLS] A [SEP] B [SEP] (B's types 1)."""
    ta = tok.encode(a, bos=False, eos=False)
    tb = tok.encode(b, bos=False, eos=False) if b is not None else []
    ta, tb = truncate_pair(ta, tb, max_len - (2 if b is None else 4 if kind == "roberta" else 3))  # specials
    ids = [cls] + ta + [sep]
    if b is not None:
        ids += ([sep] if kind == "roberta" else []) + tb + [sep]
    types = [0] * (len(ta) + 2) + [int(kind == "bert")] * (len(ids) - len(ta) - 2)
    return ids, types


def tokenize(rows, tok, cls, sep, kind, max_len, desc):
    return [(*encode_example(tok, cls, sep, kind, a, b, max_len), y) for a, b, y in progress(rows, desc=desc)]


def collate(examples, pad, device):
    """[(ids, types, label)] -> ids, types, mask (B, T) right-padded to the longest, labels (B,)."""
    T = max(len(ids) for ids, _, _ in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (x, t, _) in enumerate(examples):
        ids[i, :len(x)], types[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    labels = torch.tensor([y for _, _, y in examples])
    return ids.to(device), types.to(device), mask.to(device), labels.to(device)


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


# -----------------------------------------------------------------------------
# Methods and adapters

def add_method(model, run):
    """GIFT or LoRA on run's targets (the backbone frozen), the head trainable. Returns the model."""
    add_adapter(model, run)
    model.classifier.requires_grad_(True)
    return model


def adapter_state(model) -> dict:
    """What training changed: Theta (gift.*) or the LoRA factors, and the head. For GIFT this equals
    gift.gift_state_dict(model, ["classifier"]), so gift.load_gift_state_dict reads it too."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_adapter(model, state, where):
    """Strict: exactly the trainable tensors of this model, each with its shape; errors name where and the key."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise UserError(f"{where} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(f"{where}: {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        own[k].copy_(v)


def paper_defaults(c: EncoderConfig):
    """(batch size, max length): the paper's 64 and 512 for Base, 128 and 128 for Large (hidden size >= 1024),
    the length capped at what the model takes."""
    large = c.hidden_size >= 1024
    return (128 if large else 64), min(128 if large else 512, max_tokens(c))


def paper_size(c: EncoderConfig):
    """Which of the paper's two backbones this is, or None."""
    if c.model_type == "roberta" and c.vocab_size == 50265:
        return {(768, 12): "RoBERTa-Base", (1024, 24): "RoBERTa-Large"}.get((c.hidden_size, c.num_hidden_layers))
    return None


# -----------------------------------------------------------------------------
# Training and evaluation

# What fixes a run's trajectory besides its inputs: --resume refuses a checkpoint written with other values
CHECKPOINT_KEYS = ("adapter", "optimizer", "step", "history", "loss_sum")  # and "run": run_settings
RUN_FIELDS = ("task", "method", "targets", "rank", "share", "lora_alpha", "epochs", "batch_size", "lr", "head_lr",
              "weight_decay", "head_weight_decay", "warmup", "max_len", "seed", "precision")


def run_settings(args):
    """RUN_FIELDS, and the model folder and the task's train.tsv and dev.tsv by content (a moved or copied input is
    the same input): what a resumed run must share with the checkpoint's."""
    return {**{f: getattr(args, f) for f in RUN_FIELDS}, "model": fingerprint(args.model),
            "train": fingerprint(task_file(args.data, "train")), "dev": fingerprint(task_file(args.data, "dev"))}


def lr_factor(step, warmup, total):
    """HF's linear schedule, step for step: 0 at the first update, the peak after warmup, 0 at total."""
    return step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def loss_fn(logits, labels):
    if logits.shape[1] == 1:  # regression (STS-B): mean squared error on the score, as HF
        return F.mse_loss(logits[:, 0], labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


@torch.no_grad()
def evaluate(model, examples, metric, pad, batch_size, device, autocast):
    """The metric (%) over all examples; each process scores every world-th one, in length order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    mine = sorted(range(rank, len(examples), world), key=lambda i: len(examples[i][0]))
    out = []
    for k in range(0, len(mine), batch_size):
        idx = mine[k:k + batch_size]
        ids, types, mask, _ = collate([examples[i] for i in idx], pad, device)
        with autocast():
            logits = model(ids, types, mask)
        preds = logits[:, 0] if logits.shape[1] == 1 else logits.argmax(1)
        out += zip(idx, preds.tolist())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = [p for part in parts for p in part]
    out.sort()
    return score(metric, [p for _, p in out], [examples[i][2] for i, _ in out])


def train(args, model, train_set, dev_set, rank, world, device, ckpt, run):
    """Trains the adapter and head in place, from ckpt (a checkpoint, or None); writes OUT/log.jsonl (one line per
    epoch), checkpoint.pt (every epoch and --save-every steps, with run: run_settings), best.safetensors (the best
    dev epoch's adapter) and adapter.safetensors."""
    task, out = TASKS[args.task], Path(args.out)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)  # the last, partial batch is kept (as the paper)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup * total)  # as the authors' script: int(warmup_ratio * steps)
    head = {id(p) for p in model.classifier.parameters()}
    groups = [(p, (args.head_lr, args.head_weight_decay) if id(p) in head else (args.lr, args.weight_decay))
              for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only (biases are never decayed), head and adapter each with its own lr and wd
    opt = torch.optim.AdamW([{"params": [p], "lr": lr, "base_lr": lr, "weight_decay": wd if p.ndim >= 2 else 0.0}
                             for p, (lr, wd) in groups])
    ckpt_path = out / "checkpoint.pt"
    step, history, loss_sum = 0, [], [0.0, 0]
    if ckpt:
        load_adapter(model, ckpt["adapter"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        step, history, loss_sum = ckpt["step"], ckpt["history"], ckpt["loss_sum"]
        print0(f"resumed from {ckpt_path} at step {step} of {total}")
    saved = step  # the step of the checkpoint on disk (0: none yet)
    if rank == 0:  # keep the log lines of the epochs the checkpoint holds (all of them, or none on a new run)
        trim_log(out / "log.jsonl", "epoch", len(history))

    def save():
        nonlocal saved
        if rank == 0:
            atomic_save({"adapter": adapter_state(model), "optimizer": opt.state_dict(), "step": step,
                         "history": history, "loss_sum": loss_sum, "run": run}, ckpt_path)
        saved = step

    # DDP over the trainable tensors only: the frozen backbone is never synchronised. `model` stays the module.
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p, _ in groups]
    for epoch in range(step // steps_per_epoch, args.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        bar = progress(total=steps_per_epoch, initial=step % steps_per_epoch, disable=rank != 0, leave=False,
                       desc=f"epoch {epoch + 1}/{args.epochs}")
        t0 = time.time()
        for k in range(step % steps_per_epoch, steps_per_epoch):
            batch = order[k * args.batch_size:(k + 1) * args.batch_size]
            # reseeded per (step, rank): dropout draws the same masks whether or not the run was resumed
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
            model.train()
            factor = lr_factor(step, warmup, total)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            mine = batch[rank::world]  # a process left without examples (a last batch < world) runs one, weight 0
            ids, types, mask, labels = collate([train_set[i] for i in mine or batch[:1]], args.pad, device)
            with autocast(args, device):
                loss = loss_fn(ddp(ids, types, mask), labels) * bool(mine)
            (loss * world / len(batch)).backward()  # the mean over the global batch (DDP averages over processes)
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # no clipping: the norm, of DDP's averaged grads
            total_loss = loss.detach().float()
            if world > 1:
                dist.all_reduce(total_loss)  # every process stops at the same step
            check_finite(f"step {step + 1}", f"{ckpt_path} (step {saved}) is kept" if saved else "nothing was saved",
                         loss=total_loss, gradient_norm=norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum = [loss_sum[0] + total_loss.item(), loss_sum[1] + len(batch)]
            bar.update()
            if args.save_every and step % args.save_every == 0 and k < steps_per_epoch - 1:
                save()  # mid-epoch; the epoch's last step is saved below, with its evaluation
        bar.close()
        value = evaluate(model, dev_set, task.metric, args.pad, args.eval_batch_size, device,
                         lambda: autocast(args, device))
        history.append({"epoch": epoch + 1, "step": step, "train_loss": round(loss_sum[0] / loss_sum[1], 6),
                        f"dev_{task.metric}": round(value, 4), "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.time() - t0, 1)})
        loss_sum = [0.0, 0]
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                log_json(f, history[-1])
            print(json.dumps(history[-1]), flush=True)  # the epoch's bar has closed: a line of its own
            if value > max((h[f"dev_{task.metric}"] for h in history[:-1]), default=-math.inf):
                # the paper reports the best epoch (the first of equals, as the authors' saver)
                write_adapter(out / "best.safetensors", model, args)
        save()
    if rank == 0:
        write_adapter(out / "adapter.safetensors", model, args)
        write_results(args, model, history)
    return history


def write_adapter(path, model, args):
    """The adapter and head, with the run config in the metadata: the base model and the task it was trained on."""
    run = {"script": "train_glue.py", **{f: getattr(args, f) for f in RUN_FIELDS}, "model": str(args.model),
           "data": str(args.data), "encoder": asdict(model.config)}
    write_safetensors(path, adapter_state(model), {"config": json.dumps(run)})


def write_results(args, model, history):
    task, out = TASKS[args.task], Path(args.out)
    key = f"dev_{task.metric}"
    best = max(history, key=lambda h: h[key])
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if p.requires_grad and not n.startswith("classifier."))
    result = {"task": args.task, "method": args.method, "model": str(args.model), "backbone": paper_size(model.config),
              "metric": task.metric, "best": best[key], "best_epoch": best["epoch"], "epochs": len(history),
              "trainable_without_head": trainable, "seed": args.seed}
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    paper = PAPER.get((result["backbone"], args.method))
    print(f"{args.task} ({task.metric}, dev): best {best[key]:.2f} at epoch {best['epoch']} of {len(history)}; "
          f"{args.method}, {trainable:,} trainable parameters without the head"
          + (f"; the paper's {args.method} average over six tasks on {result['backbone']}: {paper}" if paper else ""))


def table(dirs):
    """The six-task table of the runs in dirs (their results.json), one row per (backbone, method), with
    the paper's averages beside it. A row's average needs all six tasks."""
    rows = {}
    for d in dirs:
        path = Path(d) / "results.json"
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
    text = "\n".join(lines)
    print(text)
    return text


# -----------------------------------------------------------------------------
# Merging and scoring an adapter

def read_adapter_config(path) -> dict:
    """The run config write_adapter put into an adapter's metadata; another script's adapter is refused."""
    return adapter_config(path, "train_glue.py", ["model", "task", "encoder", "method", "targets", "rank", "max_len"])


def read_adapter(path):
    """(run config, tensors) of an adapter.safetensors written by train_glue.py."""
    return read_adapter_config(path), read_safetensors(path)


def model_with_adapter(path, model_dir=None):
    run, state = read_adapter(path)
    model = load_model(model_dir or run["model"], num_labels=run["encoder"]["num_labels"])
    add_method(model, run)
    load_adapter(model, state, path)
    return run, model


def merge(args):
    """--adapter + its base (--model, else the one named in the adapter) -> the new folder --merge: config.json
    (with the task's labels), model.safetensors (HF names, W (I + phi psi) or W + scale B A written in, the head),
    tokenizer.json, written into a temporary sibling renamed once complete. transformers loads it as
    RobertaForSequenceClassification / BertForSequenceClassification, and --model takes it."""
    run = read_adapter_config(args.adapter)  # small: read first, to check OUT against the inputs before loading
    base = Path(args.model or run["model"])
    check_new_output(args.merge, "--merge", {"the --model folder": base, "the adapter": args.adapter})
    _, model = model_with_adapter(args.adapter, args.model)
    hf = read_json(base / "config.json")
    task = TASKS[run["task"]]
    names = task.labels or ("score",)
    hf.update(architectures=[f"{'Roberta' if hf['model_type'] == 'roberta' else 'Bert'}ForSequenceClassification"],
              id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
              problem_type="regression" if task.labels is None else "single_label_classification",
              finetuning_task=run["task"])

    def write(tmp):
        tmp = Path(tmp)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        shutil.copyfile(base / "tokenizer.json", tmp / "tokenizer.json")
        write_safetensors(tmp / "model.safetensors", merge_adapter(model).state_dict(), {"format": "pt"})
    atomic_write(args.merge, write)
    print(f"merged model (HF folder, {run['method']} written into the weights): {args.merge}")
    return Path(args.merge)


# -----------------------------------------------------------------------------
# Demo: a random RoBERTa in HF's format and a generated SST-2-style task, then the real pipeline

DEMO_WORDS = {1: ["good", "great", "fine", "lovely", "superb", "happy"],
              0: ["bad", "awful", "poor", "dull", "sad", "ugly"]}
DEMO_FILLER = ["the", "film", "was", "a", "story", "and", "plot", "acting", "quite", "very", "music", "ending"]


def write_demo_tokenizer(path, words):
    """A byte-level BPE tokenizer.json in RoBERTa's form: <s> <pad> </s> <unk>, the 256 byte symbols
    (GPT-2's byte-to-unicode map), and merges that build each word and its space-prefixed form left to right."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) if b in printable else chr(256 + sum(x not in printable for x in range(b)))
                 for b in range(256)}
    vocab = {s: i for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + [byte_char[b] for b in range(256)])}
    merges = []
    for word in words:
        for w in (word, " " + word):
            symbols = [byte_char[b] for b in w.encode()]
            for i in range(1, len(symbols)):
                left, right = "".join(symbols[:i]), symbols[i]
                if left + right not in vocab:
                    vocab[left + right] = len(vocab)
                    merges.append(f"{left} {right}")
    special = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"])]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                               "trim_offsets": True, "add_prefix_space": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                      "merges": merges}}
    Path(path).write_text(json.dumps(spec, ensure_ascii=False))
    return len(vocab)


def make_demo(root):
    """Writes root/model (config.json, model.safetensors with a random RoBERTa and the MLM head a Hub file has,
    tokenizer.json) and root/data/SST-2 (train.tsv, dev.tsv: is the review positive?). Returns both folders."""
    g = torch.Generator().manual_seed(0)
    pick = lambda seq: seq[int(torch.randint(len(seq), (), generator=g))]  # noqa: E731
    data = root / "data" / "SST-2"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 640), ("dev", 160)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(torch.randint(2, (), generator=g))
            words = [pick(DEMO_FILLER) for _ in range(int(torch.randint(4, 9, (), generator=g)))]
            words.insert(int(torch.randint(len(words) + 1, (), generator=g)), pick(DEMO_WORDS[label]))
            lines.append(" ".join(words) + f" .\t{label}")
        (data / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = write_demo_tokenizer(model_dir / "tokenizer.json", DEMO_FILLER + DEMO_WORDS[0] + DEMO_WORDS[1])
    config = EncoderConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=66)
    hf = {**asdict(config), "architectures": ["RobertaForMaskedLM"], "bos_token_id": 0, "eos_token_id": 2}
    del hf["num_labels"]
    (model_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    torch.manual_seed(0)
    model = SequenceClassifier(config)
    with torch.no_grad():  # unit-variance signals (not HF's N(0, 0.02) init): the <s> token then sees the words
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1 if "embeddings" in name else p.shape[1] ** -0.5)
            elif not name.endswith("LayerNorm.weight"):
                p.zero_()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    D = config.hidden_size  # the pretraining head of a Hub RoBERTa file, which a classifier leaves unused
    weights.update({"lm_head.dense.weight": torch.randn(D, D) * 0.02, "lm_head.dense.bias": torch.zeros(D),
                    "lm_head.layer_norm.weight": torch.ones(D), "lm_head.layer_norm.bias": torch.zeros(D),
                    "lm_head.bias": torch.zeros(vocab)})
    write_safetensors(model_dir / "model.safetensors", weights, {"format": "pt"})
    return model_dir, data


def demo(args):
    t0 = time.time()
    if args.out:
        check_new_output(args.out, "--out")
    root = Path(args.out or tempfile.mkdtemp(prefix="gift_glue_demo_"))
    print("=" * 100 + "\nDEMO: the checkpoint and the data are SYNTHETIC (a random-weight RoBERTa written in HF's "
          "format,\ngenerated SST-2-style reviews). Scores say nothing about GLUE.\n" + f"Files: {root}\n" + "=" * 100)
    model_dir, data = make_demo(root)
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds synchronisation on a small shared CPU
    for method in ("gift", "lora"):
        args = parse_args(["--model", str(model_dir), "--task", "sst2", "--data", str(data), "--epochs", "12",
                           "--batch-size", "32", "--lr", "3e-3", "--method", method, "--out", str(root / method)])
        check_args(args)
        run(args)
    merged = merge(parse_args(["--adapter", str(root / "gift" / "best.safetensors"), "--merge",
                               str(root / "gift" / "merged")]))
    args = parse_args(["--model", str(merged), "--data", str(data), "--eval-only"])
    check_args(args)
    value = run(args)
    table([root / "gift", root / "lora"])
    print(f"demo done in {time.time() - t0:.0f} s (SYNTHETIC data); the merged best epoch scores {value:.2f} on dev.\n"
          f"Outputs: {root}/gift and {root}/lora: log.jsonl, checkpoint.pt, best.safetensors, adapter.safetensors, "
          f"results.json; {merged}: the merged HF folder")


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GIFT / LoRA fine-tuning of RoBERTa or BERT on GLUE (see the module "
                                "docstring)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", action="store_true", help="random RoBERTa + generated data in a temp dir (or --out), "
                   "then the whole pipeline: under a minute on a CPU")
    p.add_argument("--adapter", metavar="FILE", help="an adapter.safetensors of train_glue.py (its base: --model, "
                   "else the one named in it): with --eval-only, scored; with --merge, merged")
    p.add_argument("--eval-only", action="store_true", help="score --adapter (or --model, a merged folder with its "
                   "own head) on --data's dev.tsv, without training, and exit")
    p.add_argument("--merge", metavar="OUT", help="write --adapter merged into its base to the new folder OUT (an HF "
                   "folder) and exit")
    p.add_argument("--table", nargs="+", metavar="RUN", help="print the six-task table of finished runs and exit")
    p.add_argument("--model", help="HF folder: config.json, model.safetensors (or pytorch_model.bin), tokenizer.json")
    p.add_argument("--task", choices=TASKS, help="GLUE task")
    p.add_argument("--data", help="the task's folder of the GLUE download (train.tsv, dev.tsv)")
    p.add_argument("--method", choices=["gift", "lora"], default="gift", help="GIFT, or the LoRA baseline")
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="layers, by name suffix")
    p.add_argument("--rank", type=int, help="None: 32 for GIFT (the paper's GIFT_QV), 8 for LoRA (the LoRA paper)")
    p.add_argument("--share", choices=["type", "all"], default="type", help="GIFT: one Theta per target, or one "
                   "for all")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA: scale alpha / rank")
    p.add_argument("--epochs", type=int, help="None: the task's, from LoRA's RoBERTa-base runs (SST-2 60, MRPC 30, "
                   "CoLA 80, QNLI 25, RTE 80, STS-B 40)")
    p.add_argument("--batch-size", type=int, help="global batch; None: 64 (Base), 128 (hidden size >= 1024)")
    p.add_argument("--max-len", type=int, help="tokens per example; None: 512 (Base), 128 (hidden size >= 1024)")
    p.add_argument("--lr", type=float, default=5e-4, help="adapter learning rate (the paper's grid: 1e-4, 2.5e-4, "
                   "5e-4, 7.5e-4, 1e-3)")
    p.add_argument("--head-lr", type=float, help="head learning rate; None: --lr (the paper's grid ties them)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="adapter AdamW weight decay (the paper's grid: "
                   "0, 1e-4, 1e-3, 0.01)")
    p.add_argument("--head-weight-decay", type=float, help="head weight decay, matrices only; None: --weight-decay")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup, a fraction of the steps")
    p.add_argument("--eval-batch-size", type=int, default=128, help="examples per forward on dev.tsv")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32: the paper's; bf16: autocast "
                   "on GPUs (adapter and head stay fp32)")
    p.add_argument("--seed", type=int, default=42, help="the paper's runs: 42, 43, 44, 45, 46")
    p.add_argument("--out", help="checkpoint.pt, log.jsonl, adapters, results.json; None: runs/glue-TASK-METHOD "
                   "(demo: a temporary folder)")
    p.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps (0: per epoch only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p.parse_args(argv)


def check_args(args):
    """User errors, found before any model is loaded: one line `error: ...` each, exit status 2 (main's @cli).
    Fills in what the inputs imply: --task of an --eval-only, the default --out."""
    if args.demo or args.table:
        return
    if args.merge and not args.adapter:
        raise UserError("--merge OUT needs --adapter FILE (the adapter.safetensors of a run)")
    if args.adapter and not (args.merge or args.eval_only):
        raise UserError("--adapter FILE goes with --eval-only (score it) or --merge OUT (merge it); a training run "
                        "starts a new adapter")
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    if args.eval_only and not args.data:
        raise UserError("--eval-only needs --data (the task's folder with dev.tsv)")
    if not (args.merge or args.eval_only and (args.adapter or args.model) or args.model and args.task and args.data):
        raise UserError("give --model, --task and --data (or --demo, --adapter FILE with --eval-only or --merge OUT, "
                        "--model MERGED with --eval-only, --table RUN...)")
    check_ranges(args, {"epochs": 1, "batch_size": 1, "rank": 1, "max_len": 5, "eval_batch_size": 1, "save_every": 0,
                        "warmup": 0})
    adapter = read_adapter_config(args.adapter) if args.adapter else None  # its run config names the base model
    folder = Path(args.model or adapter["model"])
    missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors")
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)} (an HF model folder is expected)")
    config = read_config(folder)
    if args.max_len and args.max_len > max_tokens(config):
        raise UserError(f"--max-len {args.max_len}: {folder} takes at most {max_tokens(config)} tokens")
    if args.merge:
        return
    if adapter and args.task not in (None, adapter["task"]):
        raise UserError(f"--task {args.task}: {args.adapter} was trained on {adapter['task']}")
    if args.eval_only:  # the task of the adapter, or of a merged folder (its config.json's finetuning_task)
        args.task = adapter["task"] if adapter else args.task or read_json(folder / "config.json").get(
            "finetuning_task")
        if args.task not in TASKS:
            raise UserError(f"{folder / 'config.json'}: no GLUE task (finetuning_task {args.task!r}), not a merged "
                            f"model: score a base model with --adapter FILE, or give --task")
    for split in ("dev",) if args.eval_only else ("train", "dev"):
        if not task_file(args.data, split).is_file():
            raise UserError(f"--data {args.data}: no {split}.tsv (give a task's folder of the GLUE download, e.g. "
                            f"glue_data/RTE)")
    args.out = args.out or f"runs/glue-{args.task}-{args.method}"


def autocast(args, device):
    """bf16 autocast for --precision bf16 (on GPUs; the adapter and head keep fp32 weights), else a no-op."""
    return torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")


def evaluate_only(args, device):
    """--eval-only: --adapter (with its base: --model, else the one named in it) or a merged folder, on dev.tsv."""
    run = read_adapter_config(args.adapter) if args.adapter else {}
    model_dir, task = args.model or run["model"], TASKS[args.task]
    config = read_config(model_dir)
    tok, cls, sep = load_text_tokenizer(model_dir, config)  # a tokenizer that does not fit: before the weights
    max_len = args.max_len or run.get("max_len") or paper_defaults(config)[1]
    dev = tokenize(read_tsv(task_file(args.data, "dev"), task), tok, cls, sep, config.model_type, max_len, "dev")
    model = model_with_adapter(args.adapter, args.model)[1] if args.adapter else load_model(model_dir)
    model.to(device)
    value = evaluate(model, dev, task.metric, config.pad_token_id, args.eval_batch_size, device,
                     lambda: autocast(args, device))
    print0(f"{args.task} dev {task.metric}: {value:.2f} ({args.adapter or model_dir})")
    return value


def run(args):
    """--table, --merge, --eval-only or training, after check_args. Returns the table, the merged folder, the dev
    score, or the training history."""
    if args.table:
        return table(args.table)
    if args.merge:
        return merge(args)
    rank, world, _, device = setup_distributed()
    if args.eval_only:
        return evaluate_only(args, device)
    task = TASKS[args.task]
    config = read_config(args.model)
    args.rank = args.rank or (32 if args.method == "gift" else 8)
    args.epochs = args.epochs or task.epochs
    args.batch_size = args.batch_size or paper_defaults(config)[0]
    args.max_len = args.max_len or paper_defaults(config)[1]
    args.head_lr = args.lr if args.head_lr is None else args.head_lr
    args.head_weight_decay = args.weight_decay if args.head_weight_decay is None else args.head_weight_decay
    args.pad = config.pad_token_id
    if args.batch_size % world:  # each process takes every world-th example of a global batch
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be divisible by {world} processes")
    if rank == 0:
        lock_out(args.out)
    # a used --out, a changed setting or input: before anything is loaded
    ckpt_path, settings = Path(args.out) / "checkpoint.pt", run_settings(args)
    ckpt = resume_checkpoint(ckpt_path, args.resume, settings, CHECKPOINT_KEYS, device)
    if args.resume and ckpt is None:
        print0(f"--resume: no {ckpt_path} yet, starting a new run")
    tok, cls, sep = load_text_tokenizer(args.model, config)
    sets = {s: tokenize(read_tsv(task_file(args.data, s), task), tok, cls, sep, config.model_type, args.max_len,
                        f"tokenizing {s}") for s in ("train", "dev")}
    torch.manual_seed(args.seed)  # the same new head, phi and LoRA A on every process and in every run
    model = add_method(load_model(args.model, num_labels=1 if task.labels is None else len(task.labels)), vars(args))
    model.to(device)
    print0(f"{args.method} on {args.targets}, rank {args.rank}: {parameter_summary(model)} (with the head)")
    history = train(args, model, sets["train"], sets["dev"], rank, world, device, ckpt, settings)
    if world > 1:
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts)
        dist.destroy_process_group()
    return history


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    return demo(args) if args.demo else run(args)


if __name__ == "__main__":
    main()
