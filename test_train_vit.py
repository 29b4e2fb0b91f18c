"""Tests for train_vit.py: the ViT against raw kernels and transformers, the checkpoint readers, the data
readers, training (resume, torchrun), merging and the cluster maps. Tiny models, CPU."""
import argparse
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_vit
from conftest import user_error
from gift import add_gift
from fileio import UserError, read_safetensors, write_safetensors
from train_vit import ViT, ViTConfig, load_vit, read_split, resize_pos_embed

pytestmark = pytest.mark.usefixtures("one_thread")

_vit_cfg = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=5)


def _vit_google_arrays(c=_vit_cfg, seed=0):
    """Random weights under Google's Flax names and layouts (kernels (in, out), q/k/v (D, heads, hd))."""
    g = np.random.default_rng(seed)
    r = lambda *s: g.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    D, H, hd, M, P, n = c.dim, c.heads, c.dim // c.heads, c.mlp_dim, c.patch_size, (c.image_size // c.patch_size) ** 2
    w = {"embedding/kernel": r(P, P, 3, D), "embedding/bias": r(D), "cls": r(1, 1, D),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + n, D), "Transformer/encoder_norm/scale": 1 + r(D),
         "Transformer/encoder_norm/bias": r(D), "head/kernel": r(D, c.num_classes), "head/bias": r(c.num_classes),
         "pre_logits/kernel": r(D, D), "pre_logits/bias": r(D)}
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            w[a + name + "/kernel"], w[a + name + "/bias"] = r(D, H, hd), r(H, hd)
        w[a + "out/kernel"], w[a + "out/bias"] = r(H, hd, D), r(D)
        for name in ("LayerNorm_0", "LayerNorm_2"):
            w[b + name + "/scale"], w[b + name + "/bias"] = 1 + r(D), r(D)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = r(D, M), r(M)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = r(M, D), r(D)
    return w


def _vit_reference_forward(w, x, depth, eps=1e-6):
    """ViT logits straight from the raw Flax kernels, float64, einsum by einsum (no name mapping)."""
    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    k = t["embedding/kernel"]                                              # (p, p, 3, D)
    p, B, _, Hh, Ww = k.shape[0], *x.shape
    patches = x.reshape(B, 3, Hh // p, p, Ww // p, p)                      # (B, c, i, y, j, x)
    h = torch.einsum("bciyjx,yxcd->bijd", patches, k).reshape(B, -1, k.shape[-1]) + t["embedding/bias"]
    h = torch.cat([t["cls"].expand(B, -1, -1), h], 1) + t["Transformer/posembed_input/pos_embedding"]
    ln = lambda v, n: F.layer_norm(v, v.shape[-1:], t[n + "/scale"], t[n + "/bias"], eps)  # noqa: E731
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        y = ln(h, b + "LayerNorm_0")
        q, kk, v = (torch.einsum("btd,dhk->bhtk", y, t[a + n + "/kernel"]) + t[a + n + "/bias"][None, :, None]
                    for n in ("query", "key", "value"))
        att = torch.softmax(q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        h = h + torch.einsum("bhtk,hkd->btd", att @ v, t[a + "out/kernel"]) + t[a + "out/bias"]
        y = ln(h, b + "LayerNorm_2")
        y = F.gelu(y @ t[b + "MlpBlock_3/Dense_0/kernel"] + t[b + "MlpBlock_3/Dense_0/bias"])  # exact erf GELU
        h = h + y @ t[b + "MlpBlock_3/Dense_1/kernel"] + t[b + "MlpBlock_3/Dense_1/bias"]
    h = ln(h, "Transformer/encoder_norm")
    return h[:, 0] @ t["head/kernel"] + t["head/bias"]


def _vit_save_npz(path, w, prefix=""):
    np.savez(path, **{prefix + k: v for k, v in w.items()})
    return str(path)


@pytest.fixture(scope="module")
def _vit_demo(tmp_path_factory, one_thread):
    """The demo's synthetic npz checkpoint and image folders, and one 2-epoch run with cluster maps."""
    root = tmp_path_factory.mktemp("vit_demo")
    ckpt, train_dir, test_dir = train_vit.make_demo(str(root))
    args = ["--checkpoint", ckpt, "--train", train_dir, "--test", test_dir, "--epochs", "2", "--warmup", "0",
            "--batch-size", "16", "--lr", "3e-3", "--workers", "0"]
    model = train_vit.train(train_vit.parse_args(args + ["--out", str(root / "run"), "--visualize", "1"]))
    return dict(root=root, ckpt=ckpt, train=train_dir, test=test_dir, args=args, model=model)


def test_vit_npz_matches_raw_kernel_forward(tmp_path):
    w = _vit_google_arrays()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    ref = _vit_reference_forward(w, x, _vit_cfg.depth)
    for prefix in ("", "opt/target/", "params/"):
        model = load_vit(_vit_save_npz(tmp_path / f"m{len(prefix)}.npz", w, prefix)).double().eval()
        assert model.config == _vit_cfg  # dims, depth, heads (from the q kernel), classes, image size inferred
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-10)


def _vit_timm_and_hf(w):
    """The same weights as timm and HF state dicts, written out by hand from the Flax arrays."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    D = t["cls"].shape[-1]
    pairs = [("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight",
              t["embedding/kernel"].permute(3, 2, 0, 1)),
             ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias", t["embedding/bias"]),
             ("cls_token", "vit.embeddings.cls_token", t["cls"]),
             ("pos_embed", "vit.embeddings.position_embeddings", t["Transformer/posembed_input/pos_embedding"]),
             ("norm.weight", "vit.layernorm.weight", t["Transformer/encoder_norm/scale"]),
             ("norm.bias", "vit.layernorm.bias", t["Transformer/encoder_norm/bias"]),
             ("head.weight", "classifier.weight", t["head/kernel"].T), ("head.bias", "classifier.bias", t["head/bias"])]
    timm, hf = {}, {}
    for i in range(_vit_cfg.depth):
        b, tb, hb = f"Transformer/encoderblock_{i}/", f"blocks.{i}.", f"vit.encoder.layer.{i}."
        a = b + "MultiHeadDotProductAttention_1/"
        q, k, v = (t[a + n + "/kernel"].reshape(D, D).T for n in ("query", "key", "value"))
        qb, kb, vb = (t[a + n + "/bias"].reshape(D) for n in ("query", "key", "value"))
        timm[tb + "attn.qkv.weight"], timm[tb + "attn.qkv.bias"] = torch.cat([q, k, v]), torch.cat([qb, kb, vb])
        for n, weight, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            hf[f"{hb}attention.attention.{n}.weight"], hf[f"{hb}attention.attention.{n}.bias"] = weight, bias
        for tn, hn, flax, weight in (("attn.proj", "attention.output.dense", a + "out", t[a + "out/kernel"].reshape(D, D).T),
                                     ("mlp.fc1", "intermediate.dense", b + "MlpBlock_3/Dense_0", None),
                                     ("mlp.fc2", "output.dense", b + "MlpBlock_3/Dense_1", None)):
            weight = t[flax + "/kernel"].T if weight is None else weight
            pairs += [(f"{tb}{tn}.weight", f"{hb}{hn}.weight", weight), (f"{tb}{tn}.bias", f"{hb}{hn}.bias", t[flax + "/bias"])]
        for tn, hn, flax in (("norm1", "layernorm_before", "LayerNorm_0"), ("norm2", "layernorm_after", "LayerNorm_2")):
            pairs += [(f"{tb}{tn}.weight", f"{hb}{hn}.weight", t[b + flax + "/scale"]),
                      (f"{tb}{tn}.bias", f"{hb}{hn}.bias", t[b + flax + "/bias"])]
    for tk, hk, tensor in pairs:
        timm[tk], hf[hk] = tensor, tensor
    return {k: v.contiguous() for k, v in timm.items()}, {k: v.contiguous() for k, v in hf.items()}


def test_vit_timm_hf_npz_give_the_same_model(tmp_path):
    w = _vit_google_arrays()
    timm, hf = _vit_timm_and_hf(w)
    torch.save(timm, tmp_path / "timm.pth")
    write_safetensors(str(tmp_path / "timm.safetensors"), timm)
    write_safetensors(str(tmp_path / "hf.safetensors"), hf)
    ref = load_vit(_vit_save_npz(tmp_path / "g.npz", w)).state_dict()
    for name in ("timm.pth", "timm.safetensors", "hf.safetensors"):
        got = load_vit(str(tmp_path / name), _vit_cfg).state_dict()
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    with pytest.raises(ValueError, match="cannot infer the number of heads"):
        load_vit(str(tmp_path / "timm.pth"))  # dim 32 is no standard size: heads are not in timm's weights


def test_vit_matches_transformers_vitmodel(tmp_path):
    transformers = pytest.importorskip("transformers")
    hc = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                image_size=16, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                                num_labels=5)  # HF's eps default is 1e-12; "gelu" is the exact erf GELU used here
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for cls, head in ((transformers.ViTModel, False), (transformers.ViTForImageClassification, True)):
            hf = cls(hc).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(torch.randn_like(p) * 0.1)  # no parameter left at its (often trivial) init
            hf.save_pretrained(tmp_path / cls.__name__)  # the Hub's key names (transformers 5 renames them in memory)
            x = torch.randn(2, 3, 16, 16)
            ours = load_vit(str(tmp_path / cls.__name__ / "model.safetensors"), _vit_cfg,
                            num_classes=None if head else 7).eval()
            with torch.no_grad():
                if head:  # ViTForImageClassification: its own classifier is kept, logits compared
                    torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=2e-5)
                else:
                    torch.testing.assert_close(ours.forward_features(x), hf(pixel_values=x).last_hidden_state,
                                               rtol=0, atol=2e-5)


def test_vit_pos_embed_interpolation(tmp_path):
    D, g = 4, 3
    rows, cols = torch.meshgrid(torch.arange(g * 1.0), torch.arange(g * 1.0), indexing="ij")
    patches = torch.stack([rows, cols, rows * 0 + 2, rows + cols], -1).reshape(1, g * g, D)
    pos = torch.cat([torch.full((1, 1, D), 7.0), patches], 1)
    assert torch.equal(resize_pos_embed(pos, g), pos)
    big = resize_pos_embed(pos, 6)
    assert big.shape == (1, 37, D) and torch.equal(big[:, 0], pos[:, 0])
    grid = big[0, 1:].reshape(6, 6, D)  # row-major: channel 0 grows down the rows, channel 1 along the columns
    assert (grid[1:, :, 0] > grid[:-1, :, 0]).all() and (grid[:, 1:, 1] > grid[:, :-1, 1]).all()
    torch.testing.assert_close(grid[:, :, 0], grid[:, :1, 0].expand(6, 6))  # constant along each row
    torch.testing.assert_close(grid[:, :, 1], grid[:1, :, 1].expand(6, 6))  # constant down each column
    torch.testing.assert_close(grid[..., 2], torch.full((6, 6), 2.0))
    w = _vit_google_arrays()
    model = load_vit(_vit_save_npz(tmp_path / "g.npz", w), image_size=32)  # 4x4 -> 8x8 patches
    want = resize_pos_embed(torch.from_numpy(w["Transformer/posembed_input/pos_embedding"]), 8)
    assert model.config.image_size == 32 and torch.equal(model.pos_embed.detach(), want)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_vit_training_changes_only_theta_and_head(_vit_demo):
    trained = _vit_demo["model"].state_dict()
    with torch.random.fork_rng():
        torch.manual_seed(42)  # what train() draws (--seed's default, the paper's): the new head, then phi
        start = load_vit(_vit_demo["ckpt"], num_classes=4)
        add_gift(start, ["attn.proj"], 16)
    start = start.state_dict()
    assert sorted(trained) == sorted(start)
    changed = sorted(k for k in start if not torch.equal(start[k], trained[k]))
    assert changed == ["gift.attn_proj.phi.weight", "gift.attn_proj.psi.weight", "head.bias", "head.weight"]
    log = [json.loads(line) for line in open(_vit_demo["root"] / "run" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    # per epoch, no warmup: 3e-3 at t=0, then 1e-6 + (3e-3 - 1e-6)(1 + cos(pi / 2)) / 2
    assert [r["lr"] for r in log] == [3e-3, 1e-6 + (3e-3 - 1e-6) / 2]
    assert {(r["method"], r["adapter_params"]) for r in log} == {("gift", 2 * 16 * 64)}


def test_vit_cluster_map_png_written(_vit_demo):
    from PIL import Image
    pngs = sorted((_vit_demo["root"] / "run" / "cluster_maps").glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as im:  # 4 layers x (image + 16 maps), 128 px tiles under 14 px labels
        assert im.size == (17 * 128, 4 * (128 + 14))
        px = np.asarray(im.convert("RGB"), dtype=np.int64)
    image = px[14:142, :128]
    zero = 0.4 * image + 0.6 * np.array([0, 0, 127.5])  # a map value zeroed under 0.5: jet(0) = dark blue
    for k in range(1, 17):
        tile = px[14:142, 128 * k:128 * (k + 1)]
        cold = (np.abs(tile - zero) <= 1).all(-1).mean()
        assert 0.02 < cold < 1  # thresholded at 0.5 after min-max: a part is zero, never all of it


def test_vit_merge_equals_unmerged(_vit_demo, tmp_path):
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    out = train_vit.merge(train_vit.parse_args(["--adapter", adapter, "--merge", str(tmp_path / "m" / "m.st")]))
    assert os.listdir(tmp_path / "m") == ["m.st"]  # written into a temporary sibling, then renamed
    merged = load_vit(out, ViTConfig(image_size=64, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=128)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), _vit_demo["model"].eval()(x), rtol=0, atol=1e-5)
    assert "gift.attn_proj.phi.weight" in read_safetensors(adapter) and len(read_safetensors(adapter)) == 4


def test_vit_resume_equals_uninterrupted(_vit_demo, tmp_path, monkeypatch):
    args = _vit_demo["args"] + ["--epochs", "3"]
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "a")]))
    evaluate, calls = train_vit.evaluate, []

    def crash_in_epoch_2(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a)
    monkeypatch.setattr(train_vit, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    monkeypatch.setattr(train_vit, "evaluate", evaluate)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b"), "--resume"]))
    a, b = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    assert [(r["train_loss"], r["test_top1"]) for r in logs[0]] == [(r["train_loss"], r["test_top1"]) for r in logs[1]]
    with pytest.raises(UserError, match="checkpoint.pt exists: add --resume"):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    with pytest.raises(UserError, match=r"other settings or inputs \(lr 0.003 -> 0.001\)"):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b"), "--resume", "--lr", "1e-3"]))


def test_vit_bad_checkpoints_raise(tmp_path):
    w = _vit_google_arrays()
    good = _vit_save_npz(tmp_path / "g.npz", w)
    data = open(good, "rb").read()
    open(tmp_path / "cut.npz", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint .*cut.npz"):
        load_vit(str(tmp_path / "cut.npz"))
    timm, _ = _vit_timm_and_hf(w)
    torch.save(timm, tmp_path / "t.pth")
    data = open(tmp_path / "t.pth", "rb").read()
    open(tmp_path / "cut.pth", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint .*cut.pth"):
        load_vit(str(tmp_path / "cut.pth"), _vit_cfg)
    write_safetensors(str(tmp_path / "t.safetensors"), timm)
    data = open(tmp_path / "t.safetensors", "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(data[:-100])
    with pytest.raises(ValueError, match="cut.safetensors: tensor .* outside the"):
        load_vit(str(tmp_path / "cut.safetensors"), _vit_cfg)
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.weight' has shape \(64, 32\), expected \(48, 32\)"):
        load_vit(good, ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_dim=48))
    with pytest.raises(ValueError, match="backbone weight 'blocks.2.norm1.weight' is missing"):
        load_vit(good, ViTConfig(image_size=16, patch_size=4, dim=32, depth=3, heads=4, mlp_dim=64))
    with pytest.raises(UserError, match=r"g.npz: 12 tensors have no place in a ViT of .*depth=1.* \(blocks.1.attn.proj"
                                        r".bias, .*\): this config does not describe the checkpoint"):
        load_vit(good, ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, heads=4, mlp_dim=64))  # never cut short
    write_safetensors(str(tmp_path / "fc_norm.safetensors"), {**timm, "fc_norm.weight": torch.ones(32)})
    with pytest.raises(UserError, match=r"1 tensors have no place .*\(fc_norm.weight\)"):
        load_vit(str(tmp_path / "fc_norm.safetensors"), _vit_cfg)
    assert load_vit(good, num_classes=3).head.weight.shape == (3, 32)  # a replaced head and pre_logits: reported
    del w["Transformer/encoderblock_1/LayerNorm_2/scale"]
    with pytest.raises(ValueError, match="'Transformer/encoderblock_1/LayerNorm_2/scale' is missing"):
        load_vit(_vit_save_npz(tmp_path / "m.npz", w))
    w = _vit_google_arrays()
    w["head/kernel"][:] = 0  # the ImageNet-21k files' head: not usable, a new one must be asked for
    with pytest.raises(ValueError, match="no usable classifier head"):
        load_vit(_vit_save_npz(tmp_path / "z.npz", w))
    assert load_vit(str(tmp_path / "z.npz"), num_classes=3).head.weight.shape == (3, 32)


def test_vit_bad_splits_raise(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 30), (9, 99, 199)).save(tmp_path / "img" / "a b.png")
    (tmp_path / "ok.txt").write_text("img/a b.png 1\n\nimg/a b.png 0\n")
    samples, classes = read_split(str(tmp_path / "ok.txt"))
    assert classes is None and [(os.path.basename(p), y) for p, y, _ in samples] == [("a b.png", 1), ("a b.png", 0)]
    (tmp_path / "folders" / "cat").mkdir(parents=True)
    (tmp_path / "folders" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "folders" / "dog" / "1.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "folders" / "cat" / "2.jpg")
    samples, classes = read_split(str(tmp_path / "folders"))
    assert classes == ["cat", "dog"] and [y for _, y, _ in samples] == [0, 1]
    with pytest.raises(ValueError, match=r"dog.1.jpg: class 'dog' is not among the training split's classes"):
        read_split(str(tmp_path / "folders"), classes=["ant", "cat"])
    (tmp_path / "nolabel.txt").write_text("img/a b.png 1\nimg/a.png\n")
    with pytest.raises(ValueError, match=r"nolabel.txt:2: expected `relative/path label`, got 'img/a.png'"):
        read_split(str(tmp_path / "nolabel.txt"))
    (tmp_path / "word.txt").write_text("img/a b.png cat\n")
    with pytest.raises(ValueError, match=r"word.txt:1: label 'cat' is not an integer"):
        read_split(str(tmp_path / "word.txt"))
    (tmp_path / "missing.txt").write_text("img/a b.png 1\nimg/gone.png 0\n")
    with pytest.raises(UserError, match=r"missing.txt:2: image .*gone.png does not exist"):
        read_split(str(tmp_path / "missing.txt"))
    Image.new("RGB", (20, 30)).save(tmp_path / "img" / "c.png")
    (tmp_path / "train.json").write_text(json.dumps({"img/a b.png": 12, "img/c.png": 3}))  # VPT: ids mapped 0..C-1
    samples, classes = read_split(str(tmp_path / "train.json"))
    assert classes == [3, 12] and [y for _, y, _ in samples] == [1, 0]
    (tmp_path / "test.json").write_text(json.dumps({"img/c.png": 12, "img/a b.png": 5}))
    with pytest.raises(ValueError, match=r"test.json: entry 'img/a b.png': class 5 is not among the training"):
        read_split(str(tmp_path / "test.json"), classes=classes)
    with pytest.raises(ValueError, match=r"train.json: entry 'img/a b.png': label 1 outside \[0, 1\)"):
        train_vit.check_labels(samples, 1)
    (tmp_path / "range.txt").write_text("img/a b.png 0\nimg/a b.png -1\n")
    with pytest.raises(ValueError, match=r"range.txt:2: label -1 outside \[0, 3\)"):
        train_vit.check_labels(read_split(str(tmp_path / "range.txt"))[0], 3)
    xs, ys = np.meshgrid(np.arange(18), np.arange(27))  # 18 x 27: Resize(round(16 * 256 / 224) = 18) keeps it
    Image.fromarray(np.stack([xs * 10, ys * 5, xs * 0 + 7], -1).astype(np.uint8)).save(tmp_path / "grid.png")
    x = train_vit.load_image(str(tmp_path / "grid.png"), 16, "test")  # CenterCrop(16): left 1, top round(5.5) = 6
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10.0, 30.0, 7.0]) / 127.5 - 1)
    torch.testing.assert_close(x[:, 15, 15], torch.tensor([160.0, 105.0, 7.0]) / 127.5 - 1)
    x = train_vit.load_image(str(tmp_path / "grid.png"), 9, "resize")  # VTAB: straight to 9 x 9
    assert x.shape == (3, 9, 9)


def test_vit_torchrun_two_processes_match_one(_vit_demo, tmp_path, torchrun):
    # vtab preset and no drop_path: no randomness, so 2 ranks x 4 images = 1 process x 8 images, step by step
    args = _vit_demo["args"] + ["--epochs", "1", "--batch-size", "8", "--preset", "vtab", "--drop-path", "0"]
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "one")]))
    torchrun("train_vit.py", *args, "--out", tmp_path / "two")
    one, two = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    assert not torch.equal(one["gift.attn_proj.psi.weight"], torch.zeros_like(one["gift.attn_proj.psi.weight"]))
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    ref = json.loads((tmp_path / "one" / "log.jsonl").read_text())
    # both ranks' test shares counted; float32 sums in another order may flip a near tie: one of 48 images
    assert len(log) == 1 and abs(log[0]["test_top1"] - ref["test_top1"]) <= 100 / 48 + 1e-9
    assert abs(log[0]["train_loss"] - ref["train_loss"]) < 1e-5       # both ranks' losses averaged


def test_vit_standard_sizes_and_paper_parameter_count():
    # timm's published parameter counts (1000 classes) and the paper's 24,576 GIFT parameters for ViT-B/16
    want = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632, "B/32": 88_224_232}
    for name, count in want.items():
        with torch.device("meta"):
            model = train_vit.ViT(ViTConfig.from_name(name))
        assert sum(p.numel() for p in model.parameters()) == count, name
    add_gift(model, ["attn.proj"], 16)
    model.head.requires_grad_(False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 24_576


def test_vit_drop_path_stays_on_with_frozen_backbone():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViT(replace(_vit_cfg, drop_path=0.5))
        add_gift(model, ["attn.proj"], 4)  # freezes every backbone parameter
        x = torch.randn(8, 3, 16, 16)
        with torch.no_grad():
            assert not torch.equal(model.train()(x), model(x))  # a fresh stochastic depth mask per call
            assert torch.equal(model.eval()(x), model(x))


# -----------------------------------------------------------------------------
# Faults: a run stops with one clear line, never in silent garbage, never over a user's files

def _vit_user_error(capsys, argv, match):
    err = user_error(capsys, train_vit.main, argv)
    assert re.search(match, err), err


def test_vit_nonfinite_loss_stops_and_keeps_the_last_checkpoint(_vit_demo, tmp_path, monkeypatch, capsys):
    ce, calls = F.cross_entropy, []

    def nan_at_epoch_2_step_2(logits, y):  # 96 images in batches of 16: 6 steps per epoch
        calls.append(1)
        return ce(logits, y) * (float("nan") if len(calls) == 8 else 1.0)
    monkeypatch.setattr(F, "cross_entropy", nan_at_epoch_2_step_2)
    out = tmp_path / "run"
    _vit_user_error(capsys, _vit_demo["args"] + ["--out", str(out)],
                    r"epoch 2, step 2: loss nan, gradient norm nan; training stopped, the checkpoint of epoch 1 "
                    r"\(.*checkpoint.pt\) is kept")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(t.isfinite().all() for t in ckpt["adapter"].values())
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1]  # strict JSON, epoch 1 only
    assert not (out / "adapter.safetensors").exists()


def test_vit_resume_compares_inputs_by_content(_vit_demo, tmp_path, capsys):
    shutil.copytree(_vit_demo["root"] / "run", tmp_path / "run")
    moved = shutil.copy(_vit_demo["ckpt"], str(tmp_path / "moved.npz"))  # the same checkpoint elsewhere: the same run
    args = _vit_demo["args"] + ["--out", str(tmp_path / "run"), "--resume"]
    train_vit.train(train_vit.parse_args(args + ["--checkpoint", moved]))
    assert "resumed from" in capsys.readouterr().out
    w = dict(np.load(moved))
    w["embedding/bias"][0] += 1  # other weights under the same name
    np.savez(moved, **w)
    _vit_user_error(capsys, args + ["--checkpoint", moved], r"written by a run with other settings or inputs "
                    r"\(checkpoint '[0-9a-f]+' -> '[0-9a-f]+'\)")
    shutil.copytree(_vit_demo["train"], tmp_path / "train")
    os.remove(tmp_path / "train" / "red" / "000.png")
    _vit_user_error(capsys, args + ["--train", str(tmp_path / "train")], r"\(train '[0-9a-f]+' -> '[0-9a-f]+'\)")
    _vit_user_error(capsys, _vit_demo["args"] + ["--out", str(tmp_path / "run")], "checkpoint.pt exists: add --resume")
    train_vit.main(_vit_demo["args"] + ["--out", str(tmp_path / "new"), "--resume", "--epochs", "1"])
    assert f"--resume: no {tmp_path / 'new' / 'checkpoint.pt'} yet, starting a new run" in capsys.readouterr().out


def test_vit_augmentation_does_not_depend_on_workers(_vit_demo):
    samples, _ = read_split(_vit_demo["train"])
    data = train_vit.ImageDataset([(p, y) for p, y, _ in samples[:12]], 32, "train", seed=0)

    def batches(workers, epoch):
        data.epoch = epoch
        return [x for x, _ in torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers)]
    one = batches(0, 3)
    assert all(torch.equal(a, b) for a, b in zip(one, batches(2, 3)))  # crops and flips: from (seed, epoch, index)
    assert not all(torch.equal(a, b) for a, b in zip(one, batches(0, 4)))


def _png_header(path, w, h):
    """A PNG whose header says w x h pixels (the data is cut off: the size alone must be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                     chunk(b"IDAT", b""))


@pytest.mark.parametrize("name,make,match", [
    ("strip.png", lambda p: __import__("PIL.Image").Image.new("RGB", (1, 20000)).save(p),
     r"image .*strip.png: 1 x 20000 pixels is over the limit of 67108864 pixels and an aspect ratio of 20:1"),
    ("huge.png", lambda p: _png_header(p, 9000, 9000), r"image .*huge.png: 9000 x 9000 pixels is over the limit"),
    ("cut.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), r"cannot decode image .*cut.png"),
    ("text.jpg", lambda p: p.write_text("not an image"), r"cannot decode image .*text.jpg")])
def test_vit_image_costs_are_capped(tmp_path, name, make, match):
    make(tmp_path / name)
    with pytest.raises(UserError, match=match):
        train_vit.load_image(str(tmp_path / name), 32, "train", np.random.default_rng(0))


def test_vit_image_error_in_a_worker_is_one_line(_vit_demo, tmp_path, capsys):
    from PIL import Image
    shutil.copytree(_vit_demo["train"], tmp_path / "train")
    Image.new("RGB", (1, 20000)).save(tmp_path / "train" / "red" / "strip.png")  # 157 bytes, 256 x 5M once resized
    _vit_user_error(capsys, _vit_demo["args"] + ["--train", str(tmp_path / "train"), "--workers", "2", "--out",
                                                 str(tmp_path / "run")],  # raised in a worker, unwrapped by @cli
                    r"^error: image .*strip.png: 1 x 20000 pixels is over the limit .*\n$")


@pytest.mark.parametrize("layout,match", [
    ("flat", r"flat: no images in class folders \(its images lie directly in it\); a split is a folder with one"),
    ("empty_class", r"empty_class: the class folder\(s\) ant hold no images"),
    ("one_class", r"--train .*one_class: every image has the same label; a classifier needs two classes or more"),
    ("latin1.txt", r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 18\); save it as UTF-8"),
    ("empty.txt", r"empty.txt: no images; a split is a folder")])
def test_vit_bad_training_splits(_vit_demo, tmp_path, capsys, layout, match):
    src = Path(_vit_demo["train"])
    spec = tmp_path / layout
    if layout == "flat":
        spec.mkdir()
        for f in sorted((src / "red").iterdir())[:3]:
            shutil.copy(f, spec)
    elif layout in ("empty_class", "one_class"):
        shutil.copytree(src / "red", spec / "red")
        if layout == "empty_class":
            shutil.copytree(src / "blue", spec / "blue")
            (spec / "ant").mkdir()
    else:
        spec.write_bytes(b"" if layout == "empty.txt" else b"red/0.png 0\nrouge/\xe9t\xe9.png 1\n")
    _vit_user_error(capsys, _vit_demo["args"] + ["--train", str(spec), "--test", str(spec), "--root", str(src),
                                                 "--out", str(tmp_path / "run")] + (["--num-classes", "4"] if
                                                                                    "one" in layout else []), match)


@pytest.mark.parametrize("out,match", [
    ("base", "is the base checkpoint: writing there would destroy it"),
    ("adapter", "is the adapter: writing there would destroy it"),
    ("folder", r"is a folder: give the file to write, e.g. .*merged.safetensors"),
    ("taken", r"taken.safetensors exists: choose a new path"),
    ("llama_adapter", "is an adapter of train_llama.py, not of train_vit.py"),
    ("adapter.pt", r"adapter.pt: no 'state_dict' in it \(found \[\]\); not a GIFT authors' checkpoint")])
def test_vit_merge_refuses(_vit_demo, tmp_path, capsys, out, match):
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    write_safetensors(tmp_path / "llama.safetensors", {"x": torch.zeros(1)},
                      {"config": json.dumps({"script": "train_llama.py", "targets": ["attention.wq"]})})
    torch.save({}, tmp_path / "adapter.pt")
    given = {"llama_adapter": str(tmp_path / "llama.safetensors"), "adapter.pt": str(tmp_path / "adapter.pt")}
    path = {"base": _vit_demo["ckpt"], "adapter": adapter, "folder": str(tmp_path),
            "taken": str(tmp_path / "taken.safetensors")}.get(out, str(tmp_path / "new.safetensors"))
    base = ["--checkpoint", _vit_demo["ckpt"]] if out == "adapter.pt" else []  # a torch file names no base
    _vit_user_error(capsys, ["--adapter", given.get(out, adapter), "--merge", path, *base], match)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me" and not (tmp_path / "new.safetensors").exists()


def test_vit_demo_refuses_a_used_out(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    _vit_user_error(capsys, ["--demo", "--out", str(tmp_path)], r"--out .* holds files \(notes.txt\)")
def test_vit_lr_schedule_is_timms():
    # timm's CosineLRScheduler(t_initial=100, warmup_t=10, warmup_lr_init=1e-7, lr_min=1e-6), per epoch, by hand
    lr = [train_vit.cosine_lr(t, 1e-4, 100, 10, 1e-7, 1e-6) for t in range(100)]
    assert lr[0] == 1e-7 and abs(lr[5] - 5.005e-5) < 1e-18 and abs(lr[9] - 9.001e-5) < 1e-18
    # from epoch 10 the cosine runs on t itself (warmup_prefix=False): cos(pi/10) = 0.95106, cos(0.99 pi) = -0.99951
    assert abs(lr[10] - 9.757729755661e-05) < 1e-15 and abs(lr[99] - 1.0244252621e-06) < 1e-15
    assert max(lr) == lr[10] and all(a > b for a, b in zip(lr[10:], lr[11:]))
    # --schedule step: the same function in steps (timm's t_in_epochs=False), 7 steps an epoch
    assert train_vit.cosine_lr(3, 1e-4, 700, 70, 1e-7, 1e-6) == 1e-7 + 3 * (1e-4 - 1e-7) / 70
    args = train_vit.parse_args(["--checkpoint", "c", "--train", "a", "--test", "b"])
    assert (args.precision, args.schedule, args.seed, args.drop_path, args.warmup, args.warmup_lr, args.min_lr,
            args.epochs, args.batch_size, args.rank, args.method) == ("fp32", "epoch", 42, 0.1, 10, 1e-7, 1e-6, 100,
                                                                       32, 16, "gift")


def test_vit_adapter_evaluated_with_its_stored_top1(_vit_demo, capsys):
    run = _vit_demo["root"] / "run"
    logged = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["test_top1"]
    top1 = train_vit.evaluate_adapter(train_vit.parse_args(["--adapter", str(run / "adapter.safetensors"), "--test",
                                                _vit_demo["test"], "--batch-size", "16", "--workers", "0"]))
    assert round(top1, 4) == logged  # the same weights, data and batches as the run's last evaluation
    assert f"stored in the adapter: {logged:.2f}%" in capsys.readouterr().out


def test_vit_lora_end_to_end(_vit_demo, tmp_path):
    out = tmp_path / "lora"
    model = train_vit.train(train_vit.parse_args(_vit_demo["args"] + ["--epochs", "1", "--out", str(out),
                                                                      "--method", "lora"]))
    adapter = read_safetensors(str(out / "adapter.safetensors"))
    assert sorted(adapter) == sorted([f"blocks.{i}.attn.proj.lora_{m}" for i in range(4) for m in "AB"]
                                     + ["head.bias", "head.weight"])
    assert adapter["blocks.0.attn.proj.lora_A"].shape == (8, 64)  # r = 8, the paper's LoRA
    assert adapter["blocks.3.attn.proj.lora_B"].abs().max() > 0
    log = json.loads((out / "log.jsonl").read_text())
    assert (log["method"], log["adapter_params"]) == ("lora", 4 * 8 * (64 + 64))
    merged_path = train_vit.merge(train_vit.parse_args(["--adapter", str(out / "adapter.safetensors"), "--merge",
                                                        str(tmp_path / "merged.safetensors")]))
    merged = read_safetensors(merged_path)
    assert sorted(merged) == sorted(load_vit(_vit_demo["ckpt"], num_classes=4).state_dict())  # plain ViT keys
    plain = load_vit(merged_path, ViTConfig(image_size=64, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=128))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=1e-5)
    top1 = train_vit.evaluate_adapter(train_vit.parse_args(["--adapter", str(out / "adapter.safetensors"), "--test",
                                                _vit_demo["test"], "--batch-size", "16", "--workers", "0"]))
    assert round(top1, 4) == log["test_top1"]


AUTHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "assets", "authors_gift_adapters",
                       "CUB_last.pth.tar")


@pytest.mark.skipif(not os.path.isfile(AUTHORS), reason="../shared/assets/authors_gift_adapters is absent")
def test_vit_authors_adapter_converts_to_the_same_logits(tmp_path, capsys):
    state, run, metric = train_vit.read_authors_adapter(AUTHORS)  # CUDA-saved tensors, Namespace allow-listed
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "gift.attn_proj.phi.weight": (16, 768), "gift.attn_proj.psi.weight": (768, 16),
        "head.weight": (200, 768), "head.bias": (200,)}
    assert (run["method"], run["targets"], run["rank"], run["arch"]) == ("gift", ["attn.proj"], 16,
                                                                        "vit_base_patch16_224.augreg_in21k")
    assert abs(metric - 89.7135) < 1e-4
    # the authors' formula straight from the file: W' = out(in(W)) + W for every block's attn.proj, fp64
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(AUTHORS, map_location="cpu", weights_only=True)["state_dict"]
    phi, psi = sd["in_projections.attn:proj.weight"].double(), sd["out_projections.attn:proj.weight"].double()
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=16, dim=768, depth=2, heads=12, mlp_dim=256, num_classes=200)
    base = ViT(cfg)
    write_safetensors(tmp_path / "base.safetensors", base.state_dict())
    ref = ViT(cfg).double()
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        for block in ref.blocks:
            w = block.attn.proj.weight
            w += F.linear(F.linear(w, phi), psi)            # (768,768) -> (768,16) -> (768,768)
        ref.head.weight.copy_(sd["backbone.head.weight"])
        ref.head.bias.copy_(sd["backbone.head.bias"])
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    args = ["--adapter", AUTHORS, "--checkpoint", str(tmp_path / "base.safetensors")]
    ours, _, stored = train_vit.adapter_model(train_vit.parse_args(args + ["--test", "t"]))
    assert stored == metric and ours.config == cfg
    with torch.no_grad():
        want = ref.eval()(x)
        torch.testing.assert_close(ours.double().eval()(x), want, rtol=0, atol=1e-10)  # activation form
        train_vit.main(args + ["--merge", str(tmp_path / "merged.safetensors")])
        merged = load_vit(str(tmp_path / "merged.safetensors")).double().eval()
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-6)  # W (I + phi psi) summed and stored in fp32
    # the start of a fine-tuning run: its Theta (the demo's 4 classes need a new head); 0 epochs writes the start
    ckpt, train_dir, test_dir = train_vit.make_demo(str(tmp_path / "demo"))
    train_vit.main(args + ["--train", train_dir, "--test", test_dir, "--epochs", "0", "--workers", "0", "--out",
                           str(tmp_path / "ft")])
    start = read_safetensors(str(tmp_path / "ft" / "adapter.safetensors"))
    assert torch.equal(start["gift.attn_proj.psi.weight"], state["gift.attn_proj.psi.weight"])
    assert start["head.weight"].shape == (4, 768)
    # evaluation and cluster maps: top-1 printed beside the file's 89.71
    images = sorted(Path(test_dir).rglob("*.png"))[:3]
    (tmp_path / "test.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(images)))
    train_vit.main(args + ["--test", str(tmp_path / "test.txt"), "--root", "/", "--visualize", "1", "--workers", "0",
                           "--out", str(tmp_path / "eval")])
    assert "of 3 images; stored in the adapter: 89.71%" in capsys.readouterr().out


def test_vit_authors_adapter_bad_files_refused(tmp_path):
    good = {"in_projections.attn:proj.weight": torch.randn(4, 32),
            "out_projections.attn:proj.weight": torch.randn(32, 4),
            "backbone.head.weight": torch.randn(5, 32), "backbone.head.bias": torch.randn(5)}

    def save(name, state, **args):
        torch.save({"epoch": 1, "arch": "x", "state_dict": state, "args": argparse.Namespace(**args), "metric": 1.0},
                   tmp_path / name)
        return str(tmp_path / name)
    state, run, metric = train_vit.read_adapter(save("ok.pth.tar", good, method="gift"))
    assert run["rank"] == 4 and metric == 1.0 and sorted(state) == sorted(
        ["gift.attn_proj.phi.weight", "gift.attn_proj.psi.weight", "head.weight", "head.bias"])
    cases = [(save("rank.pth.tar", {**good, "out_projections.attn:proj.weight": torch.randn(32, 8)}),
              r"in_projections.attn:proj.weight is \(4, 32\) and out_projections.attn:proj.weight is \(32, 8\)"),
             (save("lora.pth.tar", {"blocks.0.attn.proj.lora_A": torch.randn(8, 32)}, method="lora"),
              r"holds LoRA weights \(blocks.0.attn.proj.lora_A, 1 tensors\), not a GIFT adapter"),
             (save("bias.pth.tar", {**good, "in_projections.attn:proj.bias": torch.randn(4)}),
              r"found \['backbone.head.bias', .*'in_projections.attn:proj.bias'"),
             (save("mlp.pth.tar", good, gift_block_block_type="mlp"), "trained with the GIFT block 'mlp'")]
    data = open(cases[0][0], "rb").read()
    (tmp_path / "cut.pth.tar").write_bytes(data[:len(data) // 2])
    cases.append((str(tmp_path / "cut.pth.tar"), "cut.pth.tar: cannot read it as a GIFT authors' checkpoint"))
    torch.save({"state_dict": good, "args": os.getcwd}, tmp_path / "code.pth.tar")  # a pickled reference to code
    cases.append((str(tmp_path / "code.pth.tar"), r"GLOBAL (posix|nt).getcwd"))
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            train_vit.read_adapter(path)
    with pytest.raises(UserError, match="names no base weights"):  # a user mistake, refused before any loading
        train_vit.parse_args(["--adapter", cases[0][0], "--test", "t"])
