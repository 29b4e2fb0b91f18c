"""A Vision Transformer with timm's module names, and its checkpoint readers: Google's .npz (Flax), timm's .pth /
.safetensors and HF's ViT (a config.json + model.safetensors folder, or the file), read key by key with shape checks
into one model; and the adapter files train_vit.py writes (adapter.safetensors) or the GIFT authors released
(.pth.tar). Every reader checks what it reads (the dtype of each weight, the type and range of each config field,
the config against the tensors' shapes before any model is built) and names the file of a mistake (UserError).

    x (B, 3, H, W) -> patches (B, N, D) -> [CLS; patches] + pos (B, 1 + N, D) -> depth x Block -> LayerNorm
    Block: x + attn(norm1(x)), then x + mlp(norm2(x))  (pre-norm; drop_path on both branches when training)
    logits (B, num_classes) = head(CLS token)

Numerics as timm and HF run these weights: LayerNorm eps 1e-6 (HF folders: their layer_norm_eps), exact (erf)
GELU (Google's Flax code used the tanh approximation, which differs by at most 5e-4 per activation). Inputs are
normalised with mean = std = 0.5.

    from vit import build_vit, load_vit, read_vit, ViTConfig, ViT
    model = load_vit("augreg_in21k.safetensors", num_classes=200, drop_path=0.1)  # architecture from the shapes
    w, config = read_vit("augreg_in21k.safetensors")      # the header alone: check an adapter against it first
    model = build_vit("augreg_in21k.safetensors", w, config, num_classes=200)
    with torch.device("meta"): model = ViT(ViTConfig.from_name("B/16"))        # an empty ViT-B/16

Run (the training script; this file only defines the model):
    python train_vit.py --demo
    python train_vit.py --model augreg_in21k.safetensors --train CUB_200_2011/train.json --test ...
"""
import argparse
import json
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import UserError, check_float, read_json, read_safetensors, read_safetensors_metadata

# -----------------------------------------------------------------------------
# The model: a Vision Transformer with timm's module names, so timm state dicts load as they are

SIZES = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
         "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120)}  # name: (dim, depth, heads, mlp_dim)


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    drop_path: float = 0.0  # stochastic depth of the last block; block i gets drop_path * i / (depth - 1)
    eps: float = 1e-6       # LayerNorm's: timm's and Google's; HF's config.json states its own

    @classmethod
    def from_name(cls, name: str, **kw):
        """ViTConfig.from_name("B/16", num_classes=200): the standard sizes Ti, S, B, L, H with patch 16 or 32."""
        size, patch = name.split("/")
        dim, depth, heads, mlp_dim = SIZES[size]
        return cls(patch_size=int(patch), dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, **kw)


def drop_path(x, p: float, training: bool):
    """Stochastic depth: zeroes a residual branch for a random p of the samples. It depends on .training
    alone, not on requires_grad, so it keeps regularising while only Theta and the head train."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)  # (B, 1, 1)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k, v stacked on the output dim, as in timm
        self.proj = nn.Linear(dim, dim)     # GIFT's target in the paper

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B,H,T,hd)
        x = F.scaled_dot_product_attention(q, k, v)                                                # (B,H,T,hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, as timm and HF


class Block(nn.Module):
    def __init__(self, c: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.dim, eps=c.eps), nn.LayerNorm(c.dim, eps=c.eps)
        self.attn, self.mlp, self.drop_path = Attention(c.dim, c.heads), Mlp(c.dim, c.mlp_dim), drop_path_rate

    def forward(self, x):  # pre-norm residual block
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.dim, c.patch_size, stride=c.patch_size)  # one linear map per patch

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch_size or c.dim % c.heads:
            raise ValueError(f"image_size must be a multiple of patch_size and dim of heads: {c}")
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, c.dim) * 0.02)  # learned, CLS first
        rates = [c.drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(Block(c, r) for r in rates)
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.head = nn.Linear(c.dim, c.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # a new head's init, as timm
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x):  # (B, 3, H, W) normalised images -> (B, 1 + N, D) tokens
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):  # (B, 3, H, W) -> (B, num_classes) logits from the CLS token
        return self.head(self.forward_features(x)[:, 0])


def resize_pos_embed(pos, grid: int):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic on the patch grid (as timm), CLS kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


# -----------------------------------------------------------------------------
# Checked fields: a config, a run config or a model's metadata is read field by field, each of its type and range

MAX_IMAGE = 4096  # pixels a side: a 256 x 256 patch grid at patch 16, far past any ViT checkpoint's
_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object"}


def field(d, key, kind, where, minimum=None, maximum=None, above=None, choices=None, default=_REQUIRED):
    """d[key], checked: of type kind (int: not a bool, not 2.5 or 430.0 or "16"; float: any finite number), within
    [minimum, maximum] (above: an exclusive lower bound) or among choices; missing: default (none: an error).
    A mistake is one UserError naming where, the field, the value found and what was expected."""
    if key not in d:
        if default is _REQUIRED:
            raise UserError(f"{where}: no field {key!r}")
        return default
    v = d[key]
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    else:
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
    ok = ok and (minimum is None or v >= minimum) and (maximum is None or v <= maximum) and (
        above is None or v > above) and (choices is None or v in choices)
    if not ok:
        want = (f"one of {', '.join(map(repr, choices))}" if choices else _KINDS[kind] + "".join(
            f" {op} {b}" for op, b in ((">=", minimum), ("<=", maximum), (">", above)) if b is not None))
        raise UserError(f"{where}: field {key!r} is {v!r}; expected {want}")
    return float(v) if kind is float else v


def vit_config(d, where) -> ViTConfig:
    """A ViTConfig from a dict (a run config's or a merged model's "vit"), every field checked."""
    if not isinstance(d, dict):
        raise UserError(f"{where} is {d!r}; expected an object of ViTConfig's fields")
    unknown = sorted(set(d) - {f.name for f in fields(ViTConfig)})
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; ViTConfig has "
                        f"{', '.join(f.name for f in fields(ViTConfig))}")
    c = ViTConfig(**{k: field(d, k, int, where, minimum=1, maximum=MAX_IMAGE if k == "image_size" else None)
                     for k in ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim")},
                  num_classes=field(d, "num_classes", int, where, minimum=1, default=1000),
                  drop_path=field(d, "drop_path", float, where, minimum=0, maximum=0.99, default=0.0),
                  eps=field(d, "eps", float, where, minimum=0, maximum=1, default=1e-6))
    if c.image_size % c.patch_size or c.dim % c.heads:
        raise UserError(f"{where}: image_size {c.image_size} must be a multiple of patch_size {c.patch_size}, and "
                        f"dim {c.dim} of heads {c.heads}")
    return c


def hf_vit_config(path) -> ViTConfig:
    """The ViTConfig of an HF ViT config.json (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, image_size, patch_size, layer_norm_eps), each field checked; what this ViT cannot run (an
    activation other than exact GELU, no qkv bias, other than 3 channels) is refused, not silently changed."""
    hc = read_json(path)
    if not isinstance(hc, dict):
        raise UserError(f"{path}: not a JSON object")
    names = {"hidden_size": "dim", "num_hidden_layers": "depth", "num_attention_heads": "heads",
             "intermediate_size": "mlp_dim", "image_size": "image_size", "patch_size": "patch_size"}
    d = {ours: field(hc, k, int, path, minimum=1, maximum=MAX_IMAGE if k == "image_size" else None,
                     default={"image_size": 224, "patch_size": 16}.get(k, _REQUIRED)) for k, ours in names.items()}
    field(hc, "hidden_act", str, path, choices=("gelu",), default="gelu")
    field(hc, "qkv_bias", bool, path, choices=(True,), default=True)
    field(hc, "num_channels", int, path, choices=(3,), default=3)
    return vit_config({**d, "eps": field(hc, "layer_norm_eps", float, path, minimum=0, maximum=1, default=1e-12)},
                      path)


# -----------------------------------------------------------------------------
# Checkpoints: Google .npz, timm .pth / .safetensors, HF folders and safetensors -> timm names, key by key

def _read_checkpoint(path):
    """({key: tensor}, the ViTConfig stored with it or None) from a file or an HF folder (config.json +
    model.safetensors), whatever the container: safetensors and zip-format torch files are mapped, not read (the
    header's shapes are checked before any page loads), npz read. Every tensor must be floating point."""
    if os.path.isdir(path):  # an HF model folder
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise UserError(f"{path}: a folder without model.safetensors (an HF ViT folder holds config.json and "
                            f"model.safetensors)")
        stored = hf_vit_config(os.path.join(path, "config.json"))
        path = os.path.join(path, "model.safetensors")
        return check_float(path, read_safetensors(path)), stored
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        if f.read(9)[8:] == b"{":  # safetensors: 8-byte length, then the JSON header
            w, meta = read_safetensors(path), read_safetensors_metadata(path)
            try:  # a model written by --merge records its ViTConfig; any other metadata is not ours to check
                vit = json.loads(meta["config"])["vit"]
            except (KeyError, TypeError, json.JSONDecodeError):
                return check_float(path, w), None
            return check_float(path, w), vit_config(vit, f"{path}: metadata config 'vit'")
    try:
        if zipfile.is_zipfile(path) and all(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist()):
            with np.load(path) as z:
                return check_float(path, {k: torch.from_numpy(z[k]) for k in z.files}), None
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # zip, numpy and pickle each raise their own errors for a broken file
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); expected Google .npz, "
                        f"a timm state dict (.pth, .safetensors) or HF ViT safetensors (truncated file?)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a plain state dict {{name: tensor}}")
    return check_float(path, state), None


def _taker(w, path):
    """take(key) pops w[key]; a missing key is an error naming the file and the key."""
    def take(key):
        if key not in w:
            raise UserError(f"{path}: backbone weight {key!r} is missing")
        return w.pop(key)
    return take


def _depth(keys, pattern):
    return len({k.split(pattern, 1)[1].split("/")[0].split(".")[0] for k in keys if pattern in k})


# Where each format keeps what fixes the architecture: (patch kernel, its layout), block prefix, first MLP kernel
# and whether its rows (not columns) are mlp_dim, the position embedding
_LAYOUT = {"google": ("embedding/kernel", "PPID", "Transformer/encoderblock_", "Transformer/encoderblock_0/MlpBlock_3/"
                      "Dense_0/kernel", False, "Transformer/posembed_input/pos_embedding"),
           "hf": ("embeddings.patch_embeddings.projection.weight", "DIPP", "encoder.layer.",
                  "encoder.layer.0.intermediate.dense.weight", True, "embeddings.position_embeddings"),
           "timm": ("patch_embed.proj.weight", "DIPP", "blocks.", "blocks.0.mlp.fc1.weight", True, "pos_embed")}


def read_vit(path, config: ViTConfig | None = None):
    """(the checkpoint's tensors, its ViTConfig), before any model is built: the architecture read from the
    tensors' shapes (a safetensors header; nothing else is read) and compared with config, or with the config
    stored with the weights (HF config.json, a merged model's metadata); when neither is given, the one the shapes
    describe (the number of heads from Google's kernels, else from the standard sizes)."""
    w, stored = _read_checkpoint(path)
    w = {k.removeprefix("opt/target/").removeprefix("params/"): v for k, v in w.items()}
    fmt = next((f for f, lay in _LAYOUT.items() if any(k.endswith(lay[0]) for k in w)), None)
    if fmt is None:
        raise UserError(f"{path}: no ViT patch embedding under Google, timm or HF names; keys: {sorted(w)[:8]}")
    p = "vit." if fmt == "hf" and any(k.startswith("vit.") for k in w) else ""
    patch_key, layout, blocks, mlp_key, rows, pos_key = _LAYOUT[fmt]
    take = _taker(dict(w), path)

    def shape(key, ndim):
        if len(s := tuple(take(p + key).shape)) != ndim:
            raise UserError(f"{path}: {p + key!r} has shape {s}; expected {ndim} dimensions")
        return s
    kernel, mlp, pos = shape(patch_key, 4), shape(mlp_key, 2), shape(pos_key, 3)
    dim, patch = kernel[layout.index("D")], kernel[layout.index("P")]
    grid, q = math.isqrt(pos[1] - 1), w.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    heads = q.shape[1] if fmt == "google" and q is not None and q.dim() == 3 else 0  # (D, heads, hd)
    found = dict(dim=dim, depth=_depth(w, p + blocks), mlp_dim=mlp[0 if rows else 1], patch_size=patch)
    if grid * grid != pos[1] - 1 or pos[2] != dim:
        raise UserError(f"{path}: position embedding of shape {pos}: not 1 + a square grid of {dim}-vectors")
    config, given = config or stored, "given" if config else "stored with it"
    if config is None:
        heads = heads or {s[0]: s[2] for s in SIZES.values()}.get(dim)
        if not heads:
            raise UserError(f"{path}: cannot infer the number of heads (dim {dim} is no standard size); pass config")
        return w, ViTConfig(image_size=grid * patch, heads=heads, **found)
    if any(getattr(config, k) != v for k, v in found.items()) or heads and heads != config.heads:
        what = lambda d: ", ".join(f"{k} {d[k]}" for k in [*found, "heads"] if k in d)  # noqa: E731
        raise UserError(f"{path} holds a ViT of {what({**found, **({'heads': heads} if heads else {})})}; the config "
                        f"{given} says {what(asdict(config))}: it does not describe this checkpoint")
    return w, config


def _to_timm(w, path):
    """(state under timm names, unused tensors) of a checkpoint in any of the three formats."""
    if any(k.endswith("embedding/kernel") for k in w):
        sd, _, unused = _google_to_timm(dict(w), path)
    elif any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in w):
        sd, _, unused = _hf_to_timm(dict(w), path)
    else:
        sd, unused = dict(w), {}
    return sd, unused


def _google_to_timm(w, path):
    """Google's Flax names (ViT-B_16.npz, AugReg) -> timm names. Returns (state, heads, unused arrays)."""
    w = {k.removeprefix("opt/target/").removeprefix("params/"): v for k, v in w.items()}
    take, sd = _taker(w, path), {}
    sd["patch_embed.proj.weight"] = take("embedding/kernel").permute(3, 2, 0, 1)  # HWIO -> OIHW
    sd["patch_embed.proj.bias"] = take("embedding/bias")
    sd["cls_token"], sd["pos_embed"] = take("cls"), take("Transformer/posembed_input/pos_embedding")
    q = w.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    heads = q.shape[1] if q is not None and q.dim() == 3 else 0  # (D, heads, hd)
    for i in range(_depth(w, "Transformer/encoderblock_")):
        g, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = g + "MultiHeadDotProductAttention_1/"
        # query/key/value kernels are (D, heads, hd): flatten the heads, transpose to nn.Linear's (out, in)
        qkv = ("query", "key", "value")
        sd[t + "attn.qkv.weight"] = torch.cat([take(f"{att}{n}/kernel").flatten(1).T for n in qkv])  # (3D, D)
        sd[t + "attn.qkv.bias"] = torch.cat([take(f"{att}{n}/bias").flatten() for n in qkv])
        sd[t + "attn.proj.weight"] = take(att + "out/kernel").flatten(0, 1).T  # (heads, hd, D) -> (D, heads*hd)
        sd[t + "attn.proj.bias"] = take(att + "out/bias")
        for src, dst in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[t + dst + ".weight"], sd[t + dst + ".bias"] = take(g + src + "/scale"), take(g + src + "/bias")
        for src, dst in (("MlpBlock_3/Dense_0", "mlp.fc1"), ("MlpBlock_3/Dense_1", "mlp.fc2")):
            sd[t + dst + ".weight"], sd[t + dst + ".bias"] = take(g + src + "/kernel").T, take(g + src + "/bias")
    sd["norm.weight"], sd["norm.bias"] = take("Transformer/encoder_norm/scale"), take("Transformer/encoder_norm/bias")
    if "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = take("head/kernel").T, take("head/bias")
    return sd, heads, w  # w now holds the unused keys (pre_logits, ...)


def _hf_to_timm(w, path):
    """HF ViTModel / ViTForImageClassification names -> timm names (q, k, v fused into qkv)."""
    p = "vit." if any(k.startswith("vit.") for k in w) else ""
    take, sd = _taker(w, path), {}
    sd["patch_embed.proj.weight"] = take(p + "embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take(p + "embeddings.patch_embeddings.projection.bias")
    sd["cls_token"], sd["pos_embed"] = take(p + "embeddings.cls_token"), take(p + "embeddings.position_embeddings")
    for i in range(_depth(w, p + "encoder.layer.")):
        h, t = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        for x in ("weight", "bias"):
            qkv = [take(f"{h}attention.attention.{n}.{x}") for n in ("query", "key", "value")]
            sd[t + "attn.qkv." + x] = torch.cat(qkv)
            for src, dst in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
                sd[f"{t}{dst}.{x}"] = take(f"{h}{src}.{x}")
    sd["norm.weight"], sd["norm.bias"] = take(p + "layernorm.weight"), take(p + "layernorm.bias")
    if "classifier.weight" in w:
        sd["head.weight"], sd["head.bias"] = take("classifier.weight"), take("classifier.bias")
    return sd, 0, w


def build_vit(path, w, config: ViTConfig, num_classes: int | None = None, image_size: int | None = None,
              drop_path: float = 0.0, log=print) -> ViT:
    """The ViT of read_vit's (w, config), its weights copied key by key with shape checks. num_classes=None keeps
    the checkpoint's head (an error if it has none or it is all zeros, like the ImageNet-21k files); a number
    attaches a new head. image_size resizes the position embeddings; drop_path sets stochastic depth."""
    sd, unused = _to_timm(w, path)
    head = sd.get("head.weight")
    if num_classes is None and (head is None or not head.any()):
        raise UserError(f"{path} has no usable classifier head (missing or all zeros, as in the ImageNet-21k files), "
                        f"so it cannot be evaluated zero-shot: pass num_classes for a new head, or give an adapter")
    image_size = image_size or config.image_size
    if image_size % config.patch_size or image_size > MAX_IMAGE:
        raise UserError(f"image size {image_size}: must be a multiple of the patch size {config.patch_size} and at "
                        f"most {MAX_IMAGE}")
    config = replace(config, num_classes=num_classes or head.shape[0], image_size=image_size, drop_path=drop_path)
    model = ViT(config)
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, param in own.items():
            if key.startswith("head.") and num_classes is not None:
                continue
            if key not in sd:
                raise UserError(f"{path}: backbone weight {key!r} is missing")
            t = sd.pop(key)
            if key == "pos_embed" and t.shape != param.shape and t.shape[1] - 1 == math.isqrt(t.shape[1] - 1) ** 2:
                t = resize_pos_embed(t, config.image_size // config.patch_size)
            if t.shape != param.shape:
                raise UserError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {tuple(param.shape)} "
                                f"for {config}")
            param.copy_(t)
    # only a replaced head and the layer before one (Google's pre_logits, HF's pooler) may be left out: any
    # other tensor means that the config does not describe this checkpoint
    unused = sorted(unused) + sorted(sd)
    backbone = [k for k in unused if not (k.startswith(("head.", "pre_logits")) or "pooler" in k)]
    if backbone:
        raise UserError(f"{path}: {len(backbone)} tensors have no place in a ViT of {config} ({', '.join(backbone[:3])}"
                        f"{', ...' if len(backbone) > 3 else ''}): this config does not describe the checkpoint")
    log(f"loaded {path}: {len(own) - 2 * (num_classes is not None)} tensors"
        f"{f'; new head for {num_classes} classes' if num_classes is not None else ''}"
        f"; unused: {', '.join(unused) if unused else 'none'}")
    return model


def load_vit(path, config: ViTConfig | None = None, num_classes: int | None = None,
             image_size: int | None = None, drop_path: float = 0.0, log=print) -> ViT:
    """A ViT with the weights of `path` (format detected from the file), ready for add_gift: read_vit, then
    build_vit. A missing or misshapen backbone weight is an error, and so is an unused one; only the keys of a
    replaced head (and pre_logits / pooler) may be left out, and they are reported (through log)."""
    return build_vit(path, *read_vit(path, config), num_classes, image_size, drop_path, log)


def random_google_npz(path, dim=64, depth=4, heads=4, mlp_dim=128, patch=8, image_size=64, seed=0):
    """Writes a random ViT in Google's .npz layout (for demos and tests), with the pre_logits and the all-zero head
    of the ImageNet-21k files; returns path."""
    rng, D, H, M, P = np.random.default_rng(seed), dim, heads, mlp_dim, patch
    dense = lambda i, *o: rng.normal(0, i ** -0.5, (i, *o)).astype(np.float32)  # noqa: E731
    zeros, ones = (lambda *s: np.zeros(s, np.float32)), (lambda *s: np.ones(s, np.float32))
    w = {"embedding/kernel": dense(P * P * 3, D).reshape(P, P, 3, D), "embedding/bias": zeros(D),
         "cls": dense(D, D)[:1, None, :] * 0.1,
         "Transformer/posembed_input/pos_embedding": dense(D, 1 + (image_size // P) ** 2).T[None] * 0.1,
         "Transformer/encoder_norm/scale": ones(D), "Transformer/encoder_norm/bias": zeros(D),
         "pre_logits/kernel": dense(D, D), "pre_logits/bias": zeros(D), "head/kernel": zeros(D, 10),
         "head/bias": zeros(10)}
    for i in range(depth):
        b, a = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            w[a + n + "/kernel"], w[a + n + "/bias"] = dense(D, H, D // H), zeros(H, D // H)
        w[a + "out/kernel"], w[a + "out/bias"] = dense(D, D).reshape(H, D // H, D), zeros(D)
        for n in ("LayerNorm_0", "LayerNorm_2"):
            w[b + n + "/scale"], w[b + n + "/bias"] = ones(D), zeros(D)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = dense(D, M), zeros(M)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = dense(M, D), zeros(D)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, **w)
    return path


# -----------------------------------------------------------------------------
# Adapters: ours (adapter.safetensors, the run config in its metadata) and the GIFT authors' released files

def read_authors_adapter(path):
    """(state under our names, run config, the test top-1 stored in it) of a GIFT adapter released by the paper's
    authors (github.com/savadikarc/gift, artifacts/<dataset>/gift/final/final/last.pth.tar, trained with timm on
    vit_base_patch16_224.augreg_in21k).

    The container is torch.save of {epoch, arch, state_dict, optimizer, version, args, metric}, args an
    argparse.Namespace: torch.load(weights_only=True) is allowed that one class and nothing else, so a file
    that needs any other code to unpickle is refused. Its tensors were saved on a GPU: map_location="cpu".
    Their GIFT is ours: in_projections.<target> (r, d_in) is phi.weight, out_projections.<target> (d_in, r) is
    psi.weight ('.' written ':' in target names), with their default 'simple_block' between them, which has an
    identity activation and no parameters: their dW = out(in(W)) = (W phi) psi, our GIFT.delta."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and the weights-only unpickler each raise their own errors
        lines = str(e).splitlines() or [""]
        why = next((line.strip() for line in lines if "GLOBAL" in line), lines[0][:200])  # the code it names
        raise UserError(f"{path}: cannot read it as a GIFT authors' checkpoint ({type(e).__name__}: {why}); such a "
                        f"file loads with nothing but argparse.Namespace allowed (truncated file?)") from None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: no 'state_dict' in it (found {found}); not a GIFT authors' checkpoint")
    a = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {}
    lora = [k for k in sd if "lora_" in k]
    if lora or a.get("method", "gift") != "gift":
        what = f"LoRA weights ({lora[0]}, {len(lora)} tensors)" if lora else f"a {a['method']!r} run"
        raise UserError(f"{path}: holds {what}, not a GIFT adapter (method {a.get('method')!r} in its args)")
    block = a.get("gift_block_block_type", a.get("hypernet_block_block_type", "simple_block"))
    act = a.get("gift_block_act_layer", a.get("hypernet_block_act_layer", "identity"))
    if (block, act) != ("simple_block", "identity"):
        raise UserError(f"{path}: trained with the GIFT block {block!r} (activation {act!r}); this repository "
                        f"implements the paper's GIFT, two linear maps with nothing between (simple_block, identity)")
    state, pairs, rest = {}, {}, []
    for k, v in sd.items():
        m = re.fullmatch(r"(in|out)_projections\.(.+)\.weight", k)
        if m:
            pairs.setdefault(m[2], {})[m[1]] = v
        elif k in ("backbone.head.weight", "backbone.head.bias"):
            state[k.removeprefix("backbone.")] = v.float()
        else:
            rest.append(k)
    if rest or not pairs or len(state) != 2:
        raise UserError(f"{path}: expected in_projections.<target>.weight, out_projections.<target>.weight and "
                        f"backbone.head.weight/bias; found {sorted(sd)[:8]}{' ...' if len(sd) > 8 else ''} "
                        f"({len(sd)} tensors): not a GIFT adapter as the authors released them")
    ranks = set()
    for target, p in pairs.items():
        phi, psi = p.get("in"), p.get("out")
        if phi is None or psi is None or phi.dim() != 2 or psi.shape != phi.shape[::-1]:
            shape = lambda t: "missing" if t is None else tuple(t.shape)  # noqa: E731
            raise UserError(f"{path}: in_projections.{target}.weight is {shape(phi)} and out_projections.{target}"
                            f".weight is {shape(psi)}: not the (r, d_in) and (d_in, r) factors of one Theta")
        ranks.add(phi.shape[0])
        key = "gift." + target.replace(":", "_").replace(".", "_")
        state[key + ".phi.weight"], state[key + ".psi.weight"] = phi.float(), psi.float()
    if len(ranks) > 1:
        raise UserError(f"{path}: Thetas of different ranks {sorted(ranks)}; one rank per adapter is supported")
    run = {"method": "gift", "targets": [t.replace(":", ".") for t in pairs], "rank": ranks.pop(), "share": "type",
           "arch": ckpt.get("arch") or a.get("model"), "image_size": a.get("img_size"), "epoch": ckpt.get("epoch"),
           "source": f"GIFT authors' release {os.path.basename(path)}"}
    metric = ckpt.get("metric")
    return state, run, float(metric) if isinstance(metric, (int, float)) else None


def trained_on(run):
    """The base model an adapter's run config names, for messages."""
    vit = run.get("vit")
    return (run.get("model") or run.get("checkpoint") or run.get("arch") or "an unnamed model") + (
        f", dim {vit.dim}, depth {vit.depth}" if vit else "")


def check_adapter_shapes(state, run, config: ViTConfig, adapter, base, adapt, adapter_state):
    """An adapter's tensors (state) must have the shapes of the same adapter on a ViT of config (read from the
    base's header, nothing loaded yet), built on the meta device (shapes only, no memory whatever the sizes):
    adapt(model, run) adds it (harness.add_adapter), adapter_state(model) lists its tensors. A head may be absent
    from state (a new one is attached). Else one line naming the adapter's base and this one."""
    try:
        with torch.device("meta"):
            shell = ViT(config)
            adapt(shell, run)
    except ValueError as e:  # targets that name no layer of this ViT, or Thetas that cannot be shared
        raise UserError(f"{adapter}: its run config does not fit {base}: {e}") from None
    want = adapter_state(shell)
    bad = [k for k in sorted(state.keys() | want.keys()) if (k in state) != (k in want) and not k.startswith("head.")
           or k in state and k in want and state[k].shape != want[k].shape]
    if bad:
        shape = lambda d: tuple(d[bad[0]].shape) if bad[0] in d else "absent"  # noqa: E731
        raise UserError(f"{adapter} was trained on {trained_on(run)} and does not fit {base} (dim {config.dim}, "
                        f"depth {config.depth}): {bad[0]} is {shape(state)} there, {shape(want)} here")


def adapter_run(run, path) -> dict:
    """An adapter's run config with every field this repository reads checked: method gift or lora, targets a
    list of names, rank an integer >= 1, share, lora_alpha > 0, vit a ViTConfig, classes a list, test_top1 a
    percentage, model a path; the names of the files it came from are strings. Returns it, "vit" as a ViTConfig."""
    where = f"{path}: run config"
    if not isinstance(run, dict):
        raise UserError(f"{where} is {type(run).__name__} {str(run)[:40]}; expected a JSON object")
    other = field(run, "script", str, where, default="train_vit.py")  # older ViT adapters have none
    if other != "train_vit.py":
        raise UserError(f"{path} is an adapter of {other}, not of train_vit.py; give one written by train_vit.py")
    if "targets" not in run or "rank" not in run:
        raise UserError(f"{path}: no run config (targets, rank) in its metadata; give an adapter.safetensors "
                        f"written by train_vit.py")
    opt = lambda k, kind, **kw: None if run.get(k) is None else field(run, k, kind, where, **kw)  # noqa: E731
    run = {**run, "method": field(run, "method", str, where, choices=("gift", "lora"), default="gift"),
           "targets": field(run, "targets", list, where), "rank": field(run, "rank", int, where, minimum=1),
           "share": field(run, "share", str, where, choices=("type", "all"), default="type"),
           "classes": opt("classes", list), "test_top1": opt("test_top1", float, minimum=0, maximum=100),
           "seed": opt("seed", int), **{k: opt(k, str) for k in ("model", "checkpoint", "base", "train", "test",
                                                                  "preset")}}
    if not run["targets"] or not all(isinstance(t, str) and t for t in run["targets"]):
        raise UserError(f"{where}: field 'targets' is {run['targets']!r}; expected a list of layer names")
    if run["method"] == "lora":
        run["lora_alpha"] = field(run, "lora_alpha", float, where, above=0)
    if "vit" in run:
        run["vit"] = vit_config(run["vit"], f"{where}: field 'vit'")
    return run


def read_adapter(path):
    """(state, run config, the test top-1 stored in it or None) of an adapter: an adapter.safetensors written by
    train_vit.py (GIFT or LoRA, the run config in its metadata, checked by adapter_run), or a GIFT authors'
    .pth.tar (a torch zip). Its tensors must be floating point."""
    if not os.path.isfile(path):
        raise UserError(f"adapter {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip archive: torch.save's container, the authors' files
            state, run, metric = read_authors_adapter(path)
            return check_float(path, state), run, metric
    if not str(path).endswith(".safetensors"):
        raise UserError(f"{path}: not an adapter.safetensors (a run of train_vit.py writes OUT/adapter.safetensors)")
    meta = read_safetensors_metadata(path)
    try:
        run = json.loads(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"{path}: no run config (targets, rank) in its metadata; give an adapter.safetensors "
                        f"written by train_vit.py") from None
    run = adapter_run(run, path)
    return check_float(path, read_safetensors(path)), run, run["test_top1"]
