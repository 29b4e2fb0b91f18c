"""Tests for gift.py (CPU, pytest). Oracles that are not runtime dependencies (transformers) are optional:
the tests that need them skip cleanly where they are absent."""
import copy
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gift import (GIFTLinear, add_gift, cluster_head, count_parameters, gift_layers, gift_state_dict,
    load_gift_state_dict, merge_gift, parameter_summary)


# ----------------------------------------------------------------------------------------------- gift.py
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


def test_gift_step_zero_equals_base():
    base, model = _gift_pair(dtype=torch.float32)
    x = torch.randn(4, 7, 16)
    assert torch.equal(model(x), base(x))  # psi = 0: bitwise the pretrained model
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
    assert set(model.state_dict()) == set(base.state_dict()) | set(gift_keys)  # base keys unchanged
    model.double()  # .to() converts the one shared Theta and every layer sees it
    for _, layer in gift_layers(model):
        assert layer.theta is model.gift["all"] and layer.theta.phi.weight.dtype == torch.float64
    clone = copy.deepcopy(model)
    assert all(layer.theta is clone.gift["all"] for _, layer in gift_layers(clone))
    # the original modules, kept for merge_gift, hold no parameters: no stale copy of a weight is pinned
    assert all(not list(layer.refs[0].parameters()) for _, layer in gift_layers(model))


def test_gift_torch_save_round_trip():
    base, model = _gift_pair()
    _gift_randomize(model)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(gift_state_dict(model, extra=["head"]), buf)
    fresh = copy.deepcopy(base)
    add_gift(fresh, ["q_proj", "v_proj"], 4)
    load_gift_state_dict(fresh, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh(x), model(x))
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module pickles, and Theta stays shared after loading
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert all(layer.theta is loaded.gift[name.rsplit(".", 1)[1]] for name, layer in gift_layers(loaded))
    # a base checkpoint still loads strictly into the injected model: the keys did not change
    state = {k: v for k, v in base.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert missing == [k for k in fresh.state_dict() if k.startswith("gift.")] and unexpected == []


def test_gift_merge_restores_original_modules_and_keys():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = nn.Sequential(layer, nn.Linear(16, 3))
    model = copy.deepcopy(base)
    originals = {n: type(m) for n, m in model.named_modules()}
    add_gift(model, ["linear1", "1"], 4)
    assert isinstance(model[0].linear1, GIFTLinear) and isinstance(model[1], GIFTLinear)
    merge_gift(model)
    assert {n: type(m) for n, m in model.named_modules()} == originals
    assert list(model.state_dict()) == list(base.state_dict()) and not hasattr(model, "gift")
    assert not any(model._forward_hooks) and not any(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="no GIFT to merge"):
        merge_gift(model)
    add_gift(model, ["linear2"], 2)  # a merged model can take a new GIFT
    # merge_gift writes into the layer's current weight, even when the Parameter objects were replaced since
    state = {k: v + 1 if k == "0.linear2.weight" else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    merge_gift(model)
    assert torch.equal(model[0].linear2.weight, state["0.linear2.weight"])  # psi = 0: W unchanged by merging


def test_gift_merge_bf16_is_computed_in_float32():
    torch.manual_seed(0)
    model = _GiftNet().to(torch.bfloat16)
    w = model.blocks[0].q_proj.weight.detach().float().clone()
    add_gift(model, ["q_proj"], 4)
    theta = model.gift["q_proj"]
    assert theta.phi.weight.dtype == torch.float32
    _gift_randomize(model)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert model.blocks[0].q_proj(x).dtype == torch.bfloat16
    expected = (w + (w @ theta.phi.weight.T) @ theta.psi.weight.T).to(torch.bfloat16)
    merge_gift(model)
    assert torch.equal(model.blocks[0].q_proj.weight, expected)


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
    with pytest.raises(ValueError, match="regex 'q_proj' matched no module.*whole"):
        add_gift(model, "q_proj", 4)
    with pytest.raises(ValueError, match="'blocks.0' is a _GiftBlock, not an nn.Linear"):
        add_gift(model, ["blocks.0"], 4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, in_features=16\], got 0"):
        add_gift(model, ["q_proj"], 0)
    with pytest.raises(ValueError, match=r"rank must be in \[1, in_features=16\], got 17"):
        add_gift(model, ["q_proj"], 17)
    with pytest.raises(ValueError, match="more than one target"):
        add_gift(model, ["q_proj", "0.q_proj"], 4)
    with pytest.raises(ValueError, match="share must be"):
        add_gift(model, ["q_proj"], 4, share="layer")
    with pytest.raises(ValueError, match="targets is empty"):
        add_gift(model, [], 4)
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


def test_gift_on_torch_transformer_encoder_and_fast_path_guard():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
    model = copy.deepcopy(base)
    add_gift(model, ["linear1", "linear2"], 4)
    x = torch.randn(2, 5, 16)
    assert torch.equal(model(x), base(x))
    _gift_randomize(model)
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-3
    with torch.no_grad(), pytest.raises(RuntimeError, match="no layer of Theta 'linear1'.*ran.*merge_gift"):
        model.eval()(x)  # torch's inference fast path reads linear1.weight without calling linear1
    model.train()
    torch.testing.assert_close(merge_gift(model).eval()(x), y, rtol=1e-5, atol=1e-5)


def test_gift_cluster_head():
    _, model = _gift_pair(dtype=torch.float32)
    _gift_randomize(model)
    layer = model.blocks[0].v_proj  # d_out = 8, r = 4
    c = cluster_head(layer)
    assert c.shape == (8, 4) and c.dtype == torch.float32
    torch.testing.assert_close(c, layer.weight @ model.gift["v_proj"].phi.weight.T)
    assert (torch.randn(196, 8) @ c).shape == (196, 4)


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


def test_gift_on_transformers_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).double().eval()
    model = copy.deepcopy(base)
    add_gift(model, ["q_proj", "v_proj"], 4)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(ids).logits, base(ids).logits)
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
    assert "step 0 equals the base model: True" in run.stdout
    assert "eval() under no_grad is refused" in run.stdout and "merged model keys == base keys: True" in run.stdout
    final = re.findall(r"step 150 .* test accuracy ([0-9.]+)", run.stdout)
    assert final and float(final[0]) >= 0.95, run.stdout  # Theta and the head learn the generated task
