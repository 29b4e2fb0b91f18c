"""Tests for fileio.py: the safetensors reader and writer, atomic writes, JSON reading, fingerprints."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fileio import UserError, check_float, atomic_save, atomic_write, fingerprint, read_json, read_safetensors, \
    read_safetensors_metadata, write_safetensors


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


def test_atomic_write_keeps_the_previous_file_when_the_disk_is_full(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(UserError, match=r"could not write .*checkpoint.pt: no space left on device; the previous one "
                                        r"is kept"):
        atomic_write(path, full_disk)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]

    def folder_then_interrupt(tmp):  # a folder (a merged checkpoint) interrupted half-way: nothing is left
        os.makedirs(tmp)
        (Path(tmp) / "params.json").write_text("{}")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "merged", folder_then_interrupt)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    atomic_write(tmp_path / "merged", lambda tmp: os.makedirs(tmp))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "merged"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_atomic_save_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path, save = tmp_path / "checkpoint.pt", torch.save
    atomic_save({"step": 1}, path)
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, "/dev/full"))  # every write fails: ENOSPC
    with pytest.raises(UserError, match=r"could not write .*checkpoint.pt: torch.save failed \(.*\); is the disk "
                                        r"full\?; the previous one is kept"):
        atomic_save({"step": 2, "w": torch.zeros(10000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_check_float_refuses_integer_weights(tmp_path):
    ok = {"w": torch.zeros(2), "position_ids": torch.arange(3)}
    assert check_float("m.safetensors", ok, allowed=["position_ids"]) is ok
    with pytest.raises(UserError, match=r"m.safetensors: tensor 'w' is stored as torch.int32, but a model weight"):
        check_float("m.safetensors", {"w": torch.zeros(2, dtype=torch.int32)})


def test_fingerprint_is_content_not_location(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "params.json").write_text('{"dim": 64}')
    (tmp_path / "a" / "w.pth").write_bytes(b"\0" * 100)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    assert fingerprint(tmp_path / "a" / "w.pth") == fingerprint(tmp_path / "b" / "w.pth")
    (tmp_path / "b" / "w.pth").write_bytes(b"\1" + b"\0" * 99)
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")
    assert fingerprint(tmp_path / "a", limit=10) == fingerprint(tmp_path / "b", limit=10)  # large files: by size


@pytest.mark.parametrize("content,match", [
    (None, "p.json: no such file"), (b'{"dim": 4,', r"p.json: not valid JSON \(Expecting"),
    (b'{"name": "caf\xe9"}', r"p.json: not UTF-8 text \(invalid continuation byte at byte 13\)"),
    (b'{"dim": 4}', "p.json: no field 'n_layers'")])
def test_read_json_names_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / "p.json").write_bytes(content)
    with pytest.raises(UserError, match=match):
        read_json(tmp_path / "p.json")["n_layers"]


def test_metadata_of_a_file_that_is_no_safetensors(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "adapter.pt")  # a zip: its first 8 bytes read as a huge length
    with pytest.raises(UserError, match=r"adapter.pt: not a safetensors file \(its header length \d+ does not fit"):
        read_safetensors_metadata(tmp_path / "adapter.pt")
