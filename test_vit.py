"""Tests for vit.py: the ViT against raw kernels and transformers, the checkpoint readers (Google npz, timm, HF),
their checks of every field and shape before a model is built, and the adapter readers (ours, the GIFT authors').
Tiny models, CPU."""
import argparse
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vit
from fileio import UserError, write_safetensors
from gift import add_gift
from vit import ViT, ViTConfig, load_vit, resize_pos_embed

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
    # a config that does not describe the file: refused from the shapes, before any model is built
    with pytest.raises(UserError, match=r"g.npz holds a ViT of dim 32, depth 2, mlp_dim 64, patch_size 4, heads 4; the "
                                        r"config given says dim 32, depth 2, mlp_dim 48, patch_size 4, heads 4: it does"):
        load_vit(good, ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_dim=48))
    with pytest.raises(UserError, match="config given says dim 32, depth 3,"):
        load_vit(good, ViTConfig(image_size=16, patch_size=4, dim=32, depth=3, heads=4, mlp_dim=64))
    with pytest.raises(UserError, match="config given says dim 32, depth 1,"):
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


def test_vit_standard_sizes_and_paper_parameter_count():
    # timm's published parameter counts (1000 classes) and the paper's 24,576 GIFT parameters for ViT-B/16
    want = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632, "B/32": 88_224_232}
    for name, count in want.items():
        with torch.device("meta"):
            model = vit.ViT(ViTConfig.from_name(name))
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


def test_vit_authors_adapter_bad_files_refused(tmp_path):
    good = {"in_projections.attn:proj.weight": torch.randn(4, 32),
            "out_projections.attn:proj.weight": torch.randn(32, 4),
            "backbone.head.weight": torch.randn(5, 32), "backbone.head.bias": torch.randn(5)}

    def save(name, state, **args):
        torch.save({"epoch": 1, "arch": "x", "state_dict": state, "args": argparse.Namespace(**args), "metric": 1.0},
                   tmp_path / name)
        return str(tmp_path / name)
    state, run, metric = vit.read_adapter(save("ok.pth.tar", good, method="gift"))
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
            vit.read_adapter(path)


# -----------------------------------------------------------------------------
# Issue 22: every reader checks what it reads, before any model is built

def _hf_folder(tmp_path, name="hf", **changes):
    """An HF ViT folder (config.json + model.safetensors) of _vit_cfg's weights; changes edit config.json."""
    _, hf = _vit_timm_and_hf(_vit_google_arrays())
    folder = tmp_path / name
    folder.mkdir()
    write_safetensors(str(folder / "model.safetensors"), hf)
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 16, "patch_size": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return str(folder)


def test_vit_hf_folder_reads_its_config(tmp_path):
    model = load_vit(_hf_folder(tmp_path))  # heads from config.json: dim 32 is no standard size
    assert model.config == _vit_cfg
    ref = load_vit(_vit_save_npz(tmp_path / "g.npz", _vit_google_arrays()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert load_vit(_hf_folder(tmp_path, "eps", layer_norm_eps=1e-12)).blocks[0].norm1.eps == 1e-12  # HF's own


@pytest.mark.parametrize("changes,match", [  # class 2: types and ranges of config.json's fields
    ({"hidden_size": 430.0}, r"config.json: field 'hidden_size' is 430.0; expected an integer >= 1"),
    ({"num_hidden_layers": 2.5}, r"field 'num_hidden_layers' is 2.5; expected an integer >= 1"),
    ({"num_attention_heads": "4"}, r"field 'num_attention_heads' is '4'; expected an integer >= 1"),
    ({"intermediate_size": 0}, r"field 'intermediate_size' is 0; expected an integer >= 1"),
    ({"num_attention_heads": 5}, r"dim 32 of heads 5"),
    ({"image_size": 10 ** 9}, r"field 'image_size' is 1000000000; expected an integer >= 1 <= 4096"),
    ({"layer_norm_eps": -1}, r"field 'layer_norm_eps' is -1; expected a number >= 0 <= 1"),
    ({"hidden_act": "gelu_new"}, r"field 'hidden_act' is 'gelu_new'; expected one of 'gelu'"),
    ({"qkv_bias": False}, r"field 'qkv_bias' is False; expected one of True"),
    ({"hidden_size": True}, r"field 'hidden_size' is True; expected an integer"),
    ({"num_hidden_layers": 10 ** 6}, r"holds a ViT of dim 32, depth 2, .*says dim 32, depth 1000000"),  # class 3
])
def test_vit_hf_config_fields_are_checked(tmp_path, changes, match):
    with pytest.raises(UserError, match=match):
        load_vit(_hf_folder(tmp_path, **changes))


@pytest.mark.parametrize("vit_meta,match", [  # a merged model's ViTConfig in its metadata
    ({"depth": 10 ** 6}, r"holds a ViT of dim 32, depth 2, .*stored with it says dim 32, depth 1000000"),  # class 3
    ({"dim": 10 ** 7, "heads": 1}, r"holds a ViT of dim 32, .*says dim 10000000"),
    ({"depth": "2"}, r"metadata config 'vit': field 'depth' is '2'; expected an integer >= 1"),
    ({"mlp": 64}, r"metadata config 'vit': unknown field\(s\) mlp"),
    ({"drop_path": 5}, r"field 'drop_path' is 5; expected a number >= 0 <= 0.99"),
])
def test_vit_stored_config_is_checked_before_building(tmp_path, monkeypatch, vit_meta, match):
    timm, _ = _vit_timm_and_hf(_vit_google_arrays())
    path = str(tmp_path / "merged.safetensors")
    write_safetensors(path, timm, {"config": json.dumps({"vit": {**vars(_vit_cfg), **vit_meta}})})
    monkeypatch.setattr(vit, "ViT", None)  # no model may be built before the check
    with pytest.raises(UserError, match=match):
        load_vit(path)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "npz"])
def test_vit_integer_weights_are_refused(tmp_path, fmt):  # class 1: I32 read as integers would train silently
    w = _vit_google_arrays()
    timm, _ = _vit_timm_and_hf(w)
    timm["blocks.1.attn.proj.weight"] = timm["blocks.1.attn.proj.weight"].view(torch.int32)  # same bytes
    w["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = w[
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].view(np.int32)
    path = str(tmp_path / f"m.{fmt}")
    {"safetensors": lambda: write_safetensors(path, timm), "pth": lambda: torch.save(timm, path),
     "npz": lambda: np.savez(path, **w)}[fmt]()
    with pytest.raises(UserError, match=r"tensor '.*(attn.proj|Dense_0/kernel).*' is stored as torch.int32, but a "
                                        r"model weight is floating point"):
        load_vit(path, _vit_cfg)


@pytest.mark.parametrize("config,match", [  # class 2: an adapter's run config, every field
    ([1, 2], r"run config is list \[1, 2\]; expected a JSON object"),
    ({"targets": ["attn.proj"], "rank": "16"}, r"run config: field 'rank' is '16'; expected an integer >= 1"),
    ({"targets": ["attn.proj"], "rank": 0}, r"field 'rank' is 0; expected an integer >= 1"),
    ({"targets": ["attn.proj"], "rank": 4, "method": "dora"}, r"field 'method' is 'dora'; expected one of 'gift', "),
    ({"targets": "attn.proj", "rank": 4}, r"field 'targets' is 'attn.proj'; expected a list"),
    ({"targets": [], "rank": 4}, r"field 'targets' is \[\]; expected a list of layer names"),
    ({"targets": ["attn.proj"], "rank": 4, "method": "lora", "lora_alpha": 0}, r"'lora_alpha' is 0; expected a num"),
    ({"targets": ["attn.proj"], "rank": 4, "share": "some"}, r"field 'share' is 'some'; expected one of 'type', 'all'"),
    ({"targets": ["attn.proj"], "rank": 4, "vit": {**vars(_vit_cfg), "heads": 2.5}}, r"field 'vit': field 'heads' is"),
    ({"targets": ["attn.proj"], "rank": 4, "test_top1": "90"}, r"field 'test_top1' is '90'; expected a number"),
    ({"targets": ["attn.proj"], "rank": 4, "seed": 4.2}, r"field 'seed' is 4.2; expected an integer"),
    ({"script": "train_glue.py", "targets": ["query"], "rank": 4}, r"is an adapter of train_glue.py, not of train_vit"),
])
def test_vit_adapter_run_config_is_checked(tmp_path, config, match):
    path = str(tmp_path / "adapter.safetensors")
    write_safetensors(path, {"gift.attn_proj.phi.weight": torch.zeros(4, 32)}, {"config": json.dumps(config)})
    with pytest.raises(UserError, match=match):
        vit.read_adapter(path)


def test_vit_adapter_integer_tensors_are_refused(tmp_path):  # class 1
    path = str(tmp_path / "adapter.safetensors")
    write_safetensors(path, {"gift.attn_proj.phi.weight": torch.zeros(4, 32, dtype=torch.int32)},
                      {"config": json.dumps({"targets": ["attn.proj"], "rank": 4})})
    with pytest.raises(UserError, match=r"'gift.attn_proj.phi.weight' is stored as torch.int32"):
        vit.read_adapter(path)
