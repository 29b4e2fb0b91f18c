"""Tests for train_common.py: the safetensors reader and writer, the progress bars, the LoRA baseline."""
import json

import pytest
import torch
import torch.nn as nn

from train_common import add_lora, progress, read_safetensors, read_safetensors_metadata, write_safetensors


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
    before = model(x)
    layers = add_lora(model, ["0", "2"], rank=2, alpha=4)
    assert torch.equal(model(x), before)  # B = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * (6 + 5) + 2 * (5 + 3)
    assert [layer.scale for layer in layers] == [2.0, 2.0]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], rank=1, alpha=1)


def test_progress_outside_a_terminal_redraws_rarely_and_ends_its_line(capsys):
    bar = progress(range(3), desc="x", leave=False)  # pytest captures stderr: not a terminal
    assert (bar.delay, bar.mininterval, bar.leave) == (10, 10, True)
    assert list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # done within its first 10 s: nothing written
