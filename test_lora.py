"""Tests for lora.py, the LoRA baseline, and the adapter interface of harness.py over GIFT and LoRA."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import adapter_state_dict, add_adapter, load_adapter_state_dict, merge_adapter
from lora import add_lora, lora_layers, merge_lora


def test_lora_starts_at_base_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()  # trainable base, frozen one below:
    x = torch.randn(4, 6, dtype=torch.float64)                                   # float64, as every such comparison
    before, keys = model(x), list(model.state_dict())
    layers = add_lora(model, ["0", "2"], rank=2, alpha=4)
    assert torch.equal(model(x), before)  # B = 0: W x + b plus exact zeros
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * (6 + 5) + 2 * (5 + 3)
    assert [layer.scale for layer in layers] == [2.0, 2.0]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.lora_A", "0.lora_B",  # the base keys stay
                                        "2.weight", "2.bias", "2.lora_A", "2.lora_B"]
    with pytest.raises(ValueError, match=r"LoRA targets \['q_proj'\] matched no nn.Linear. Linear layers: 0"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ["0", "q_proj"], rank=1, alpha=1)
    mha = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match="'0.out_proj' is inside nn.MultiheadAttention"):
        add_lora(mha, ["out_proj"], rank=1, alpha=1)
    assert keys == list(merge_lora(model).state_dict())


def test_lora_merge_and_adapter_round_trip():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5, bias=False), nn.Linear(5, 2)).double()
    model = copy.deepcopy(base)
    add_adapter(model, {"method": "lora", "targets": ["0", "2"], "rank": 3, "lora_alpha": 6})
    assert model[0].lora_A.dtype == torch.float64  # master weights: float64 for a float64 model, else float32
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)
    want = model(x)
    # the formula, from the base weights: W + (alpha / r) B A
    w0 = base[0].weight + 2 * model[0].lora_B @ model[0].lora_A
    w2 = base[2].weight + 2 * model[2].lora_B @ model[2].lora_A
    ref = base[3](F.linear(torch.tanh(F.linear(x, w0, base[0].bias)), w2))
    torch.testing.assert_close(want, ref, rtol=0, atol=1e-12)
    state = adapter_state_dict(model, extra=["3"])
    assert sorted(state) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B", "3.bias", "3.weight"]
    again = copy.deepcopy(base)
    add_adapter(again, {"method": "lora", "targets": ["0", "2"], "rank": 3, "lora_alpha": 6})
    load_adapter_state_dict(again, state)
    assert torch.equal(again(x), want)
    merged = merge_adapter(again)
    assert all(type(m) is nn.Linear for m in (merged[0], merged[2]))
    assert list(merged.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-12)
    other = copy.deepcopy(base)
    add_adapter(other, {"method": "lora", "targets": ["0"], "rank": 3, "lora_alpha": 6})
    with pytest.raises(ValueError, match=r"unexpected keys \['2.lora_A', '2.lora_B'\]"):
        load_adapter_state_dict(other, state)
    other = copy.deepcopy(base)
    add_adapter(other, {"method": "lora", "targets": ["0", "2"], "rank": 2, "lora_alpha": 6})
    with pytest.raises(ValueError, match=r"'0.lora_A' has shape \(3, 6\), the model expects \(2, 6\)"):
        load_adapter_state_dict(other, state)
    gift = nn.Module()  # add_gift takes no nn.Sequential (it would run model.gift as a layer)
    gift.net = copy.deepcopy(base)
    add_adapter(gift, {"method": "gift", "targets": ["net.0"], "rank": 2})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_adapter_state_dict(gift, state)
