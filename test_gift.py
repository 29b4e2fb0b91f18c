"""Tests for gift.py (CPU, pytest). Oracles that are not runtime dependencies (transformers) are optional:
the tests that need them skip cleanly where they are absent."""
import collections
import copy
import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gift import (GIFTLinear, add_gift, cluster_head, count_parameters, gift_disabled, gift_layers,
    gift_state_dict, load_gift_state_dict, merge_gift, parameter_summary)
from harness import close_distributed  # the scripts' teardown, used by the DDP test's workers


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


class _AtenCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _GiftResiduals(_GiftChain):
    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x).to(x.dtype)  # under autocast: the residual stream stays float32
        return x


def _gift_step_ops(depth, mode, precision):
    """(forward, backward) aten op counts of one training step of `depth` residual layers x = x + layer(x) (the
    input in float32, as a pre-norm transformer's q_proj gets it), GIFT'd (mode) or frozen (mode None). The input
    needs grad in both, so the frozen model's backward also runs through every layer: only GIFT's own ops differ."""
    torch.manual_seed(0)
    model = _GiftResiduals(*(nn.Linear(16, 16) for _ in range(depth))).requires_grad_(False)
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model.to(dtype)
    if mode:
        add_gift(model, ["layers." + str(i) for i in range(depth)], 4, share="all", mode=mode)
    x = torch.randn(2, 3, 16, dtype=dtype, requires_grad=True)
    forward, backward = _AtenCount(), _AtenCount()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16 autocast"), forward:
        loss = model(x).float().sum()
    with backward:
        loss.backward()
    return forward.ops, backward.ops


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast", "bf16 weights"])
def test_gift_aten_ops_per_layer_are_as_stated(precision):
    """gift.py's docstring: a GIFT layer adds 4 aten ops to the forward and 13 to the backward (parameter form 5
    and 16), Theta's casts made once per forward pass, not once per layer. Per layer: the difference of two depths,
    so what a step does once (the casts, the loss) cancels; GIFT'd minus frozen, so the base layers cancel."""
    def per_layer(mode):
        (f2, b2), (f4, b4) = _gift_step_ops(2, mode, precision), _gift_step_ops(4, mode, precision)
        (g2, c2), (g4, c4) = _gift_step_ops(2, None, precision), _gift_step_ops(4, None, precision)
        fwd = {k: (f4[k] - f2[k] - g4[k] + g2[k]) / 2 for k in f4 | f2 | g4}
        bwd = {k: (b4[k] - b2[k] - c4[k] + c2[k]) / 2 for k in b4 | b2 | c4}
        return {k: v for k, v in fwd.items() if v}, {k: v for k, v in bwd.items() if v}

    fwd, bwd = per_layer("activation")
    assert fwd == {"view": 2, "mm": 1, "addmm": 1}, fwd  # no cast, no transpose
    assert bwd == {"mm": 4, "t": 4, "view": 2, "add": 3}, bwd  # 3 adds: x's two gradients, Theta's two sums
    fwd, bwd = per_layer("parameter")
    assert (sum(fwd.values()), sum(bwd.values())) == (5, 16) and "_to_copy" not in fwd | bwd, (fwd, bwd)


class _GiftNetCheckpointedAs(_GiftNet):
    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self.blocks[:-1]:  # their forwards run again in backward (reentrant: under no_grad first)
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.head(self.blocks[-1](x))  # the last block's layers as usual, in the same forward pass


@pytest.mark.parametrize("case", ["one", "eval", "two in one graph", "accumulation", "checkpoint", "reentrant"])
def test_gift_theta_cast_once_per_forward_gives_the_gradients_of_a_cast_per_layer(case):
    """A float32 model with a float64 Theta: model(x) casts Theta once and shares it among its 6 layers;
    model.forward(x) skips the model's hooks, so every layer casts its own (the reference). Same gradients
    (to float32 rounding: the cached cast sums the layers' gradients in float32) in every way of running steps."""
    torch.manual_seed(0)
    model = _GiftNetCheckpointedAs(case == "reentrant") if case in ("checkpoint", "reentrant") else _GiftNet()
    add_gift(model, ["q_proj", "v_proj"], 4, share="all")
    model.gift.double()
    _gift_randomize(model)
    theta = model.gift["all"]
    x = torch.randn(2, 3, 16, requires_grad=case == "reentrant")  # reentrant checkpoint needs an input with grad
    grads = []
    for run in (model.forward, model):
        model.zero_grad()
        if case == "eval":
            with torch.no_grad():
                assert run(x).isfinite().all()
        if case == "two in one graph":
            (run(x).square().sum() + run(2 * x).sum()).backward()
        else:
            run(x).square().sum().backward()
        if case == "accumulation":
            run(2 * x).sum().backward()
        grads.append([p.grad.clone() for p in theta.parameters()])
        assert theta._casts is None  # the model's forward ended: no cast is kept (nor its graph)
    for cached, per_layer in zip(grads[1], grads[0]):
        assert cached.dtype == torch.float64 and cached.abs().max() > 0
        torch.testing.assert_close(cached, per_layer, rtol=1e-5, atol=1e-5)
    casts = _AtenCount()
    with casts:
        model(x)
    assert casts.ops["_to_copy"] == (4 if case == "reentrant" else 2)  # phi and psi once for the 6 layers (and
    # once more for the checkpointed layers, which reentrant checkpointing runs under no_grad)


def test_gift_torch_compile_trains_like_eager():
    """5 AdamW steps, float32 (one Theta of d_in 16 for both layers): the compiled model's losses equal the eager model's to float32 rounding. Inductor
    needs a C++ compiler; without one, aot_eager (the same captured graphs, run by eager kernels)."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    backend = "inductor" if shutil.which("c++") or shutil.which("g++") else "aot_eager"
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16), torch.randn(4, 3, 5)
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)  # two layers and a GELU: a few kernels for inductor's C++ compiler
        model = _GiftChain(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5))
        add_gift(model, ["layers.0", "layers.2"], 4, share="all")
        _gift_randomize(model)
        opt = torch.optim.AdamW(model.gift.parameters(), lr=1e-2)
        run = torch.compile(model, backend=backend) if compiled else model
        losses.append([])
        try:
            for _ in range(5):
                loss = F.mse_loss(run(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[-1].append(loss.item())
        finally:
            torch._dynamo.reset()
    assert losses[0][-1] < losses[0][0] - 1e-3  # it trained
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_gift_ddp_single_process_and_clean_keys(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _, model = _gift_pair(dtype=torch.float32)
        _gift_randomize(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(2, 3, 16)).sum().backward()  # a Theta used by 3 layers is reduced once
        keys = list(gift_state_dict(ddp))
        del ddp  # its Reducer holds the process group: freed after destroy_process_group, gloo's threads can hang
        assert model.gift["q_proj"].psi.weight.grad.abs().sum() > 0
        assert keys == list(gift_state_dict(model)) and all(k.startswith("gift.") for k in keys)
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
    finally:  # the scripts' teardown: collect the DDP wrapper's cycle, meet at a barrier, then leave (gloo aborts
        close_distributed()  # when a rank leaves while the other still talks: CI saw SIGABRT once)


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
