"""GIFT on a Vision Transformer: raw checkpoints in, FGVC / VTAB-1k fine-tuning and cluster maps out.

GIFT (arXiv 2312.00700) fine-tunes a frozen ViT by generating new attn.proj weights W (I + phi psi) with one
Theta = (phi, psi) shared by all blocks (24,576 trainable numbers for ViT-B/16 at rank 16), plus a new head.
This file holds the whole pipeline: a ~100-line ViT with timm's module names, loaders for Google's .npz,
timm's .pth/.safetensors and HF's safetensors, the paper's data pipelines and training protocol, DDP training
with exact resume, an adapter file (also the GIFT authors' released .pth.tar files), merging, the paper's
cluster maps (C = W phi applied to attn.proj's output tokens), and LoRA (--method lora) as the baseline.

Run:
    python train_vit.py --demo       # synthetic checkpoint + synthetic images: load, train, eval, draw (<1 min, CPU)
    python train_vit.py --checkpoint augreg_in21k.safetensors --train CUB_200_2011/train.json \
        --test CUB_200_2011/test.json --root CUB_200_2011/images --lr 1e-4 --weight-decay 1e-4 --out runs/cub \
        --visualize 8
    python train_vit.py --checkpoint augreg_in21k.safetensors --preset vtab --train vtab-1k/dtd/train800val200.txt \
        --test vtab-1k/dtd/test.txt --num-classes 47 --out runs/dtd
    torchrun --nproc_per_node=4 train_vit.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_vit.py ...same flags... --resume                  # continue from runs/cub/checkpoint.pt, exactly
    python train_vit.py ...same flags... --method lora             # the LoRA baseline (attn.proj, r=8)
    python train_vit.py --adapter runs/cub/adapter.safetensors --test CUB_200_2011/test.json \
        --root CUB_200_2011/images --visualize 8                   # evaluate an adapter, draw its cluster maps
    python train_vit.py --adapter runs/cub/adapter.safetensors --merge runs/cub/merged.safetensors  # timm names
    python train_vit.py --adapter CUB_last.pth.tar --checkpoint augreg_in21k.safetensors --test ...  # the authors'

The defaults are the paper's protocol (the authors' timm runs): AdamW, 100 epochs, batch 32, timm's cosine
schedule stepped per epoch with 10 warm-up epochs from 1e-7 and a floor of 1e-6, drop_path 0.1, seed 42, fp32
(no autocast), on vit_base_patch16_224.augreg_in21k. --precision bf16 and --schedule step trade that for speed.
Numerics: LayerNorm eps 1e-6 and exact (erf) GELU, as timm and HF run these weights (Google's Flax code
used the tanh approximation, which differs by at most 5e-4 per activation). Inputs are normalised with
mean = std = 0.5, i.e. pixels in [-1, 1]. Theta's (and LoRA's) master weights stay fp32 under bf16 autocast.
The checkpoint is written atomically after every epoch (an interruption loses at most the epoch in progress);
random numbers are reseeded per (epoch, rank), crops and flips per (seed, epoch, image), so a resumed run
repeats an uninterrupted one bit for bit, whatever --workers. A mistake (a bad flag, file or split, a used --out)
is one line `error: ...` and exit status 2; a non-finite loss stops the run, keeping the last checkpoint.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gift import cluster_head, gift_layers, parameter_summary
from fileio import UserError, atomic_save, fingerprint, read_safetensors, utf8_text, write_safetensors
from harness import adapter_config, adapter_state_dict, add_adapter, check_finite, check_new_output, check_ranges, \
    cli, load_adapter_state_dict, lock_out, log_json, merge_adapter, print0, progress, resume_checkpoint, \
    setup_distributed, trim_log

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
        self.norm1, self.norm2 = nn.LayerNorm(c.dim, eps=1e-6), nn.LayerNorm(c.dim, eps=1e-6)
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
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
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
# Checkpoints: Google .npz, timm .pth / .safetensors, HF safetensors -> timm names, key by key

def _read_checkpoint(path):
    """{key: tensor} from a file, whatever its container: safetensors, npz (a zip of .npy), torch zip/pickle."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        if f.read(9)[8:] == b"{":  # safetensors: 8-byte length, then the JSON header
            return read_safetensors(path)
    try:
        if zipfile.is_zipfile(path) and all(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist()):
            with np.load(path) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, numpy and pickle each raise their own errors for a broken file
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); expected Google .npz, "
                        f"a timm state dict (.pth, .safetensors) or HF ViT safetensors (truncated file?)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a plain state dict {{name: tensor}}")
    return state


def _taker(w, path):
    """take(key) pops w[key]; a missing key is an error naming the file and the key."""
    def take(key):
        if key not in w:
            raise UserError(f"{path}: backbone weight {key!r} is missing")
        return w.pop(key)
    return take


def _depth(keys, pattern):
    return len({k.split(pattern, 1)[1].split("/")[0].split(".")[0] for k in keys if pattern in k})


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


def load_vit(path, config: ViTConfig | None = None, num_classes: int | None = None,
             image_size: int | None = None, drop_path: float = 0.0) -> ViT:
    """A ViT with the weights of `path` (format detected from the file), ready for add_gift.

    The architecture comes from `config` or, when None, from the weights' shapes (the number of heads from
    Google's kernels, else from the standard sizes). num_classes=None keeps the checkpoint's head (an error
    if it has none or it is all zeros, like the ImageNet-21k files); a number attaches a new head.
    image_size resizes the position embeddings; drop_path sets stochastic depth for training. A missing or
    misshapen backbone weight is an error, and so is an unused one; only the keys of a replaced head (and
    pre_logits / pooler) may be left out, and they are reported."""
    w = _read_checkpoint(path)
    if any(k.endswith("embedding/kernel") for k in w):
        sd, heads, unused = _google_to_timm(w, path)
    elif any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in w):
        sd, heads, unused = _hf_to_timm(w, path)
    elif "patch_embed.proj.weight" in w:
        sd, heads, unused = dict(w), 0, {}
    else:
        raise UserError(f"{path}: no ViT patch embedding under Google, timm or HF names; keys: {sorted(w)[:8]}")
    if config is None:
        dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        heads = heads or {s[0]: s[2] for s in SIZES.values()}.get(dim)
        if not heads or "blocks.0.mlp.fc1.weight" not in sd:
            raise UserError(f"{path}: cannot infer the number of heads (dim {dim} is no standard size); pass config")
        config = ViTConfig(image_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * patch, patch_size=patch, dim=dim,
                           depth=_depth(sd, "blocks."), heads=heads, mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0])
    head = sd.get("head.weight")
    if num_classes is None and (head is None or not head.any()):
        raise UserError(f"{path} has no usable classifier head (missing or all zeros): pass num_classes")
    config = replace(config, num_classes=num_classes or head.shape[0], image_size=image_size or config.image_size,
                     drop_path=drop_path)
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
    # other tensor means that the config does not describe this checkpoint (a deeper one would be cut short)
    unused = sorted(unused) + sorted(sd)
    backbone = [k for k in unused if not (k.startswith(("head.", "pre_logits")) or "pooler" in k)]
    if backbone:
        raise UserError(f"{path}: {len(backbone)} tensors have no place in a ViT of {config} ({', '.join(backbone[:3])}"
                        f"{', ...' if len(backbone) > 3 else ''}): this config does not describe the checkpoint")
    print0(f"loaded {path}: {len(own) - 2 * (num_classes is not None)} tensors"
           f"{f'; new head for {num_classes} classes' if num_classes is not None else ''}"
           f"; unused: {', '.join(unused) if unused else 'none'}")
    return model


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


def read_adapter(path):
    """(state, run config, the test top-1 stored in it or None) of an adapter: an adapter.safetensors written by
    train() (GIFT or LoRA, the run config in its metadata), or a GIFT authors' .pth.tar (a torch zip)."""
    if not os.path.isfile(path):
        raise UserError(f"adapter {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip archive: torch.save's container, the authors' files
            return read_authors_adapter(path)
    run = {"method": "gift", **adapter_config(path, "train_vit.py", ["targets", "rank"])}
    return read_safetensors(path), run, run.get("test_top1")


def adapter_model(args):
    """(ViT with --adapter loaded, run config, stored top-1): the base weights from --checkpoint, else the
    checkpoint named in the adapter's run config; the adapter's head."""
    state, run, stored = read_adapter(args.adapter)
    checkpoint = args.checkpoint or run.get("checkpoint")
    if not checkpoint:
        raise UserError(f"{args.adapter} names no base checkpoint: give --checkpoint (it was trained on "
                        f"{run.get('arch')})")
    vit = ViTConfig(**run["vit"]) if "vit" in run else None
    model = load_vit(checkpoint, vit, num_classes=state["head.weight"].shape[0], image_size=vit and vit.image_size)
    add_adapter(model, run)
    load_adapter_state_dict(model, state)
    return model, run, stored


# -----------------------------------------------------------------------------
# Data: class folders, `relative/path label` list files (VTAB-1k), VPT split JSON (FGVC)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_split(spec, root=None, classes=None):
    """[(image path, label, where)] and the classes of one split; `where` names the record for errors.

    spec: a directory with one sub-folder per class (classes: the folder names); a VPT .json
    {relative_path: label} (classes: the sorted labels, mapped to 0..C-1 as VPT does, since FGVC ids need not
    start at 0 or be contiguous); or a VTAB-1k text file of `relative/path label` lines, labels already
    0..C-1 (classes: None). root: where relative paths start (default: the split file's folder).
    classes: the training split's, so that the test split maps to the same labels."""
    if os.path.isdir(spec):
        names = sorted(d for d in os.listdir(spec) if os.path.isdir(os.path.join(spec, d)))
        samples = [(os.path.join(dirpath, f), name, os.path.join(dirpath, f)) for name in names
                   for dirpath, _, files in sorted(os.walk(os.path.join(spec, name)))
                   for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        empty = sorted(set(names) - {label for _, label, _ in samples})
        if empty and classes is None:  # the training split: a folder without images would be a class never seen
            raise UserError(f"{spec}: the class folder(s) {', '.join(empty[:5])} hold no images "
                            f"({' '.join(IMAGE_EXTENSIONS)}): remove them, or add images")
        classes = classes or names
    elif not os.path.isfile(spec):
        raise UserError(f"split {spec} does not exist (give a class-folder directory, .json or .txt)")
    else:
        root, samples = root or os.path.dirname(spec), []
        with open(spec, encoding="utf-8") as f, utf8_text(spec):
            if spec.endswith(".json"):
                try:
                    items = [(f"{spec}: entry {k!r}", k, v) for k, v in json.load(f).items()]
                except (json.JSONDecodeError, AttributeError) as e:
                    raise UserError(f"{spec}: not a JSON object {{relative_path: label}} ({e})") from None
            else:
                items = []
                for i, line in enumerate(f, 1):
                    parts = line.strip().rsplit(maxsplit=1)
                    if len(parts) == 1:
                        raise UserError(f"{spec}:{i}: expected `relative/path label`, got {line.strip()!r}")
                    if parts:
                        items.append((f"{spec}:{i}", parts[0], parts[1]))
        for where, rel, label in items:
            try:
                label = int(label)
            except (TypeError, ValueError):
                raise UserError(f"{where}: label {label!r} is not an integer") from None
            if not os.path.isfile(os.path.join(root, rel)):
                raise UserError(f"{where}: image {os.path.join(root, rel)} does not exist")
            samples.append((os.path.join(root, rel), label, where))
        if spec.endswith(".json"):
            classes = classes or sorted({label for _, label, _ in samples})
    if not samples:
        flat = os.path.isdir(spec) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(spec))
        raise UserError(f"{spec}: no images{' in class folders (its images lie directly in it)' if flat else ''}; "
                        f"a split is a folder with one sub-folder of images per class, a VPT .json "
                        f"{{relative_path: label}} or a .txt of `relative/path label` lines")
    if classes is None:
        return samples, None
    index = {c: i for i, c in enumerate(classes)}
    for _, label, where in samples:
        if label not in index:
            raise UserError(f"{where}: class {label!r} is not among the training split's classes")
    return [(path, index[label], where) for path, label, where in samples], classes


def check_labels(samples, num_classes):
    """[(path, label)] of read_split's samples; a label outside [0, num_classes) is an error naming its record."""
    for _, label, where in samples:
        if not 0 <= label < num_classes:
            raise UserError(f"{where}: label {label} outside [0, {num_classes})")
    return [(path, label) for path, label, _ in samples]


# What one image may cost before resizing: Resize(256) of a 1 x 20000 strip (138 bytes as a PNG) would make it
# 256 x 5 million pixels. Pillow's own guard counts pixels only, and only refuses past 179 million.
MAX_PIXELS, MAX_ASPECT = 1 << 26, 20


def load_image(path, size: int, mode: str, rng=None):
    """The paper's preprocessing, in Pillow, to a (3, size, size) tensor in [-1, 1] (mean = std = 0.5).
    mode "train": Resize(256) RandomCrop(224) HFlip, the crop and flip drawn from rng (a numpy Generator);
    "test": Resize(256) CenterCrop(224) (FGVC, 256/224 of size in general); "resize": straight to size x size
    (VTAB-1k). An image over MAX_PIXELS or MAX_ASPECT is refused before it is decoded."""
    from PIL import Image  # imported here, in the DataLoader workers: importing this module stays cheap
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
                raise UserError(f"image {path}: {w} x {h} pixels is over the limit of {MAX_PIXELS} pixels and an "
                                f"aspect ratio of {MAX_ASPECT}:1 (what decoding and resizing it may cost); shrink "
                                f"or crop it, or leave it out of the split")
            im = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None
    if mode == "resize":
        im = im.resize((size, size), Image.BILINEAR)
    else:
        short, (w, h) = round(size * 256 / 224), im.size
        w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision's Resize(int)
        im = im.resize((w, h), Image.BILINEAR)
        if mode == "train":
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        else:
            top, left = round((h - size) / 2), round((w - size) / 2)
        im = im.crop((left, top, left + size, top + size))
        if mode == "train" and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # (3, size, size)


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples, size, mode, seed=0):
        self.samples, self.size, self.mode, self.seed, self.epoch = samples, size, mode, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        # the crop and flip of sample i depend on (seed, epoch, i) alone, not on which worker or process decodes
        # it: a run resumed with another --workers (its default is the machine's CPU count) repeats them exactly
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return load_image(path, self.size, self.mode, rng), label


# -----------------------------------------------------------------------------
# Training

# Settings that fix the training trajectory: --resume refuses a checkpoint written with others, and with other
# inputs (checkpoint, starting adapter, splits and classes: compared by content, so a moved input is the same).
RESUME_FIELDS = ("preset", "image_size", "method", "targets", "rank", "share", "lora_alpha", "epochs", "warmup",
                 "batch_size", "lr", "warmup_lr", "min_lr", "schedule", "weight_decay", "drop_path", "seed",
                 "precision")


def split_id(samples):
    """A short hash of a split as the run sees it: its images' paths relative to their common folder, labels."""
    base = os.path.commonpath([path for path, _ in samples])
    listing = [(os.path.relpath(path, base), label) for path, label in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


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
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def train(args):
    rank, world, local_rank, device = setup_distributed()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be divisible by {world} processes")
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    torch.manual_seed(args.seed)  # the same new head and Theta on every rank
    form = lambda spec: "folders" if os.path.isdir(spec) else os.path.splitext(spec)[1]  # noqa: E731
    if form(args.train) != form(args.test):
        raise UserError(f"--train {args.train} and --test {args.test} must have the same form (labels map alike)")
    train_samples, classes = read_split(args.train, args.root)
    test_samples, _ = read_split(args.test, args.root, classes)
    num_classes = args.num_classes or (len(classes) if classes else 1 + max(s[1] for s in train_samples))
    train_samples, test_samples = check_labels(train_samples, num_classes), check_labels(test_samples, num_classes)
    if len({label for _, label in train_samples}) < 2:  # a 1-way head is 100% right whatever it learns
        raise UserError(f"--train {args.train}: every image has the same label; a classifier needs two classes or more")

    init = None
    if args.adapter:  # its method, targets and rank, and its weights as the starting point
        init, run, _ = read_adapter(args.adapter)
        for k in ("method", "targets", "rank", "share", "lora_alpha"):
            setattr(args, k, run.get(k, getattr(args, k)))
        if init["head.weight"].shape[0] != num_classes:  # another task: the adapter alone, a new head
            init = {k: v for k, v in init.items() if not k.startswith("head.")}

    ckpt_path, log_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "log.jsonl")
    if rank == 0:
        lock_out(args.out)
    settings = {**{f: getattr(args, f) for f in RESUME_FIELDS}, "num_classes": num_classes,
                "checkpoint": fingerprint(args.checkpoint), "adapter": args.adapter and fingerprint(args.adapter),
                "train": split_id(train_samples), "test": split_id(test_samples)}
    ckpt = resume_checkpoint(ckpt_path, args.resume, settings, ["adapter", "optimizer", "epoch"], device)
    if args.resume and ckpt is None:
        print0(f"--resume: no {ckpt_path} yet, starting a new run")

    model = load_vit(args.checkpoint, num_classes=num_classes, image_size=args.image_size, drop_path=args.drop_path)
    n_adapter = add_adapter(model, vars(args))  # freezes the backbone
    if init is not None:
        load_adapter_state_dict(model, init)
        print0(f"starting from {args.adapter}" + ("" if "head.weight" in init else
                                                  " (its head has another class count: a new head)"))
    model.head.requires_grad_(True)  # the new head trains with the adapter
    model.to(device)
    print0(f"{args.method} on {args.targets}, rank {args.rank}" + (f", share={args.share}" if args.method == "gift"
           else f", alpha {args.lora_alpha:g}") + f": {n_adapter:,} adapter parameters; {parameter_summary(model)}")

    size = model.config.image_size
    modes = ("train", "test") if args.preset == "fgvc" else ("resize", "resize")
    train_set = ImageDataset(train_samples, size, modes[0], args.seed)
    test_set = ImageDataset(test_samples, size, modes[1])
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    kw = dict(batch_size=args.batch_size // world, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, **kw)
    # every test image exactly once over all ranks (DistributedSampler would pad with repeats)
    test_share = torch.utils.data.Subset(test_set, range(rank, len(test_set), world))
    test_loader = torch.utils.data.DataLoader(test_share, **kw)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr)
    steps = len(train_loader)
    unit = 1 if args.schedule == "epoch" else steps  # schedule time per epoch: timm's t_in_epochs, or per step

    start = 0
    if ckpt:
        load_adapter_state_dict(model, ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
        print0(f"resumed from {ckpt_path}: {start} of {args.epochs} epochs done")
    if rank == 0:  # keep the log lines of the epochs the checkpoint holds (all of them, or none on a new run)
        trim_log(log_path, "epoch", start)

    # plain DDP suits a Theta shared by every block: autograd sums its gradient over the blocks before DDP's
    # hook fires once per step, and the frozen backbone is not synchronised at all
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = autocast_for(args, device)
    for epoch in range(start, args.epochs):
        # reseed per (epoch, rank): drop_path is the same whether or not the run was resumed, so the checkpoint
        # needs no RNG state (and each rank still draws its own numbers); crops and flips: ImageDataset
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        sampler.set_epoch(epoch)
        train_set.epoch = epoch
        model.train()
        kept = f"the checkpoint of epoch {epoch} ({ckpt_path}) is kept" if epoch else "nothing was saved"
        t0, loss_sum = time.time(), torch.zeros(2, device=device)  # sum of losses, samples
        bar = progress(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t = epoch if args.schedule == "epoch" else epoch * steps + i
            lr = cosine_lr(t, args.lr, args.epochs * unit, args.warmup * unit, args.warmup_lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast():
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # no clipping: the norm, of DDP's averaged grads
            check_finite(f"epoch {epoch + 1}, step {i + 1}", kept, loss=loss, gradient_norm=norm)
            opt.step()
            loss_sum += torch.stack([loss.detach().float() * len(y), torch.tensor(float(len(y)), device=device)])
        if world > 1:
            dist.all_reduce(loss_sum)
        top1 = evaluate(model, test_loader, device, autocast)
        if rank == 0:
            record = {"epoch": epoch + 1, "train_loss": round((loss_sum[0] / loss_sum[1]).item(), 6),
                      "test_top1": round(top1, 4), "lr": lr, "seconds": round(time.time() - t0, 2),
                      "method": args.method, "adapter_params": n_adapter}
            with open(log_path, "a") as f:
                log_json(f, record)
            atomic_save({"adapter": adapter_state_dict(model, ["head"]), "optimizer": opt.state_dict(),
                         "epoch": epoch + 1, "run": settings, "args": vars(args)}, ckpt_path)
            print(json.dumps(record), flush=True)  # the epoch's bar has closed: a line of its own
    del ddp  # its Reducer holds the process group: freed after destroy_process_group, gloo's threads can hang

    if rank == 0:
        adapter = os.path.join(args.out, "adapter.safetensors")
        top1 = json.loads(open(log_path).readlines()[-1])["test_top1"] if args.epochs else None
        config = {**vars(args), "script": "train_vit.py", "vit": asdict(model.config), "classes": classes,
                  "test_top1": top1, "adapter_params": n_adapter}
        write_safetensors(adapter, adapter_state_dict(model, ["head"]), {"config": json.dumps(config)})
        print(f"adapter ({args.method} + head + run config): {adapter}")
        if args.visualize:
            maps = visualize(model, test_set, args.visualize, args.vis_layers, os.path.join(args.out, "cluster_maps"))
            print(f"cluster maps of {len(maps)} correctly classified test images: "
                  f"{os.path.dirname(maps[0]) if maps else 'none'}")
    if world > 1:
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts)
        dist.destroy_process_group()
    return model


def merge(args):
    """--adapter + its base checkpoint -> --merge OUT: a plain ViT state dict (timm names), safetensors, whose
    targeted weights are W (I + phi psi) (GIFT) or W + (alpha/r) B A (LoRA). OUT must be new."""
    if os.path.isdir(args.merge):
        raise UserError(f"--merge {args.merge} is a folder: give the file to write, e.g. "
                        f"{os.path.join(args.merge, 'merged.safetensors')}")
    _, run, _ = read_adapter(args.adapter)  # small: read first, to check OUT against its base before loading
    check_new_output(args.merge, "--merge", {"the base checkpoint": args.checkpoint or run.get("checkpoint"),
                                             "the adapter": args.adapter})
    model, run, _ = adapter_model(args)
    os.makedirs(os.path.dirname(args.merge) or ".", exist_ok=True)
    write_safetensors(args.merge, merge_adapter(model).state_dict(), {"config": json.dumps(run)})
    print(f"merged model (timm names, loads with load_vit): {args.merge}")
    return args.merge


def evaluate_adapter(args):
    """--adapter evaluated on --test without training: top-1 beside the one stored in the adapter, and with
    --visualize its cluster maps (GIFT)."""
    rank, world, _, device = setup_distributed()
    model, run, stored = adapter_model(args)
    if args.visualize and run["method"] != "gift":
        raise UserError(f"--visualize draws GIFT's cluster maps; {args.adapter} is a {run['method']} adapter")
    model.to(device)
    samples, classes = read_split(args.test, args.root, run.get("classes"))
    if run.get("classes") is None and classes and len(classes) != model.config.num_classes:
        raise UserError(f"{args.test} has {len(classes)} classes and the adapter's head {model.config.num_classes}: "
                        f"its labels would not map to the head's as in training")
    mode = "test" if run.get("preset", args.preset) == "fgvc" else "resize"  # the run's preprocessing
    test_set = ImageDataset(check_labels(samples, model.config.num_classes), model.config.image_size, mode)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)),
                                         batch_size=max(1, args.batch_size // world), num_workers=args.workers)
    top1 = evaluate(model, loader, device, autocast_for(args, device))
    print0(f"{args.adapter} ({run['method']}, rank {run['rank']}) on {args.test}: top-1 {top1:.2f}% of "
           f"{len(test_set)} images; stored in the adapter: " + (f"{stored:.2f}%" if stored is not None else "none"))
    if args.visualize and rank == 0:
        maps = visualize(model, test_set, args.visualize, args.vis_layers, os.path.join(args.out, "cluster_maps"))
        print(f"cluster maps of {len(maps)} correctly classified test images: "
              f"{os.path.dirname(maps[0]) if maps else 'none'}")
    return top1


# -----------------------------------------------------------------------------
# Evaluation: top-1 accuracy, and the paper's cluster maps (interpretability)

@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Top-1 accuracy (%) over all ranks' shares of the split."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, seen
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[1]).item()


def _jet(v):
    """(...) values in [0, 1] -> (..., 3) RGB in [0, 255], the 'jet' colour map (dark blue at 0, red at 1)."""
    return np.stack([np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)], axis=-1) * 255


@torch.no_grad()
def visualize(model, dataset, n, layers, out_dir):
    """PNG grids for n correctly classified images of `dataset` (the paper shows only those), taken in a
    fixed shuffled order: one row per chosen GIFT layer (block indices `layers`, None = all), the image and
    then its r maps.
    Map k of a layer: its output tokens y (N, d_out), CLS dropped, times column k of C = W phi (d_out, r),
    upsampled bilinearly to the image, min-max normalised, zeroed under 0.5, overlaid as a heat map (alpha 0.6)."""
    from PIL import Image, ImageDraw
    c, device = model.config, next(model.parameters()).device
    g, tile = c.image_size // c.patch_size, max(c.image_size, 128)  # tiles of at least 128 px stay readable
    chosen = [(name, layer) for name, layer in gift_layers(model)
              if name.startswith("blocks.") and (layers is None or int(name.split(".")[1]) in layers)]
    if not chosen:
        raise ValueError(f"no GIFT layer in blocks {layers}: {[name for name, _ in gift_layers(model)]}")
    outputs, heads = {}, {name: cluster_head(layer) for name, layer in chosen}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, layer in chosen]
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
        r = max(h.shape[1] for h in heads.values())
        canvas = Image.new("RGB", ((r + 1) * tile, len(chosen) * (tile + 14)), "white")
        draw = ImageDraw.Draw(canvas)
        for row, (name, _) in enumerate(chosen):
            maps = (outputs[name][0, 1:].float() @ heads[name]).T.reshape(-1, 1, g, g)  # (N,d_out)@(d_out,r)
            maps = F.interpolate(maps, size=(tile, tile), mode="bilinear", align_corners=False)[:, 0]
            lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
            maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
            maps[maps < 0.5] = 0
            top = row * (tile + 14)
            draw.text((2, top + 1), name, fill="black")
            canvas.paste(Image.fromarray(base.astype(np.uint8)), (0, top + 14))
            for k, m in enumerate(maps.cpu().numpy()):
                heat = 0.4 * base + 0.6 * _jet(m)
                canvas.paste(Image.fromarray(heat.round().astype(np.uint8)), ((k + 1) * tile, top + 14))
                draw.text(((k + 1) * tile + 2, top + 1), f"cluster {k}", fill="black")
        written.append(os.path.join(out_dir, f"test{i:05d}_label{y}.png"))
        canvas.save(written[-1])
    for hook in hooks:
        hook.remove()
    return written


# -----------------------------------------------------------------------------
# Demo: a synthetic checkpoint and data set, then the real pipeline

def make_demo(root):
    """Writes a random ViT (dim 64, depth 4, patch 8, 64 px) in Google's .npz layout, with the pre_logits and
    all-zero head of the ImageNet-21k files, and generated images of 4 coloured-square classes in class
    folders. Returns (checkpoint, train dir, test dir)."""
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    D, depth, H, M, P, S = 64, 4, 4, 128, 8, 64
    dense = lambda i, *o: rng.normal(0, i ** -0.5, (i, *o)).astype(np.float32)  # noqa: E731
    zeros, ones = (lambda *s: np.zeros(s, np.float32)), (lambda *s: np.ones(s, np.float32))
    w = {"embedding/kernel": dense(P * P * 3, D).reshape(P, P, 3, D), "embedding/bias": zeros(D),
         "cls": dense(D, D)[:1, None, :] * 0.1,
         "Transformer/posembed_input/pos_embedding": dense(D, 1 + (S // P) ** 2).T[None] * 0.1,
         "Transformer/encoder_norm/scale": ones(D), "Transformer/encoder_norm/bias": zeros(D),
         "pre_logits/kernel": dense(D, D), "pre_logits/bias": zeros(D),
         "head/kernel": zeros(D, 10), "head/bias": zeros(10)}
    for i in range(depth):
        b, a = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            w[a + n + "/kernel"], w[a + n + "/bias"] = dense(D, H, D // H), zeros(H, D // H)
        w[a + "out/kernel"], w[a + "out/bias"] = dense(D, D).reshape(H, D // H, D), zeros(D)
        for n in ("LayerNorm_0", "LayerNorm_2"):
            w[b + n + "/scale"], w[b + n + "/bias"] = ones(D), zeros(D)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = dense(D, M), zeros(M)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = dense(M, D), zeros(D)
    checkpoint = os.path.join(root, "ViT-demo.npz")
    np.savez(checkpoint, **w)
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
    train(parse_args(["--checkpoint", checkpoint, "--train", train_dir, "--test", test_dir, "--out", run,
                      "--epochs", "5", "--warmup", "1", "--schedule", "step", "--batch-size", "16", "--lr", "3e-3",
                      "--workers", "2", "--visualize", "2"]))
    merge(parse_args(["--adapter", os.path.join(run, "adapter.safetensors"), "--merge",
                      os.path.join(run, "merged.safetensors")]))
    print(f"demo done in {time.time() - t0:.0f} s (SYNTHETIC data). Everything is in {root}:\n"
          f"  {checkpoint}, {train_dir}, {test_dir}: the synthetic checkpoint and images\n"
          f"  {run}: log.jsonl (one line per epoch), checkpoint.pt (resume), adapter.safetensors, "
          f"merged.safetensors, cluster_maps/*.png")


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GIFT fine-tuning of a ViT (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", action="store_true", help="synthetic checkpoint and data in a temp dir (or --out), "
                   "then the whole pipeline: under a minute on a CPU")
    p.add_argument("--adapter", metavar="FILE", help="an adapter.safetensors of train_vit.py (GIFT or LoRA) or a GIFT "
                   "authors' .pth.tar: with --test alone, evaluated (and drawn by --visualize); with --merge, merged; "
                   "with --train, the start of the run (its method, targets and rank)")
    p.add_argument("--merge", metavar="OUT", help="write --adapter merged into its base weights (from the adapter's "
                   "config, or --checkpoint) to OUT (.safetensors, timm names) and exit")
    p.add_argument("--checkpoint", help="Google .npz, timm .pth / .safetensors, or HF ViT .safetensors; the paper's: "
                   "vit_base_patch16_224.augreg_in21k (see README)")
    p.add_argument("--train", help="training split: class-folder directory, VPT .json, or `path label` .txt list")
    p.add_argument("--test", help="split evaluated after every epoch (same forms)")
    p.add_argument("--root", help="where .json / .txt relative paths start; None: the split file's folder")
    p.add_argument("--num-classes", type=int, help="None: the class folders, or the largest training label + 1")
    p.add_argument("--preset", choices=["fgvc", "vtab"], default="fgvc", help="fgvc: Resize(256), RandomCrop(224), "
                   "flip / Resize(256), CenterCrop(224); vtab: resize to 224, no augmentation")
    p.add_argument("--image-size", type=int,
                   help="None: the checkpoint's (another size resizes the position embeddings)")
    p.add_argument("--method", choices=["gift", "lora"], default="gift", help="the adapter trained")
    p.add_argument("--targets", nargs="+", default=["attn.proj"], help="adapted layers, by name suffix")
    p.add_argument("--rank", type=int, help="rank r; None: the paper's, 16 for GIFT, 8 for LoRA")
    p.add_argument("--share", choices=["type", "all"], default="type", help="GIFT: one Theta per target, or one "
                   "for all")
    p.add_argument("--lora-alpha", type=float, default=1.0, help="LoRA: the update is (alpha/r) B A; "
                   "1 is loralib's default, which the authors' ViT LoRA runs used")
    p.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    p.add_argument("--warmup", type=int, default=10, help="warmup epochs")
    p.add_argument("--warmup-lr", type=float, default=1e-7, help="learning rate the warmup starts from")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the cosine's floor")
    p.add_argument("--schedule", choices=["epoch", "step"], default="epoch", help="the learning rate changes once "
                   "per epoch (timm's default, the paper's runs) or at every step")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32: no autocast, the paper's "
                   "(TF32 matmuls on GPUs that have them, as the authors' script); bf16: autocast, faster")
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, timm's cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay, on >= 2-D parameters only")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image-decoding processes per GPU")
    p.add_argument("--seed", type=int, default=42, help="the new head's and the adapter's initialisation, the data "
                   "order")
    p.add_argument("--out", help="checkpoint, log.jsonl, adapter, cluster maps; None: runs/vit (demo: a temp dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="cluster maps of N correctly classified test images")
    p.add_argument("--vis-layers", type=int, nargs="+", help="block indices drawn by --visualize; None: all")
    args = p.parse_args(argv)
    # a user mistake: one line, exit status 2 (main's @cli), before anything is loaded
    if args.merge and not args.adapter:
        raise UserError("--merge OUT needs --adapter FILE")
    if not (args.demo or args.merge or (args.adapter and args.test and not args.train)
            or (args.checkpoint and args.train and args.test)):
        raise UserError("give --checkpoint, --train and --test (or --adapter FILE with --test or --merge OUT, or "
                        "--demo)")
    if args.adapter:
        if not os.path.isfile(args.adapter):
            raise UserError(f"--adapter {args.adapter}: no such file")
        with open(args.adapter, "rb") as f:
            if f.read(4) == b"PK\x03\x04" and not args.checkpoint:
                raise UserError(f"--adapter {args.adapter} is a torch file (the GIFT authors' format), which names no "
                                f"base weights: give --checkpoint (vit_base_patch16_224.augreg_in21k for theirs)")
    if args.visualize and args.method == "lora" and args.train:
        raise UserError("--visualize draws GIFT's cluster maps; a LoRA run has none")
    args.rank = args.rank or {"gift": 16, "lora": 8}[args.method]
    check_ranges(args, {"epochs": 0, "batch_size": 1, "rank": 1, "warmup": 0, "workers": 0, "visualize": 0})
    if args.out is None and not args.demo:
        args.out = "runs/vit"
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        demo(args)
    elif args.merge:
        merge(args)
    elif args.train:
        train(args)
    else:
        evaluate_adapter(args)


if __name__ == "__main__":
    main()
