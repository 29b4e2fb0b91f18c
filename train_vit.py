"""GIFT on a Vision Transformer: raw checkpoints in, FGVC / VTAB-1k fine-tuning and cluster maps out.

GIFT (arXiv 2312.00700) fine-tunes a frozen ViT by generating new attn.proj weights W (I + phi psi) with one
Theta = (phi, psi) shared by all blocks (24,576 trainable numbers for ViT-B/16 at rank 16), plus a new head.
This file holds the whole pipeline: a ~100-line ViT with timm's module names, loaders for Google's .npz,
timm's .pth/.safetensors and HF's safetensors, the paper's data pipelines, DDP training with exact resume,
an adapter file, merging, and the paper's cluster maps (C = W phi applied to attn.proj's output tokens).

Run:
    python train_vit.py --demo       # synthetic checkpoint + synthetic images: load, train, eval, draw (<1 min, CPU)
    python train_vit.py --checkpoint ViT-B_16.npz --train CUB_200_2011/train.json \
        --test CUB_200_2011/test.json --root CUB_200_2011/images --lr 1e-4 --weight-decay 1e-4 --out runs/cub \
        --visualize 8
    python train_vit.py --checkpoint ViT-B_16.npz --preset vtab --train vtab-1k/dtd/train800val200.txt \
        --test vtab-1k/dtd/test.txt --num-classes 47 --out runs/dtd
    torchrun --nproc_per_node=4 train_vit.py ...same flags...     # DDP; --batch-size stays the global batch
    python train_vit.py ...same flags... --resume                  # continue from runs/cub/checkpoint.pt, exactly
    python train_vit.py --adapter runs/cub/adapter.safetensors --merge runs/cub/merged.safetensors  # timm names

Numerics: LayerNorm eps 1e-6 and exact (erf) GELU, as timm and HF run these weights (Google's Flax code
used the tanh approximation, which differs by at most 5e-4 per activation). Inputs are normalised with
mean = std = 0.5, i.e. pixels in [-1, 1]. bf16 autocast on GPUs (Theta's master weights stay fp32), fp32 on CPU.
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
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gift import add_gift, cluster_head, gift_layers, gift_state_dict, load_gift_state_dict, merge_gift, \
    parameter_summary
from train_common import UserError, adapter_config, atomic_save, check_finite, check_new_output, check_ranges, cli, \
    fingerprint, lock_out, log_json, print0, progress, read_safetensors, resume_checkpoint, setup_distributed, \
    trim_log, utf8_text, write_safetensors

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
# inputs (checkpoint, splits and classes, compared by content) or another compute precision.
RESUME_FIELDS = ("preset", "image_size", "targets", "rank", "share", "epochs", "warmup", "batch_size", "lr",
                 "weight_decay", "drop_path", "seed")


def split_id(samples):
    """A short hash of a split as the run sees it: its images' paths relative to their common folder, labels."""
    base = os.path.commonpath([path for path, _ in samples])
    listing = [(os.path.relpath(path, base), label) for path, label in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def lr_factor(step, warmup, total):
    """Linear warmup to the base rate over `warmup` steps, then a cosine to zero at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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

    ckpt_path, log_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "log.jsonl")
    if rank == 0:
        lock_out(args.out)
    run = {**{f: getattr(args, f) for f in RESUME_FIELDS}, "num_classes": num_classes,
           "checkpoint": fingerprint(args.checkpoint), "train": split_id(train_samples),
           "test": split_id(test_samples), "autocast": "bfloat16" if device.type == "cuda" else None}
    ckpt = resume_checkpoint(ckpt_path, args.resume, run, ["adapter", "optimizer", "scheduler", "epoch"], device)
    if args.resume and ckpt is None:
        print0(f"--resume: no {ckpt_path} yet, starting a new run")

    model = load_vit(args.checkpoint, num_classes=num_classes, image_size=args.image_size, drop_path=args.drop_path)
    add_gift(model, args.targets, args.rank, args.share)  # freezes the backbone
    model.head.requires_grad_(True)                       # the new head trains with Theta
    model.to(device)
    print0(f"GIFT on {args.targets}, rank {args.rank}, share={args.share}: {parameter_summary(model)}")

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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup * steps, args.epochs * steps))

    start = 0
    if ckpt:
        load_gift_state_dict(model, ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"]
        print0(f"resumed from {ckpt_path}: {start} of {args.epochs} epochs done")
    if rank == 0:  # keep the log lines of the epochs the checkpoint holds (all of them, or none on a new run)
        trim_log(log_path, "epoch", start)

    # plain DDP suits a Theta shared by every block: autograd sums its gradient over the blocks before DDP's
    # hook fires once per step, and the frozen backbone is not synchronised at all
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
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
            with autocast():
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # all ranks': DDP averaged the grads
            check_finite(f"epoch {epoch + 1}, step {i + 1}", kept, loss=loss, gradient_norm=norm)
            opt.step()
            sched.step()
            loss_sum += torch.stack([loss.detach().float() * len(y), torch.tensor(float(len(y)), device=device)])
        if world > 1:
            dist.all_reduce(loss_sum)
        top1 = evaluate(model, test_loader, device, autocast)
        if rank == 0:
            record = {"epoch": epoch + 1, "train_loss": round((loss_sum[0] / loss_sum[1]).item(), 6),
                      "test_top1": round(top1, 4), "lr": sched.get_last_lr()[0],
                      "seconds": round(time.time() - t0, 2)}
            with open(log_path, "a") as f:
                log_json(f, record)
            atomic_save({"adapter": gift_state_dict(model, ["head"]), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "epoch": epoch + 1, "run": run, "args": vars(args)},
                        ckpt_path)
            print(json.dumps(record), flush=True)  # the epoch's bar has closed: a line of its own

    if rank == 0:
        adapter = os.path.join(args.out, "adapter.safetensors")
        config = {**vars(args), "script": "train_vit.py", "vit": asdict(model.config), "classes": classes}
        write_safetensors(adapter, gift_state_dict(model, ["head"]), {"config": json.dumps(config)})
        print(f"adapter (Theta + head + run config): {adapter}")
        if args.visualize:
            maps = visualize(model, test_set, args.visualize, args.vis_layers, os.path.join(args.out, "cluster_maps"))
            print(f"cluster maps of {len(maps)} correctly classified test images: "
                  f"{os.path.dirname(maps[0]) if maps else 'none'}")
    if world > 1:
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts)
        dist.destroy_process_group()
    return model


def merge(args):
    """Base checkpoint + --adapter -> the file --merge: a plain ViT state dict (timm names) with W (I + phi psi).
    The base is --checkpoint, or the one the adapter's run config names."""
    run = adapter_config(args.adapter, "train_vit.py", ["vit", "targets", "rank", "share", "checkpoint"])
    base = args.checkpoint or run["checkpoint"]
    if not os.path.isfile(base):
        raise UserError(f"the base checkpoint {base} (named by {args.adapter}) does not exist: pass --checkpoint")
    if os.path.isdir(args.merge):
        raise UserError(f"--merge {args.merge} is a folder: give the file to write, e.g. "
                        f"{os.path.join(args.merge, 'merged.safetensors')}")
    check_new_output(args.merge, "--merge", {"the base checkpoint": base, "the adapter": args.adapter})
    vit = ViTConfig(**run["vit"])
    model = load_vit(base, vit, num_classes=vit.num_classes, image_size=vit.image_size)
    add_gift(model, run["targets"], run["rank"], run["share"])
    load_gift_state_dict(model, read_safetensors(args.adapter))
    merge_gift(model)
    os.makedirs(os.path.dirname(args.merge) or ".", exist_ok=True)
    write_safetensors(args.merge, model.state_dict(), {"config": json.dumps(run)})
    print(f"merged model (timm names, loads with load_vit): {args.merge}")
    return args.merge


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
                      "--epochs", "5", "--warmup", "1", "--batch-size", "16", "--lr", "3e-3", "--workers", "2",
                      "--visualize", "2"]))
    merge(parse_args(["--adapter", os.path.join(run, "adapter.safetensors"),
                      "--merge", os.path.join(run, "merged.safetensors")]))
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
    p.add_argument("--adapter", help="adapter.safetensors of a run, for --merge")
    p.add_argument("--merge", metavar="OUT", help="write the base checkpoint (the adapter's, or --checkpoint) with "
                   "--adapter merged to the new file OUT (.safetensors, timm names) and exit")
    p.add_argument("--checkpoint", help="Google .npz, timm .pth / .safetensors, or HF ViT .safetensors")
    p.add_argument("--train", help="training split: class-folder directory, VPT .json, or `path label` .txt list")
    p.add_argument("--test", help="split evaluated after every epoch (same forms)")
    p.add_argument("--root", help="where .json / .txt relative paths start; None: the split file's folder")
    p.add_argument("--num-classes", type=int, help="None: the class folders, or the largest training label + 1")
    p.add_argument("--preset", choices=["fgvc", "vtab"], default="fgvc", help="fgvc: Resize(256), RandomCrop(224), "
                   "flip / Resize(256), CenterCrop(224); vtab: resize to 224, no augmentation")
    p.add_argument("--image-size", type=int,
                   help="None: the checkpoint's (another size resizes the position embeddings)")
    p.add_argument("--targets", nargs="+", default=["attn.proj"], help="GIFT layers, by name suffix")
    p.add_argument("--rank", type=int, default=16, help="GIFT rank r")
    p.add_argument("--share", choices=["type", "all"], default="type", help="one Theta per target, or one for all")
    p.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    p.add_argument("--warmup", type=int, default=10, help="warmup epochs")
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay, on >= 2-D parameters only")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image-decoding processes per GPU")
    p.add_argument("--seed", type=int, default=0, help="the new head's and Theta's initialisation, the data order")
    p.add_argument("--out", help="checkpoint, log.jsonl, adapter, cluster maps; None: runs/vit (demo: a temp dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="cluster maps of N correctly classified test images")
    p.add_argument("--vis-layers", type=int, nargs="+", help="block indices drawn by --visualize; None: all")
    args = p.parse_args(argv)
    if not (args.demo or args.merge or (args.checkpoint and args.train and args.test)):
        raise UserError("give --checkpoint, --train and --test (or --demo, or --adapter FILE --merge OUT)")
    if args.merge and not args.adapter:
        raise UserError("--merge OUT needs --adapter (the adapter.safetensors of a run)")
    check_ranges(args, {"epochs": 1, "batch_size": 1, "rank": 1, "warmup": 0, "workers": 0, "visualize": 0})
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
    else:
        train(args)


if __name__ == "__main__":
    main()
