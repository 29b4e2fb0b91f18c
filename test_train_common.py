"""Tests for train_common.py: the safetensors reader and writer, the progress bars, the LoRA baseline, the
adapter interface over GIFT and LoRA, and the guards of a run (one-line errors, atomic writes, the --out lock,
resuming, divergence, logs, input checks)."""
import copy
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from train_common import UserError, adapter_config, adapter_state_dict, add_adapter, add_lora, atomic_save, \
    atomic_write, check_finite, check_new_output, check_ranges, check_vocab, cli, fingerprint, \
    load_adapter_state_dict, lock_out, log_json, lora_layers, merge_adapter, merge_lora, progress, read_json, \
    read_safetensors, read_safetensors_metadata, resume_checkpoint, trim_log, write_safetensors


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


def test_progress_outside_a_terminal_redraws_rarely_and_ends_its_line(capsys):
    bar = progress(range(3), desc="x", leave=False)  # pytest captures stderr: not a terminal
    assert (bar.delay, bar.mininterval, bar.leave) == (10, 10, True)
    assert list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # done within its first 10 s: nothing written


# -----------------------------------------------------------------------------
# The guards of a run


def test_cli_prints_one_line_and_exits_2(capsys):
    @cli
    def main(error):
        raise error
    for error, line in [(UserError("x.json: no field 'a'"), "error: x.json: no field 'a'\n"),
                        # as a DataLoader worker's error arrives: the worker's traceback around the message
                        (UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                                   "call last):\n  File ...\ntrain_common.UserError: image a.png: 1 x 20000 pixels\n"),
                         "error: image a.png: 1 x 20000 pixels\n")]:
        with pytest.raises(SystemExit) as e:
            main(error)
        assert e.value.code == 2 and capsys.readouterr().err == line
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(KeyError("x"))


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


def test_lock_out_names_the_other_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, train_common; train_common.lock_out(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(tmp_path / "run")],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"run is in use by pid {holder.pid} on .*: wait for that run to end"):
            lock_out(tmp_path / "run")
    finally:
        holder.communicate("")  # the holder ends: the kernel drops its lock
    lock_out(tmp_path / "run")
    lock_out(tmp_path / "run")  # again in the same process: a no-op
    assert f"pid {os.getpid()} " in (tmp_path / "run" / ".lock").read_text()


def _checkpoint(tmp_path, name, obj=None, raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    elif obj is not None:
        torch.save(obj, path)
    return path


RUN = {"lr": 0.001, "model": "1a2b"}


@pytest.mark.parametrize("name,kind,resume,match", [
    ("exists", "good", False, "exists: add --resume to continue that run, or choose another --out"),
    ("empty", "empty", True, r"empty.pt: cannot read it \(EOFError\); truncated\?"),
    ("cut", "cut", True, r"cut.pt: cannot read it \(.*\); truncated\?"),
    ("foreign", "foreign", True, r"foreign.pt: not a checkpoint of this script \(no step, run\)"),
    ("changed", "changed", True, r"other settings or inputs \(lr 0.002 -> 0.001; model '9f8e' -> '1a2b'\): resume "
                                 r"with the same ones"),
    ("older", "older", True, r"\(model \(not recorded\) -> '1a2b'\)")])
def test_resume_checkpoint_refuses(tmp_path, name, kind, resume, match):
    good = {"step": 3, "run": RUN}
    data = io.BytesIO()
    torch.save(good, data)
    path = {"good": lambda: _checkpoint(tmp_path, "c.pt", good),
            "empty": lambda: _checkpoint(tmp_path, "empty.pt", raw=b""),
            "cut": lambda: _checkpoint(tmp_path, "cut.pt", raw=data.getvalue()[:200]),
            "foreign": lambda: _checkpoint(tmp_path, "foreign.pt", {"adapter": {}}),
            "changed": lambda: _checkpoint(tmp_path, "c.pt", {"step": 3, "run": {"lr": 0.002, "model": "9f8e"}}),
            "older": lambda: _checkpoint(tmp_path, "c.pt", {"step": 3, "run": {"lr": 0.001}})}[kind]()
    with pytest.raises(UserError, match=match):
        resume_checkpoint(path, resume, RUN, ["step"])


def test_resume_checkpoint_continues_the_same_run(tmp_path):
    assert resume_checkpoint(tmp_path / "none.pt", True, RUN, ["step"]) is None  # nothing yet: a new run
    path = _checkpoint(tmp_path, "c.pt", {"step": 3, "run": RUN})
    assert resume_checkpoint(path, True, dict(RUN), ["step"])["step"] == 3


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


def test_check_finite_names_the_step():
    check_finite("step 3", "nothing was saved", loss=torch.tensor(2.5), gradient_norm=1e30)
    for values, found in [({"loss": float("nan"), "gradient_norm": 1.0}, "loss nan"),
                          ({"loss": torch.tensor(1.0), "gradient_norm": torch.tensor(float("inf"))},
                           "gradient norm inf"),
                          ({"loss": torch.tensor(float("-inf"), requires_grad=True)}, "loss -inf")]:
        with pytest.raises(UserError, match=f"step 7: {found}; training stopped, c.pt .step 5. is kept"):
            check_finite("step 7", "c.pt (step 5) is kept", **values)


def test_logs_are_strict_json_and_trimmed_to_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    with open(path, "w") as f:
        for step in (1, 2, 3, 4):
            log_json(f, {"step": step, "loss": 1.0 / step})
        with pytest.raises(ValueError):  # never a bare NaN in the log
            log_json(f, {"step": 5, "loss": float("nan")})
        f.write('{"step": 5, "lo')  # the line a crash cut
    trim_log(path, "step", 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    trim_log(path, "step", 0)  # a new run
    assert path.read_text() == ""


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


@pytest.mark.parametrize("name,metadata,match", [
    ("adapter.pt", None, r"adapter.pt: not an adapter.safetensors \(a run of train_llama.py writes"),
    ("plain.safetensors", {}, "plain.safetensors: no run config in its metadata"),
    ("vit.safetensors", {"script": "train_vit.py", "targets": ["attn.proj"]},
     "vit.safetensors is an adapter of train_vit.py, not of train_llama.py"),
    ("old_vit.safetensors", {"vit": {}, "targets": ["attn.proj"]}, "is an adapter of train_vit.py"),
    ("partial.safetensors", {"targets": ["wq"]}, "partial.safetensors: its run config has no rank")])
def test_adapter_config_refuses_other_files(tmp_path, name, metadata, match):
    if metadata is None:
        torch.save({}, tmp_path / name)
    else:
        write_safetensors(tmp_path / name, {"x": torch.zeros(1)}, {"config": json.dumps(metadata)} if metadata else {})
    with pytest.raises(UserError, match=match):
        adapter_config(tmp_path / name, "train_llama.py", ["targets", "rank"])


def test_check_vocab():
    class Tok:
        path, n_words, bos_id, eos_id, pad_id = "tokenizer.model", 100, 1, 2, None
    check_vocab(Tok(), 100, "model")
    check_vocab(Tok(), 128, "model", allow_padding=True)
    for vocab, padding, found in [(120, False, "100 ids"), (90, True, "100 ids"), (2, True, "100 ids; eos_id 2")]:
        with pytest.raises(UserError, match=f"tokenizer tokenizer.model .{found}. does not fit the model model "
                                            f".{vocab} embedding rows.: give the model's own tokenizer"):
            check_vocab(Tok(), vocab, "model", allow_padding=padding)


def test_check_new_output(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "params.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"")
    check_new_output(tmp_path / "new", "--merge", {"the --model folder": tmp_path / "model"})
    check_new_output(tmp_path / "empty", "--merge")
    for path, match in [("model", "model is the --model folder: writing there would destroy it"),
                        ("notes", r"notes holds files \(a.txt\): writing there would replace them"),
                        ("m.safetensors", "m.safetensors exists: choose a new path")]:
        with pytest.raises(UserError, match=match):
            check_new_output(tmp_path / path, "--merge", {"the --model folder": tmp_path / "model"})
    (tmp_path / "model2").mkdir()
    (tmp_path / "model2" / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(UserError, match=r"model2 holds a checkpoint \(consolidated.00.pth\)"):
        check_new_output(tmp_path / "model2", "--merge", {"the --model folder": tmp_path / "model"})


def test_check_ranges():
    import argparse
    check_ranges(argparse.Namespace(epochs=1, eval_limit=None), {"epochs": 1, "eval_limit": 1})
    with pytest.raises(UserError, match="--batch-size 0: must be at least 1"):
        check_ranges(argparse.Namespace(batch_size=0), {"batch_size": 1})
