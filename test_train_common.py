"""Tests for train_common.py: the safetensors reader and writer, the progress bars, the LoRA baseline and the
adapter interface over GIFT and LoRA."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from train_common import add_adapter, add_lora, adapter_state_dict, load_adapter_state_dict, lora_layers, \
    merge_adapter, merge_lora, progress, read_safetensors, read_safetensors_metadata, write_safetensors


def test_read_safetensors_validates_and_agrees(tmp_path):
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
    assert read_safetensors_metadata(str(tmp_path / "b.safetensors")) == {"k": "v"}


def test_lora_starts_at_base_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    before, keys = model(x), list(model.state_dict())
    layers = add_lora(model, ["0", "2"], rank=2, alpha=4)
    assert torch.equal(model(x), before)  # B = 0
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


def test_progress_outside_a_terminal_redraws_rarely_and_ends_its_line(capsys):
    bar = progress(range(3), desc="x", leave=False)  # pytest captures stderr: not a terminal
    assert (bar.delay, bar.mininterval, bar.leave) == (10, 10, True)
    assert list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # done within its first 10 s: nothing written
