"""A Vision Transformer with timm's module names, and its checkpoint readers: Google's .npz (Flax), timm's .pth /
.safetensors and HF's ViT safetensors, read key by key with shape checks into one model; and the adapter files
train_vit.py writes (adapter.safetensors) or the GIFT authors released (.pth.tar).

    x (B, 3, H, W) -> patches (B, N, D) -> [CLS; patches] + pos (B, 1 + N, D) -> depth x Block -> LayerNorm
    Block: x + attn(norm1(x)), then x + mlp(norm2(x))  (pre-norm; drop_path on both branches when training)
    logits (B, num_classes) = head(CLS token)

Numerics as timm and HF run these weights: LayerNorm eps 1e-6, exact (erf) GELU (Google's Flax code used the tanh
approximation, which differs by at most 5e-4 per activation). Inputs are normalised with mean = std = 0.5.

    from vit import load_vit, ViTConfig, ViT
    model = load_vit("augreg_in21k.safetensors", num_classes=200, drop_path=0.1)  # architecture from the shapes
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
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import UserError, read_safetensors, read_safetensors_metadata, utf8_text

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
# The input: image files, preprocessed as the paper did, and the split files that list them (FGVC, VTAB-1k)

# What one image may cost before resizing: Resize(256) of a 1 x 20000 strip (138 bytes as a PNG) would make it
# 256 x 5 million pixels. Pillow's own guard counts pixels only, and only refuses past 179 million.
MAX_PIXELS, MAX_ASPECT = 1 << 26, 20


def load_image(path, size: int, mode: str, rng=None):
    """The paper's preprocessing, in Pillow, to a (3, size, size) tensor in [-1, 1] (mean = std = 0.5).
    mode "train": Resize(256) RandomCrop(224) HFlip, the crop and flip drawn from rng (a numpy Generator);
    "test": Resize(256) CenterCrop(224) (FGVC, 256/224 of size in general); "resize": straight to size x size
    (VTAB-1k). An image over MAX_PIXELS or MAX_ASPECT is refused before it is decoded."""
    from PIL import Image  # imported here: importing this module stays cheap
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
        root, samples, items = root or os.path.dirname(spec), [], []
        with open(spec, encoding="utf-8") as f, utf8_text(spec):
            if spec.endswith(".json"):
                try:
                    items = [(f"{spec}: entry {k!r}", k, v) for k, v in json.load(f).items()]
                except (json.JSONDecodeError, AttributeError) as e:
                    raise UserError(f"{spec}: not a JSON object {{relative_path: label}} ({e})") from None
            for i, line in enumerate([] if items else f, 1):
                if len(parts := line.strip().rsplit(maxsplit=1)) == 1:
                    raise UserError(f"{spec}:{i}: expected `relative/path label`, got {line.strip()!r}")
                items += [(f"{spec}:{i}", *parts)] if parts else []
        for where, rel, label in items:
            if not isinstance(label, int) and not re.fullmatch(r"\s*[-+]?\d+\s*", str(label)):
                raise UserError(f"{where}: label {label!r} is not an integer")
            if not os.path.isfile(os.path.join(root, rel)):
                raise UserError(f"{where}: image {os.path.join(root, rel)} does not exist")
            samples.append((os.path.join(root, rel), int(label), where))
        if spec.endswith(".json"):
            classes = classes or sorted({label for _, label, _ in samples})
    if not samples:
        flat = os.path.isdir(spec) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(spec))
        raise UserError(f"{spec}: no images{' in class folders (its images lie directly in it)' if flat else ''}; "
                        f"a split is a folder with one sub-folder of images per class, a VPT .json "
                        f"{{relative_path: label}} or a .txt of `relative/path label` lines")
    index = {c: i for i, c in enumerate(classes or [])}
    for _, label, where in samples if classes else []:
        if label not in index:
            raise UserError(f"{where}: class {label!r} is not among the training split's classes")
    return ([(path, index[label], where) for path, label, where in samples] if classes else samples), classes


def check_labels(samples, num_classes):
    """[(path, label)] of read_split's samples; a label outside [0, num_classes) is an error naming its record."""
    for _, label, where in samples:
        if not 0 <= label < num_classes:
            raise UserError(f"{where}: label {label} outside [0, {num_classes})")
    return [(path, label) for path, label, _ in samples]


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
             image_size: int | None = None, drop_path: float = 0.0, log=print) -> ViT:
    """A ViT with the weights of `path` (format detected from the file), ready for add_gift.

    The architecture comes from `config` or, when None, from the weights' shapes (the number of heads from
    Google's kernels, else from the standard sizes). num_classes=None keeps the checkpoint's head (an error
    if it has none or it is all zeros, like the ImageNet-21k files); a number attaches a new head.
    image_size resizes the position embeddings; drop_path sets stochastic depth for training. A missing or
    misshapen backbone weight is an error, and so is an unused one; only the keys of a replaced head (and
    pre_logits / pooler) may be left out, and they are reported (through log). A model merged by train_vit.py
    records its ViTConfig in its metadata: it loads without a config."""
    w = _read_checkpoint(path)
    if config is None and str(path).endswith(".safetensors"):
        vit = json.loads(read_safetensors_metadata(path).get("config", "{}")).get("vit")
        config = ViTConfig(**vit) if isinstance(vit, dict) else None
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
    log(f"loaded {path}: {len(own) - 2 * (num_classes is not None)} tensors"
           f"{f'; new head for {num_classes} classes' if num_classes is not None else ''}"
           f"; unused: {', '.join(unused) if unused else 'none'}")
    return model


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


def read_adapter(path):
    """(state, run config, the test top-1 stored in it or None) of an adapter: an adapter.safetensors written by
    train() (GIFT or LoRA, the run config in its metadata), or a GIFT authors' .pth.tar (a torch zip)."""
    if not os.path.isfile(path):
        raise UserError(f"adapter {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip archive: torch.save's container, the authors' files
            return read_authors_adapter(path)
    if not str(path).endswith(".safetensors"):
        raise UserError(f"{path}: not an adapter.safetensors (a run of train_vit.py writes OUT/adapter.safetensors)")
    try:
        run = json.loads(read_safetensors_metadata(path)["config"])
    except (KeyError, json.JSONDecodeError):
        run = None
    other = run.get("script", "train_vit.py") if isinstance(run, dict) else "train_vit.py"  # older ViT ones: none
    if other != "train_vit.py":
        raise UserError(f"{path} is an adapter of {other}, not of train_vit.py; give one written by train_vit.py")
    if not isinstance(run, dict) or not {"targets", "rank"} <= run.keys():
        raise UserError(f"{path}: no run config (targets, rank) in its metadata; give an adapter.safetensors "
                        f"written by train_vit.py")
    return read_safetensors(path), {"method": "gift", **run}, run.get("test_top1")

