"""BERT / RoBERTa for sequence classification, with HF's module names, and a strict reader for HF folders.

The encoder train_glue.py fine-tunes with GIFT (or LoRA): ~100 lines of model whose state_dict keys are HF's
(roberta.encoder.layer.0.attention.self.query.weight, ...), so an HF checkpoint loads key for key and a merged
model is again an HF folder that transformers loads as RobertaForSequenceClassification.

    x = LayerNorm(word_emb[ids] + pos_emb[pos] + type_emb[types])                 (B, T, D)
    per layer (post-norm):  h = LayerNorm(x + Wo softmax(Q K^T / sqrt(d)) V)      Q, K, V = x Wq^T, x Wk^T, x Wv^T
                            x = LayerNorm(h + W2 gelu(W1 h))                      W1: (I, D), W2: (D, I)
    logits = out_proj tanh(dense x[:, 0])   (RoBERTa)   or   classifier tanh(pooler x[:, 0])   (BERT)

RoBERTa's positions start after its padding index (fairseq's convention: 514 embeddings hold 512 tokens).

    from encoder import load_model, load_text_tokenizer, read_config
    model = load_model("roberta-base", num_labels=2)   # a new head; load_model(merged) keeps the file's own head
    python train_glue.py --demo                          # this model in the whole GLUE pipeline (<1 min, CPU)

--model folders: config.json, model.safetensors (or pytorch_model.bin), tokenizer.json, as the Hub's
FacebookAI/roberta-base, roberta-large or a BERT (RobertaForMaskedLM, RobertaModel, BertModel, BertForPreTraining
files: their pretraining heads are reported and left out).
"""
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import UserError, atomic_write, check_float, read_json, read_safetensors, write_safetensors
from tokenizer import load_tokenizer


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


def paper_size(c: EncoderConfig):
    """Which of the GIFT paper's two backbones this is (RoBERTa-Base or -Large), or None."""
    if c.model_type == "roberta" and c.vocab_size == 50265:
        return {(768, 12): "RoBERTa-Base", (1024, 24): "RoBERTa-Large"}.get((c.hidden_size, c.num_hidden_layers))


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
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))     # x (B,T,D) @ W^T (D,D)
        # softmax(q k^T / sqrt(hd)) v: (B,H,T,hd) @ (B,H,hd,T) -> (B,H,T,T), then @ (B,H,T,hd) -> (B,H,T,hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, D)


class AddNorm(nn.Module):
    """HF's *Output blocks (post-norm): LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in, c: EncoderConfig):
        super().__init__()
        self.p = c.hidden_dropout_prob
        self.dense, self.LayerNorm = nn.Linear(d_in, c.hidden_size), nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):  # x (B, T, d_in) @ W^T (d_in, D) -> (B, T, D)
        return self.LayerNorm(residual + F.dropout(self.dense(x), self.p, self.training))


class Layer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.act = GELU[c.hidden_act]
        self.attention = nn.ModuleDict({"self": SelfAttention(c), "output": AddNorm(c.hidden_size, c)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.intermediate_size)})
        self.output = AddNorm(c.intermediate_size, c)

    def forward(self, x, mask):  # (B, T, D) -> (B, T, D)
        h = self.attention["output"](self.attention["self"](x, mask), x)
        return self.output(F.gelu(self.intermediate["dense"](h), approximate=self.act), h)  # via (B, T, I)


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
        x = x[:, 0]  # (B, D): the first token, <s> / [CLS]
        if self.config.model_type == "roberta":
            x = F.dropout(torch.tanh(self.classifier["dense"](F.dropout(x, p, self.training))), p, self.training)
            return self.classifier["out_proj"](x).float()  # (B, D) @ (D, num_labels)
        return self.classifier(F.dropout(torch.tanh(body.pooler["dense"](x)), p, self.training)).float()


# -----------------------------------------------------------------------------
# HF folders: config.json, model.safetensors (or pytorch_model.bin), tokenizer.json

# Pretrained heads of other tasks that a base checkpoint carries and a sequence classifier does not use.
OTHER_HEADS = {"roberta": ("lm_head.", "roberta.pooler."), "bert": ("cls.",)}


_REQUIRED = object()


def field(cfg: dict, path, name, kind, default=_REQUIRED, ge=None, gt=None, lt=None, choices=None):
    """cfg[name] checked for type and range, else a UserError naming file, field, value and what is expected.
    kind: int (a bool or a float such as 430.0 is not an int), float (an int is fine), str, dict or list; ge / gt /
    lt: bounds; choices: the allowed values. Absent (or null): default, else an error."""
    value = cfg.get(name)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{path}: no field {name!r}" + (" (or null)" if name in cfg else ""))
        return default
    ok = isinstance(value, kind) and not isinstance(value, bool) or kind is float and isinstance(value, int) and \
        not isinstance(value, bool)
    if ok and kind in (int, float):
        ok = not (ge is not None and value < ge or gt is not None and value <= gt or lt is not None and value >= lt)
    if ok and choices is not None:
        ok = value in choices
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", list: "a list"}[kind]
        want += "".join(f" {op} {b}" for op, b in ((">=", ge), (">", gt), ("<", lt)) if b is not None)
        want = f"one of {list(choices)}" if choices is not None else want
        raise UserError(f"{path}: field {name!r} is {value!r} ({type(value).__name__}), expected {want}")
    return value


def read_config(folder, complete=False) -> EncoderConfig:
    """folder/config.json, every field the forward uses checked for type and range; num_labels from its id2label
    (else 2). complete: the folder must also hold tokenizer.json and the weights (checked first), and the sizes
    must be those of the weights (read_weights: the tensors' shapes in the file's header, nothing allocated)."""
    path = Path(folder) / "config.json"
    missing = [f for f in ("config.json", "tokenizer.json") if complete and not (Path(folder) / f).is_file()]
    if complete and not any((Path(folder) / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors")
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)} (an HF model folder is expected)")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise UserError(f"{path}: not an HF config (a JSON object is expected)")
    kind = hf.get("model_type")
    if kind not in ("roberta", "bert"):
        raise UserError(f"{path}: model_type {kind!r}; this script runs 'roberta' and 'bert' encoders")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise UserError(f"{path}: only absolute position embeddings and encoders (is_decoder false) are supported")
    c = EncoderConfig(model_type=kind, hidden_act=field(hf, path, "hidden_act", str, "gelu", choices=sorted(GELU)),
                      **{k: field(hf, path, k, int, ge=1) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size")})
    c.layer_norm_eps = field(hf, path, "layer_norm_eps", float, gt=0)
    c.pad_token_id = field(hf, path, "pad_token_id", int, 1 if kind == "roberta" else 0, ge=0, lt=c.vocab_size)
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        setattr(c, k, field(hf, path, k, float, 0.1, ge=0, lt=1))
    c.classifier_dropout = field(hf, path, "classifier_dropout", float, None, ge=0, lt=1)
    c.initializer_range = field(hf, path, "initializer_range", float, 0.02, gt=0)
    if c.hidden_size % c.num_attention_heads:
        raise UserError(f"{path}: hidden_size {c.hidden_size} is not a multiple of num_attention_heads "
                        f"{c.num_attention_heads}")
    if max_tokens(c) < 5:  # <s> A </s></s> B </s>: RoBERTa's positions start after pad_token_id
        raise UserError(f"{path}: max_position_embeddings {c.max_position_embeddings} leaves {max_tokens(c)} "
                        f"positions for tokens (pad_token_id {c.pad_token_id}); at least 5 are needed")
    labels = field(hf, path, "id2label", dict, {})  # a classifier's own head; else replaced
    c.num_labels = len(labels) or 2
    field(hf, path, "label2id", dict, {}), field(hf, path, "finetuning_task", str, None)
    if complete:
        read_weights(folder, c)
    return c


def read_weights(folder, config: EncoderConfig = None) -> dict:
    """{key: tensor} with HF's current names: BERT's old LayerNorm gamma / beta renamed, the model-type prefix
    added to a bare RobertaModel / BertModel file, and the position_ids / token_type_ids buffers dropped. Every
    tensor must be floating point (an I32 header over float bytes would be read as integers). config: its sizes
    must be those of the file's embeddings and layers (checked on the mapped file, before any model is built)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        path = folder / "model.safetensors"
        w = read_safetensors(path)  # mapped: the tensors' pages are read only when used
    elif (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        try:
            try:
                w = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a file of the legacy (pre-zip) format cannot be mapped
                w = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a broken zip, pickle or storage each raise their own error
            raise UserError(f"{path}: cannot read it ({type(e).__name__}); truncated?") from None
        if not isinstance(w, dict) or not all(isinstance(t, torch.Tensor) for t in w.values()):
            raise UserError(f"{path}: not a state dict of tensors")
    else:
        raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded files: not supported)")
    kind = (config or read_config(folder)).model_type
    out = {}
    for key, t in w.items():
        if key.endswith((".position_ids", ".token_type_ids")):
            continue
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = f"{kind}.{key}"
        if "LayerNorm." in key or "layer_norm." in key:
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[key] = t
    check_float(path, out)
    if config:
        check_sizes(path, config, out)
    return out


def check_sizes(path, c: EncoderConfig, w: dict):
    """config.json's sizes against the tensors (their shapes only): the embeddings, the first layer's MLP and the
    number of layers. A config asking for 10^12 embedding rows or 10^6 layers fails here, before allocating."""
    k, D = c.model_type, c.hidden_size
    want = {f"{k}.embeddings.word_embeddings.weight": ("vocab_size", c.vocab_size),
            f"{k}.embeddings.position_embeddings.weight": ("max_position_embeddings", c.max_position_embeddings),
            f"{k}.embeddings.token_type_embeddings.weight": ("type_vocab_size", c.type_vocab_size),
            f"{k}.encoder.layer.0.intermediate.dense.weight": ("intermediate_size", c.intermediate_size)}
    for key, (name, rows) in want.items():
        if key not in w:
            raise UserError(f"{path}: weight {key!r} is missing")
        if tuple(w[key].shape) != (rows, D):
            raise UserError(f"{path}: {key!r} has shape {tuple(w[key].shape)}; config.json's {name} {rows} and "
                            f"hidden_size {D} need {(rows, D)}")
    prefix = f"{k}.encoder.layer."
    found = {int(n[len(prefix):].split(".")[0]) for n in w if n.startswith(prefix) and n[len(prefix)].isdigit()}
    if found != set(range(c.num_hidden_layers)):
        raise UserError(f"{path}: holds layers {_span(found)}; config.json's num_hidden_layers {c.num_hidden_layers} "
                        f"needs 0..{c.num_hidden_layers - 1}")


def _span(ids):
    ids = sorted(ids)
    return "none" if not ids else f"{ids[0]}..{ids[-1]}" + ("" if len(ids) == ids[-1] - ids[0] + 1 else " (gaps)")


def load_model(folder, num_labels=None, log=print) -> SequenceClassifier:
    """A SequenceClassifier with the weights of an HF folder. num_labels: a new head of that many outputs
    (other heads in the file are reported and left out); None: the file's own classifier (a merged model).
    Every backbone weight must be there with its shape; any other unused tensor is an error. log: where the
    one-line summary goes (a script under torchrun passes its rank-0 print)."""
    config = read_config(folder)
    w, path = read_weights(folder, config), Path(folder)  # sizes checked against the file before building
    if num_labels is not None:
        config.num_labels = num_labels
    model = SequenceClassifier(config)
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
    log(f"loaded {path}: {config.num_hidden_layers} layers, hidden {config.hidden_size}"
        f"{f'; new head for {num_labels} outputs' if num_labels else ''}; not used: {', '.join(ignored) or 'none'}")
    return model


def load_text_tokenizer(folder, config: EncoderConfig):
    """(tokenizer, cls id, sep id) from folder/tokenizer.json. The ids of <s> </s> (RoBERTa) or [CLS] [SEP]
    (BERT) come from the file's added_tokens; the tokenizer must fit the embedding (an HF model may pad its
    embedding past its tokenizer: fewer ids than rows are fine, more are not)."""
    path = Path(folder) / "tokenizer.json"
    try:
        tok = load_tokenizer(path)
    except UserError:  # tokenizer.py's own one line names the file and the field
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the tokenizer {path}: {e}") from None
    bad = [f"{n} {i}" for n in ("bos_id", "eos_id", "pad_id") if (i := getattr(tok, n, None)) is not None
           and not 0 <= i < config.vocab_size]
    if bad or tok.n_words > config.vocab_size:
        raise UserError(f"the tokenizer {tok.path} ({tok.n_words} ids{'; ' + ', '.join(bad) if bad else ''}) does "
                        f"not fit the model {folder} ({config.vocab_size} embedding rows): give the model's own "
                        f"tokenizer")
    names = ("<s>", "</s>") if config.model_type == "roberta" else ("[CLS]", "[SEP]")
    spec = read_json(path)
    tokens = field(spec, path, "added_tokens", list, []) if isinstance(spec, dict) else []
    added = {t["content"]: t["id"] for t in tokens if isinstance(t, dict) and t.get("content") in names}
    for name, i in added.items():  # the ids the script puts in every example: inside the embedding
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size):
            raise UserError(f"{path}: added token {name!r} has id {i!r}, expected an integer in [0, "
                            f"{config.vocab_size}) (the model's embedding rows)")
    if not all(n in added for n in names):
        raise UserError(f"{path}: no added tokens {names} (is it a {config.model_type} tokenizer?)")
    return tok, added[names[0]], added[names[1]]


# -----------------------------------------------------------------------------
# Inputs: sentence pairs in the model's layout, batches


def truncate_pair(a, b, budget):
    """HF's 'longest_first' truncation as tokenizers 0.23.3 computes it: the shorter sequence keeps its length if
    it fits in half the budget and the longer one gets the rest, else they split it evenly (the second one gets
    the odd token)."""
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


def collate(examples, pad, device):
    """[(ids, types, label)] -> ids, types, mask (B, T) right-padded to the longest, labels (B,)."""
    T = max(len(ids) for ids, _, _ in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (x, t, _) in enumerate(examples):
        ids[i, :len(x)], types[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    labels = torch.tensor([y for _, _, y in examples])
    return ids.to(device), types.to(device), mask.to(device), labels.to(device)


def loss_fn(logits, labels):
    """As HF's *ForSequenceClassification, summed: mean squared error for one output (regression, STS-B), else
    cross-entropy."""
    if logits.shape[1] == 1:
        return F.mse_loss(logits[:, 0], labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def check_targets(config: EncoderConfig, targets):
    """Each target (a name suffix, as add_gift / add_lora take it) must name Linear layers of the backbone and none
    of the head's; checked on a weightless copy, before anything is loaded. Else one line listing the valid names."""
    with torch.device("meta"):
        model = SequenceClassifier(config)
    body = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]
    head = [n for n, m in model.classifier.named_modules() if isinstance(m, nn.Linear)] + ["classifier"]
    hits = lambda t, names: [n for n in names if n == t or n.endswith("." + t)]  # noqa: E731
    bad = [t for t in targets if not hits(t, body) or hits(t, head)]
    if bad:
        valid = sorted({n.split(".", 3)[-1] for n in body if ".layer." in n} | {"query", "key", "value"})
        raise UserError(f"--targets {' '.join(bad)}: matches no Linear layer of this {config.model_type} backbone "
                        f"(or one of the head's); valid names (suffixes of the layers' names): {', '.join(valid)}")


def save_classifier(folder, state: dict, base, labels, task):
    """An HF folder transformers loads as RobertaForSequenceClassification / BertForSequenceClassification:
    base's config.json with the task's labels (labels None: a regression "score"), state (HF keys) as
    model.safetensors, base's tokenizer.json; written into a temporary sibling renamed once complete."""
    hf, names = read_json(Path(base) / "config.json"), labels or ("score",)
    hf.update(architectures=[f"{'Roberta' if hf['model_type'] == 'roberta' else 'Bert'}ForSequenceClassification"],
              id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
              problem_type="regression" if labels is None else "single_label_classification", finetuning_task=task)

    def write(tmp):
        tmp = Path(tmp)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        shutil.copyfile(Path(base) / "tokenizer.json", tmp / "tokenizer.json")
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt"})
    atomic_write(folder, write)


# -----------------------------------------------------------------------------
# A tiny random RoBERTa in HF's format, for the demo and the tests


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


DEMO_WORDS = {1: ["good", "great", "fine", "lovely", "superb", "happy"],  # the demo's positive, negative and
              0: ["bad", "awful", "poor", "dull", "sad", "ugly"],           # filler words: its tokenizer's words
              None: ["the", "film", "was", "a", "story", "and", "plot", "acting", "quite", "very", "music", "ending"]}


def write_demo_model(folder):
    """folder/config.json, tokenizer.json (DEMO_WORDS) and model.safetensors: a random 2-layer, 64-wide RoBERTa
    with the MLM head a Hub file has. Returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_demo_tokenizer(folder / "tokenizer.json", DEMO_WORDS[None] + DEMO_WORDS[0] + DEMO_WORDS[1])
    config = EncoderConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=66)
    hf = {**asdict(config), "architectures": ["RobertaForMaskedLM"], "bos_token_id": 0, "eos_token_id": 2}
    del hf["num_labels"]
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
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
    write_safetensors(folder / "model.safetensors", weights, {"format": "pt"})
    return folder
