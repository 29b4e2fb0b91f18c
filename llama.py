"""LLaMA 1/2/3 in plain torch, with Meta's module names, and its checkpoint readers: Meta's consolidated.NN.pth
shards and Hub folders of the Llama family (config.json with model_type llama, mistral or qwen2), read key by
key with shape checks; greedy generation with a KV cache; a Meta writer for merged models.

    from llama import load_llama, find_tokenizer, generate
    model, tok = load_llama("Llama-3.2-1B"), find_tokenizer("Llama-3.2-1B")
    print(tok.decode(generate(model.eval(), [tok.encode("Is water wet?", tok.add_bos, eos=False)], 32,
                              tok.stop_ids)[0]))

The model, for tokens (B, T): h = embedding (B, T, dim); each block h += Attention(RMSNorm(h)) with RoPE and
grouped-query heads, then h += SwiGLU(RMSNorm(h)) = w2(silu(w1 h) * w3 h); logits = output(RMSNorm(h)).
Training GIFT or LoRA on it: train_llama.py (python train_llama.py --demo, under a minute on a CPU).
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fileio import UserError, atomic_save, check_float, read_json, read_safetensors
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Checked fields: every number a reader takes from params.json / config.json has its type and range checked

REQUIRED = object()
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def field(cfg: dict, name, kind, where, default=REQUIRED, minimum=None, maximum=None, above=None, choices=None):
    """cfg[name] checked: of kind (int, float, bool, str or dict; a float field takes a whole number too, never
    true/false or a number in quotes), within [minimum, maximum], above `above`, among choices. Absent or null:
    default, or a UserError when required. Every error names the file (where), the field, the value found and
    what was expected: config.json's vocab_size 430.0 or num_hidden_layers "2" is one line, not a traceback."""
    value = cfg.get(name) if isinstance(cfg, dict) else None
    if value is None:
        if default is REQUIRED:
            raise UserError(f"{where}: no field {name!r}")
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool) and math.isfinite(value))
    bounds = [f"at least {minimum}" if minimum is not None else "", f"greater than {above}" if above is not None
              else "", f"at most {maximum}" if maximum is not None else ""]
    expected = " ".join([_KINDS[kind]] + [", ".join(b for b in bounds if b)]).strip()
    if choices is not None:
        expected += f" among {', '.join(map(repr, choices))}"
    if ok and kind is float:
        ok, value = math.isfinite(value), float(value)
    if ok and kind in (int, float):
        ok = ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
              and (above is None or value > above))
    if ok and choices is not None:
        ok = value in choices
    if not ok:
        raise UserError(f"{where}: {name} is {cfg[name]!r} ({type(cfg[name]).__name__}), expected {expected}")
    return value


# -----------------------------------------------------------------------------
# The model (Meta's module names, so that a consolidated.00.pth loads key for key)

LLAMA31_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None      # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = -1               # -1 (Llama 1/2 params.json): the size of the embedding in the file
    multiple_of: int = 256             # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5             # 1e-6 for LLaMA-1: always read it from the checkpoint
    rope_theta: float = 10000.0        # 500000 for Llama 3
    use_scaled_rope: bool = False      # Llama 3.1+: slow down RoPE's low frequencies
    rope_scaling: dict | None = None   # the scaling's constants; None = Llama 3.1's (LLAMA31_ROPE_SCALING)
    max_seq_len: int = 2048            # length of the RoPE tables, so the longest sequence the model takes
    # Hub flags (Meta's models have none of these): one architecture covers HF llama, mistral and qwen2
    head_dim: int | None = None        # None: dim // n_heads
    attention_bias: bool = False       # biases on wq, wk, wv (Qwen2; HF Llama's attention_bias: true)
    wo_bias: bool = False              # a bias on wo too (HF Llama's attention_bias: true; Qwen2 has none)
    tie_embeddings: bool = False       # the output layer is the embedding matrix (SmolLM2, Llama 3.2 1B, ...)
    sliding_window: int | None = None  # Mistral: longer sequences are refused (within it, attention is full)

    @classmethod
    def from_params(cls, params: dict, **overrides):
        """From a Meta params.json: everything may be nested under "model"; unknown keys are ignored."""
        params = params.get("model", params)
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in known}, **overrides})

    @property
    def ffn_dim(self):
        """Meta's FFN width: 2/3 of 4*dim (SwiGLU has three matrices), times a multiplier, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)  # 11008 (7B), 14336 (Llama-3 8B)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32 whatever the weights: the mean of squares overflows/rounds in bf16
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(args: ModelArgs):
    """cos, sin of position * frequency, each (max_seq_len, head_dim / 2), float32."""
    hd = args.head_dim or args.dim // args.n_heads
    freqs = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, device="cpu").float() / hd)  # (hd/2,)
    if args.use_scaled_rope:  # Llama 3.1: keep the short wavelengths, stretch the long ones, blend between
        s = args.rope_scaling or LLAMA31_ROPE_SCALING
        factor, lo, hi, ctx = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                               s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freqs
        smooth = (ctx / wavelen - lo) / (hi - lo)
        blended = torch.where(wavelen > ctx / lo, freqs / factor, (1 - smooth) * freqs / factor + smooth * freqs)
        freqs = torch.where(wavelen < ctx / hi, freqs, blended)
    angles = torch.outer(torch.arange(args.max_seq_len, device="cpu").float(), freqs)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates each adjacent pair (x[2i], x[2i+1]) of every head by position * freq_i (Meta's convention;
    HF rotates (x[i], x[i + hd/2]), which is why HF's q/k rows are permuted). x: (B, T, H, hd)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)         # (B, T, H, hd/2) each
    cos, sin = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)  # (T, 1, hd/2): same for every head
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim, bias = args.head_dim or args.dim // args.n_heads, args.attention_bias
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=args.wo_bias)
        self.cache = None  # (keys, values), each (B, S, n_kv_heads, hd), only while generate() runs

    def forward(self, x, cos, sin, mask, start_pos):
        B, T, _ = x.shape                                                                 # x: (B, T, dim)
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)      # (B, T, H, hd)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)   # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)                         # (B, T, Hkv, hd)
        if self.cache is not None:  # generation: store this step's keys/values, attend to all so far
            self.cache[0][:, start_pos:start_pos + T], self.cache[1][:, start_pos:start_pos + T] = k, v
            k, v = self.cache[0][:, :start_pos + T], self.cache[1][:, :start_pos + T]
        rep = self.n_heads // self.n_kv_heads  # GQA: kv head j serves query heads j*rep .. j*rep+rep-1
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, hd)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * hd) -> (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate (HF gate_proj)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down (HF down_proj)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up (HF up_proj)

    def forward(self, x):  # SwiGLU: (B, T, dim) -> (B, T, ffn_dim) twice, gated -> (B, T, dim)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args)
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, start_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args, self.grad_checkpointing = args, False
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args)  # not persistent: recomputed, never read from a checkpoint
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens, targets=None, start_pos=0, valid=None, last_only=False):
        """tokens (B, T) -> logits (B, T, vocab_size), float32; (B, 1, vocab_size) at the last position only
        with last_only (generation: a prompt's other logits would cost as much as the rest of the model).
        targets (B, T), -100 = ignore: returns the *summed* cross-entropy instead, computing logits only at
        the target positions (the full (B, T, 128256) float32 logits would cost more memory than the model's
        activations). start_pos: position of tokens[:, 0] (generation with the KV cache). valid (B,
        start_pos + T), False on left padding: no token attends to a padding position."""
        B, T = tokens.shape
        if start_pos + T > self.cos.shape[0]:
            raise ValueError(f"sequence of {start_pos + T} tokens > max_seq_len {self.cos.shape[0]}")
        if self.args.sliding_window and start_pos + T > self.args.sliding_window:
            raise ValueError(f"sequence of {start_pos + T} tokens > the model's sliding window of "
                             f"{self.args.sliding_window} (sliding-window attention is not implemented)")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.cos[start_pos:start_pos + T], self.sin[start_pos:start_pos + T]
        mask = None  # plain causal attention (training, and a prompt without padding)
        if valid is not None or start_pos > 0:
            i = torch.arange(start_pos, start_pos + T, device=tokens.device)[:, None]  # query positions
            j = torch.arange(start_pos + T, device=tokens.device)                      # key positions
            mask = j <= i                                                              # (T, S)
            if valid is not None:  # a padding query still sees itself: a row of -inf only would give NaN
                mask = mask & (valid[:, None, None, :] | (j == i))                     # (B, 1, T, S)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:  # keep only each block's input; redo in backward
                h = checkpoint(layer, h, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos)
        h = self.norm(h[:, -1:] if last_only else h)
        if targets is None:
            return self.output(h).float()
        keep = targets != -100
        return F.cross_entropy(self.output(h[keep]).float(), targets[keep], reduction="sum")


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id=None):
    """Greedy decoding of a batch of prompts (lists of token ids), left-padded, with the KV cache.
    eos_id: one id or several (a tokenizer's stop_ids: instruct models end a turn with their own token).
    Returns each prompt's generated ids (without the prompt), cut before the first of them."""
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    B, P, S = len(prompts), max(map(len, prompts)), max(map(len, prompts)) + max_new_tokens
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)  # id 0 on padding: never attended to
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    attn = model.layers[0].attention
    shape, dtype = (B, S, attn.n_kv_heads, attn.head_dim), model.tok_embeddings.weight.dtype
    for layer in model.layers:
        layer.attention.cache = (torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device))
    done, pos, end = torch.zeros(B, dtype=torch.bool, device=device), 0, P
    try:
        for end in range(P, S):  # the first step feeds the whole prompt, then one token per step
            logits = model(tokens[:, pos:end], start_pos=pos, valid=valid[:, :end], last_only=True)  # (B, 1, V)
            tokens[:, end] = logits[:, -1].argmax(-1)
            if stops:
                done |= torch.isin(tokens[:, end], torch.tensor(stops, device=device))
            pos = end
            if done.all():
                break
    finally:
        for layer in model.layers:
            layer.attention.cache = None
    out = []
    for row in tokens[:, P:end + 1].tolist() if max_new_tokens else [[]] * B:
        out.append(row[:min((row.index(i) for i in stops if i in row), default=len(row))])
    return out


# -----------------------------------------------------------------------------
# Checkpoints: Meta's consolidated.NN.pth shards and HF safetensors, read key by key with shape checks

# Meta's model-parallel shards split column-parallel weights on dim 0 and row-parallel ones on dim 1.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}

HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def _rope_constants(rope: dict, where) -> dict:
    """Llama 3.1's RoPE scaling constants (rope_scaling), checked: the blend divides by high - low."""
    s = {"factor": field(rope, "factor", float, where, above=0),
         "low_freq_factor": field(rope, "low_freq_factor", float, where, above=0),
         "high_freq_factor": field(rope, "high_freq_factor", float, where, above=0),
         "original_max_position_embeddings": field(rope, "original_max_position_embeddings", int, where, minimum=1)}
    if s["high_freq_factor"] <= s["low_freq_factor"]:
        raise UserError(f"{where}: rope_scaling's high_freq_factor {s['high_freq_factor']} must exceed its "
                        f"low_freq_factor {s['low_freq_factor']}")
    return s


def _check_heads(args: ModelArgs, where):
    """The head arithmetic the model relies on: kv heads divide the heads, the head width is whole and even."""
    if args.n_heads % (args.n_kv_heads or args.n_heads):
        raise UserError(f"{where}: {args.n_heads} attention heads cannot share {args.n_kv_heads} key/value heads "
                        f"(it must divide them)")
    if args.head_dim is None and args.dim % args.n_heads:
        raise UserError(f"{where}: width {args.dim} is not a multiple of the {args.n_heads} heads")
    if (args.head_dim or args.dim // args.n_heads) % 2:
        raise UserError(f"{where}: head width {args.head_dim or args.dim // args.n_heads} is odd; RoPE rotates pairs")


def meta_args(params, where) -> ModelArgs:
    """ModelArgs of a Meta params.json (everything may be nested under "model"; unknown keys are ignored), each
    field it uses checked for type and range (field); also the Hub flags save_meta writes for a merged model."""
    p = params.get("model", params) if isinstance(params, dict) else params
    if not isinstance(p, dict):
        raise UserError(f"{where}: expected a JSON object of the model's sizes, got {type(p).__name__}")
    d = ModelArgs()
    args = ModelArgs(dim=field(p, "dim", int, where, minimum=1), n_layers=field(p, "n_layers", int, where, minimum=1),
                     n_heads=field(p, "n_heads", int, where, minimum=1),
                     n_kv_heads=field(p, "n_kv_heads", int, where, None, minimum=1),
                     vocab_size=field(p, "vocab_size", int, where, -1, minimum=-1),
                     multiple_of=field(p, "multiple_of", int, where, d.multiple_of, minimum=1),
                     ffn_dim_multiplier=field(p, "ffn_dim_multiplier", float, where, None, above=0),
                     norm_eps=field(p, "norm_eps", float, where, d.norm_eps, above=0),
                     rope_theta=field(p, "rope_theta", float, where, d.rope_theta, above=0),
                     use_scaled_rope=field(p, "use_scaled_rope", bool, where, False),
                     max_seq_len=field(p, "max_seq_len", int, where, d.max_seq_len, minimum=1),
                     head_dim=field(p, "head_dim", int, where, None, minimum=1),
                     attention_bias=field(p, "attention_bias", bool, where, False),
                     wo_bias=field(p, "wo_bias", bool, where, False),
                     sliding_window=field(p, "sliding_window", int, where, None, minimum=1))
    if args.vocab_size == 0:
        raise UserError(f"{where}: vocab_size is 0, expected -1 (the embedding's rows) or at least 1")
    if field(p, "rope_scaling", dict, where, None) is not None:
        args.rope_scaling = _rope_constants(p["rope_scaling"], f"{where} (rope_scaling)")
    _check_heads(args, where)
    return args


def _read_meta(path: Path, lazy=False):
    """(args, state, where) of a Meta folder. lazy: the shards' tensors on the meta device, shapes only (no
    concatenation, no byte read): enough to check sizes before building anything."""
    where = path / "params.json"
    params = read_json(where)
    args = meta_args(params, where)
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{path}: params.json but no consolidated.NN.pth")
    shards = []
    for f in files:
        try:  # mmap: a 7B file is paged in when used, not copied into RAM first
            shard = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"{f}: cannot read this checkpoint shard (truncated or not a torch file?): {e}")
        if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
            raise UserError(f"{f}: not a state dict of tensors (a Meta checkpoint shard holds one)")
        shard.pop("rope.freqs", None)  # Llama 1/2 store the RoPE table; we compute it
        check_float(f, shard)
        if shards and shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise UserError(f"{f}: key {odd!r} is in only one of {files[0].name} and {f.name}")
        shards.append({k: t.to("meta") for k, t in shard.items()} if lazy else shard)
    given = params.get("model", params)
    assumed = [f"{k} {getattr(args, k)}" for k in ("norm_eps", "rope_theta") if k not in given]
    if assumed and not lazy:  # Llama 1/2's files have no rope_theta: 10000 is theirs, another model's may differ
        if int(os.environ.get("RANK", 0)) == 0:  # once under torchrun, not once per process
            print(f"{where} does not say: assuming {', '.join(assumed)}", flush=True)
    if "tok_embeddings.weight" not in shards[0]:
        raise UserError(f"{files[0]}: missing key 'tok_embeddings.weight'")
    state = {}
    for key in shards[0]:
        parts, name = [s[key] for s in shards], key.split(".")[-2]
        if len(parts) == 1 or name.endswith("norm"):  # norms are replicated on every shard
            state[key] = parts[0]
        elif name == "tok_embeddings":  # split on dim (Llama 1/2) or on vocab (Llama 3): look at the shape
            state[key] = torch.cat(parts, 0 if parts[0].shape[1] == args.dim else 1)
        elif name in SHARD_DIM:
            state[key] = torch.cat(parts, SHARD_DIM[name])
        else:
            raise UserError(f"{files[0]}: unexpected key {key!r}")
    return args, state, f"{path} ({', '.join(f.name for f in files)})"


HF_MODEL_TYPES = ("llama", "mistral", "qwen2")  # one architecture; qwen2 adds q, k, v biases, llama may add q-o
HF_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def sliding_window(cfg: dict, where="config.json"):
    """An HF config's attention window, None for full attention: Mistral slides it in every layer, Qwen2
    only with use_sliding_window (off in its releases)."""
    slides = cfg.get("model_type") == "mistral" or field(cfg, "use_sliding_window", bool, where, False)
    return field(cfg, "sliding_window", int, where, None, minimum=1) if slides else None


def _hf_args(path: Path) -> ModelArgs:
    """The ModelArgs of an HF folder's config.json, each field it uses checked for type and range (field); an
    unsupported flag, or a missing field, is an error."""
    what = f"{path}/config.json"
    cfg = read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{what}: expected a JSON object, got {type(cfg).__name__}")
    kind = field(cfg, "model_type", str, what)
    if kind not in HF_MODEL_TYPES:
        raise UserError(f"{what}: model_type {kind!r} is not supported ({', '.join(HF_MODEL_TYPES)})")
    if field(cfg, "mlp_bias", bool, what, False):
        raise UserError(f"{what}: mlp_bias (biases on the MLP's projections) is not supported")
    llama_bias = kind == "llama" and field(cfg, "attention_bias", bool, what, False)  # q, k, v and o_proj biases
    if field(cfg, "hidden_act", str, what, "silu") != "silu":
        raise UserError(f"{what}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if field(cfg, "attention_dropout", float, what, 0.0, minimum=0, maximum=1) > 0:
        raise UserError(f"{what}: attention_dropout {cfg['attention_dropout']} is not supported (0: none)")
    field(cfg, "torch_dtype", str, what, None, choices=HF_DTYPES)
    field(cfg, "max_position_embeddings", int, what, None, minimum=1)
    rope = field(cfg, "rope_scaling", dict, what, None) or field(cfg, "rope_parameters", dict, what, None) or {}
    rope_type = field(rope, "rope_type", str, f"{what} (rope_scaling)", None) or field(
        rope, "type", str, f"{what} (rope_scaling)", "default")
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{what}: rope type {rope_type!r} is not supported (default, llama3)")
    dim = field(cfg, "hidden_size", int, what, minimum=1)
    n_heads = field(cfg, "num_attention_heads", int, what, minimum=1)
    hidden = field(cfg, "intermediate_size", int, what, minimum=1)
    head_dim = field(cfg, "head_dim", int, what, None, minimum=1)  # set apart from dim / heads in e.g. Mistral-Nemo
    hd = head_dim or dim // n_heads
    base = int(2 * 4 * dim / 3)  # express HF's explicit FFN width through Meta's formula (for --merge)
    args = ModelArgs(dim=dim, n_layers=field(cfg, "num_hidden_layers", int, what, minimum=1), n_heads=n_heads,
                     n_kv_heads=field(cfg, "num_key_value_heads", int, what, n_heads, minimum=1),
                     vocab_size=field(cfg, "vocab_size", int, what, minimum=1),
                     multiple_of=hidden, ffn_dim_multiplier=None if base <= hidden else hidden / base,
                     norm_eps=field(cfg, "rms_norm_eps", float, what, 1e-6, above=0),
                     rope_theta=field(cfg, "rope_theta", float, what, None, above=0) or field(
                         rope, "rope_theta", float, f"{what} (rope_scaling)", 10000.0, above=0),
                     use_scaled_rope=rope_type == "llama3",
                     rope_scaling=_rope_constants(rope, f"{what} (rope_scaling)") if rope_type == "llama3" else None,
                     head_dim=hd if hd != dim // n_heads else None,
                     attention_bias=kind == "qwen2" or llama_bias, wo_bias=llama_bias,
                     tie_embeddings=field(cfg, "tie_word_embeddings", bool, what, False),
                     sliding_window=sliding_window(cfg, what))
    _check_heads(args, what)
    for name in ("bos_token_id", "eos_token_id"):  # one id, or several (Llama 3 instruct's eos)
        ids = cfg.get(name)
        ids = ids if isinstance(ids, list) and ids else [ids]
        for i in ids:
            field({name: i}, name, int, what, None, minimum=0, maximum=args.vocab_size - 1)
    if args.ffn_dim != hidden:  # Meta's formula cannot express this width (it never happens for a real model)
        raise UserError(f"{what}: intermediate_size {hidden} cannot be expressed as Meta's FFN width; not supported")
    return args


def _hf_key(key):
    """An HF tensor name -> this model's (Meta's); an unknown name stays as is and fails the strict check."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    return f"layers.{m[1]}.{HF_LAYER_NAMES[m[2]]}.{m[3]}" if m and m[2] in HF_LAYER_NAMES else HF_NAMES.get(key, key)


def _read_hf(path: Path, lazy=False):
    """(args, state, where) of an HF folder. lazy: the tensors as mapped (no row permutation, nothing read)."""
    args = _hf_args(path)
    n_heads, hd = args.n_heads, args.head_dim or args.dim // args.n_heads
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise UserError(f"{index}: expected {{\"weight_map\": {{tensor name: file name}}}}")
        files = sorted(set(weight_map.values()))
        outside = [name for name in files if name != os.path.basename(name) or name in ("", ".", "..")]
        if outside:  # the index may only name files of the model folder
            raise UserError(f"{index}: names {outside[0]!r}, outside the model folder; refusing it")
    else:
        files, weight_map = ["model.safetensors"], None
    state, where = {}, f"{path} ({', '.join(files)})"
    for name in files:
        for key, t in check_float(path / name, read_safetensors(path / name)).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise UserError(f"{path / name}: key {key!r} is not mapped to this file by {index.name}")
            new = _hf_key(key)
            heads = {"wq": n_heads, "wk": args.n_kv_heads}.get(new.split(".")[-2])
            if heads and t.shape[0] == heads * hd and not lazy:  # HF's rotate-half rows -> Meta's pairs
                t = t.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(t.shape)
            state[new] = t
    if weight_map is not None and len(state) != len(weight_map):
        raise UserError(f"{index}: lists {len(weight_map)} tensors, the files hold {len(state)}")
    return args, state, where


def _read(path: Path, lazy=False):
    if (path / "params.json").exists():
        return _read_meta(path, lazy)
    if (path / "config.json").exists():
        return _read_hf(path, lazy)
    raise UserError(f"{path}: neither params.json (Meta) nor config.json (HF) is there")


def _check_sizes(args: ModelArgs, state: dict, where):
    """The config's sizes against the tensors the files hold, before any model is built: a vocab_size of 10^12
    or 10^6 layers is one line at once, not terabytes asked for or minutes of building. Sets a Meta
    vocab_size of -1 (Meta's code asks the tokenizer) to the embedding's rows."""
    layers = {int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers != set(range(args.n_layers)):
        raise UserError(f"{where}: the config says {args.n_layers} layers, the files hold "
                        f"{len(layers)} ({', '.join(f'layers.{i}' for i in sorted(layers)[:3]) or 'none'}"
                        f"{', ...' if len(layers) > 3 else ''})")
    if "tok_embeddings.weight" not in state:
        raise UserError(f"{where}: missing weight 'tok_embeddings.weight'")
    shape = tuple(state["tok_embeddings.weight"].shape)
    if args.vocab_size < 0 and len(shape) == 2:
        args.vocab_size = shape[0]
    if shape != (args.vocab_size, args.dim):
        raise UserError(f"{where}: the config says vocab_size {args.vocab_size} and width {args.dim}, the "
                        f"embedding tok_embeddings.weight is {tuple(state['tok_embeddings.weight'].shape)}")


def read_args(path) -> ModelArgs:
    """A checkpoint folder's ModelArgs, checked against the tensor shapes its files hold (safetensors headers,
    mapped shards), no weight read: enough to build the model on the meta device and to check a tokenizer or
    an adapter against it. A Meta vocab_size of -1 becomes the embedding's rows."""
    args, state, where = _read(Path(path), lazy=True)
    _check_sizes(args, state, where)
    return args


def load_llama(path, max_seq_len=None, dtype=None) -> Transformer:
    """A Meta (params.json + consolidated.NN.pth) or HF (config.json + *.safetensors) checkpoint folder ->
    Transformer on the CPU, in the stored dtype unless dtype is given. Strict: a missing, unexpected or
    misshapen weight is an error naming the key and the files, found before the model is built."""
    args, state, where = _read(Path(path))
    _check_sizes(args, state, where)
    if max_seq_len:
        args.max_seq_len = max_seq_len
    with torch.device("meta"):  # no memory, no random init: every weight comes from the file
        model = Transformer(args)
    tied = args.tie_embeddings  # the file holds the embedding once
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{where}: missing weight {key!r}")
        if state[key].shape != shape:
            raise UserError(f"{where}: weight {key!r} has shape {tuple(state[key].shape)}, the config "
                            f"implies {tuple(shape)}")
    for key in state:
        if key not in expected:
            raise UserError(f"{where}: unexpected weight {key!r}")
    model.load_state_dict({k: v.to(dtype) if dtype else v for k, v in state.items()}, strict=False, assign=True)
    if tied:  # embeddings tied (e.g. Llama 3.2 1B on HF): the output layer is the embedding matrix
        model.output.weight = model.tok_embeddings.weight
    return model


def save_meta(model: Transformer, out_dir):
    """Writes a Meta checkpoint (params.json + consolidated.00.pth) that Meta's own code loads: params.json
    holds only the keys of Meta's ModelArgs (Llama 2's code rejects unknown ones, so defaults are left out)."""
    a, out_dir = model.args, Path(out_dir)
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "vocab_size": a.vocab_size,
              "multiple_of": a.multiple_of, "norm_eps": a.norm_eps}
    params |= {"n_kv_heads": a.n_kv_heads} if a.n_kv_heads else {}
    params |= {"ffn_dim_multiplier": a.ffn_dim_multiplier} if a.ffn_dim_multiplier is not None else {}
    params |= {"rope_theta": a.rope_theta} if a.rope_theta != 10000.0 else {}
    params |= {"use_scaled_rope": True} if a.use_scaled_rope else {}
    params |= {"rope_scaling": a.rope_scaling} if a.use_scaled_rope and a.rope_scaling not in (
        None, LLAMA31_ROPE_SCALING) else {}
    # Hub flags Meta's format lacks, so that load_llama reads the merge back as it was (tied embeddings are
    # written twice, untied, as Meta's format has them)
    params |= {k: getattr(a, k) for k in ("head_dim", "attention_bias", "wo_bias", "sliding_window")
               if getattr(a, k)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), out_dir / "consolidated.00.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))


def find_tokenizer(model_path, tokenizer=None):
    """The tokenizer file (or, for a folder, the one in it) named by --tokenizer, else the one in the model folder:
    tokenizer.json (an HF folder's, which transformers uses; BOS, EOS, stop ids and whether BOS is added come from
    the JSON files beside it), else tokenizer.model (Meta's folders), else original/tokenizer.model (Meta's copy in
    an HF Llama 3 repo)."""
    if tokenizer and not Path(tokenizer).is_dir():
        found = [Path(tokenizer)]
        if not found[0].is_file():
            raise UserError(f"--tokenizer {tokenizer}: no such file or folder")
    else:
        d = Path(tokenizer or model_path)
        found = [p for p in (d / "tokenizer.json", d / "tokenizer.model", d / "original" / "tokenizer.model")
                 if p.is_file()]
        if not found:
            raise UserError(f"no tokenizer.json or tokenizer.model in {d} (or its original/): pass --tokenizer")
    try:
        tok = load_tokenizer(found[0])
    except UserError:  # tokenizer.py's own one line names the file and the field
        raise
    except (ValueError, OSError) as e:  # the readers' errors for a malformed file, which name it
        raise UserError(f"cannot read the tokenizer {found[0]}: {e}") from None
    if tok.eos_id is None:  # training ends every example with it
        raise UserError(f"{found[0]}: no end-of-text token declared: add eos_token to a tokenizer_config.json "
                        f"(or eos_token_id to a config.json) beside it")
    return tok


# -----------------------------------------------------------------------------
# Adapting the model: its layers by name (Meta's or HF's), and FSDP for one larger than a GPU

HF_TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
              "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}


def layer_names(targets):
    """Adapter targets as this model's layer names: HF's (q_proj, self_attn.q_proj) and Meta's bare (wq) or full
    (attention.wq, layers.3.attention.wq) names; anything else is a UserError listing the valid ones."""
    layers, out = list(HF_TARGETS.values()), []
    for t in targets:
        name = HF_TARGETS.get(t.split(".")[-1], t)
        full = [layer for layer in layers if layer.split(".")[-1] == name or layer == name]
        if full:
            out.append(full[0])
        elif re.fullmatch(r"layers\.\d+\.(" + "|".join(map(re.escape, layers)) + ")", name):
            out.append(name)  # one layer of one block
        else:
            raise UserError(f"--targets {t}: LLaMA has no layer of that name; valid: {', '.join(layers)} "
                            f"(or wq, wk, wv, wo, w1, w2, w3; HF's {', '.join(HF_TARGETS)}; layers.N.<name> for one "
                            f"block)")
    return out


def fsdp_shard(model: Transformer, device, keep: nn.Module):
    """FSDP2 for a model larger than one GPU: each block's frozen weights, then the rest (embeddings, norm,
    output), are split over the processes and gathered one block at a time for its forward and backward.
    keep (the adapter: a few MB) stays whole on every rank, left out of FSDP: it keeps its dtype beside bf16
    weights, its gradient is averaged over the ranks by the caller, and it is saved and loaded as without FSDP."""
    from torch.distributed.fsdp import fully_shard  # here: importing it costs every other use a second
    for block in model.layers:  # moved to the device and sharded one block at a time
        fully_shard(block)
    fully_shard(model, ignored_params=set(keep.parameters()))
    keep.to(device)  # FSDP moves only what it manages
