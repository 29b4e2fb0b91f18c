"""Tests for harness.py: one-line errors, progress bars, the --out lock, resuming, divergence, logs, input
checks, the run lifecycle (Run) and its signal handling, the shared flags and the device set-up."""
import argparse
import copy
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from fileio import UserError, read_safetensors_metadata, write_safetensors
from harness import Run, adapter_config, add_common_flags, base_identity, check_adapter_base, check_finite, \
    check_new_output, check_ranges, check_vocab, cli, compile_model, fused_adamw, lock_out, log_json, progress, resume_checkpoint, \
    setup_distributed, trim_log
from lora import add_lora, merge_lora


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
                                   "call last):\n  File ...\nfileio.UserError: image a.png: 1 x 20000 pixels\n"),
                         "error: image a.png: 1 x 20000 pixels\n")]:
        with pytest.raises(SystemExit) as e:
            main(error)
        assert e.value.code == 2 and capsys.readouterr().err == line
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(KeyError("x"))


def test_lock_out_names_the_other_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, harness; harness.lock_out(sys.argv[1]); "
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


def test_run_lifecycle_resumes_only_the_same_run(tmp_path, capsys):
    out, settings = tmp_path / "run", {"lr": 0.1, "data": "ab12"}
    run = Run(out, settings, keys=("adapter",), resume=False)
    assert run.checkpoint is None and run.kept() == "nothing was saved"
    for step in (1, 2, 3):
        run.log({"step": step, "loss": 1.0 / step})
    run.save({"adapter": {"w": torch.ones(2)}}, 2)  # the checkpoint holds 2 steps; the log has 3
    assert run.kept().endswith("checkpoint.pt (step 2) is kept")
    with pytest.raises(UserError, match="checkpoint.pt exists: add --resume"):
        Run(out, settings, keys=("adapter",), resume=False)
    with pytest.raises(UserError, match=r"other settings or inputs \(lr 0.1 -> 0.2\)"):
        Run(out, {**settings, "lr": 0.2}, keys=("adapter",), resume=True)
    again = Run(out, settings, keys=("adapter",), resume=True)
    assert again.checkpoint["step"] == 2 and torch.equal(again.checkpoint["adapter"]["w"], torch.ones(2))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]  # step 3 is logged anew
    with pytest.raises(UserError, match=r"step 3: loss nan; training stopped, .*checkpoint.pt \(step 2\) is kept"):
        again.check_finite("step 3", loss=float("nan"))
    path = again.write_adapter({"gift.x": torch.zeros(1)}, {"method": "gift"})
    assert json.loads(read_safetensors_metadata(path)["config"]) == {"method": "gift"}
    capsys.readouterr()
    Run(tmp_path / "fresh", settings, keys=("adapter",), resume=True)
    assert "--resume: no " in capsys.readouterr().out


def test_catch_signals_finishes_the_step_and_a_second_signal_quits(tmp_path, capsys):
    run = Run(tmp_path / "run", {}, keys=(), resume=False)
    before = signal.getsignal(signal.SIGINT)
    with run.catch_signals():
        assert not run.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's: only noted
        assert run.interrupted == "SIGTERM" and run.should_stop()
        assert "SIGTERM: finishing this step, then saving" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
    assert signal.getsignal(signal.SIGINT) is before
    assert "stopped by SIGTERM after 3 of 10 steps" in run.stopped_message(3, 10)


def test_device_flag_and_common_flags(capsys):
    p = add_common_flags(argparse.ArgumentParser(), targets=["q"], gift_rank=16, lora_rank=8, lora_alpha=1.0,
                         out="runs/x")
    args = p.parse_args(["--device", "cuda:1", "--rank", "4"])
    assert args.device == torch.device("cuda", 1) and args.targets == ["q"] and args.method == "gift"
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu0"])
    assert "'tpu0' is not a device: give cpu, cuda or cuda:N" in capsys.readouterr().err
    assert setup_distributed(torch.device("cpu"))[3] == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: torch sees no CUDA GPU here"):
            setup_distributed(torch.device("cuda"))
    opt = fused_adamw([nn.Parameter(torch.zeros(2))], lr=1e-3)
    assert not opt.defaults["fused"]  # on the CPU: the default implementation
    assert p.parse_args([]).compile is None and p.parse_args(["--compile"]).compile == "default"
    assert p.parse_args(["--compile", "reduce-overhead", "--rank", "4"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_compile_model_modes(monkeypatch):
    """--compile MODE reaches torch.compile (inductor); reduce-overhead (CUDA graphs) marks a new step before
    every call, so that a replay never overwrites outputs a loop still uses; another backend takes no mode."""
    seen, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.delenv("GIFT_COMPILE_BACKEND", raising=False)
    compile_model(nn.Linear(2, 2))(torch.zeros(1, 2))
    assert seen == [{"mode": None}] and marks == []
    model = compile_model(nn.Linear(2, 2), "reduce-overhead")
    model(torch.zeros(1, 2))
    model(torch.zeros(1, 2))
    assert seen[-1] == {"mode": "reduce-overhead"} and marks == [1, 1]
    monkeypatch.setenv("GIFT_COMPILE_BACKEND", "aot_eager")
    compile_model(nn.Linear(2, 2), "max-autotune")
    assert seen[-1] == {"backend": "aot_eager"}


def test_base_identity_tells_a_merged_or_other_model_from_the_base(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    ident = base_identity(base, skip=["1"])
    assert base_identity(copy.deepcopy(base).to(torch.bfloat16), skip=["1"]) == ident  # a bf16 load: the same
    other = copy.deepcopy(base)
    other[1] = nn.Linear(8, 5)  # a new head is not the base's identity
    assert base_identity(other, skip=["1"]) == ident
    lora = copy.deepcopy(base)
    add_lora(lora, ["0"], rank=2, alpha=2)  # adapter tensors left out
    assert base_identity(lora, skip=["1"]) == ident
    merged = copy.deepcopy(lora)
    with torch.no_grad():
        merged[0].lora_B.normal_()
    assert base_identity(merge_lora(merged), skip=["1"]) != ident
    config = {"base": ident, "model": "base-folder"}
    check_adapter_base("a.safetensors", config, base, "base-folder", skip=["1"])
    with pytest.raises(UserError, match=r"a.safetensors was trained on base-folder \(identity [0-9a-f]{16}\), not on "
                                        r"merged \(identity [0-9a-f]{16}\).*--any-base"):
        check_adapter_base("a.safetensors", config, merged, "merged", skip=["1"])
    check_adapter_base("a.safetensors", config, merged, "merged", skip=["1"], force=True)


@pytest.mark.parametrize("case,match", [
    ("finished", r"--out .*run holds a run \(log.jsonl, adapter.safetensors, results.json\): add --resume to "
                 r"continue it, --overwrite to replace it"),
    ("a_file", r"--out .*run is a file: give a folder"),
    ("the_model", r"--out .*model is the base model: the run's files would mix with it"),
])
def test_run_never_replaces_a_used_folder_unasked(tmp_path, case, match):
    out, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    if case == "finished":
        out.mkdir()
        for name in ("log.jsonl", "adapter.safetensors", "results.json"):
            (out / name).write_text("{}")
    elif case == "a_file":
        out.write_text("")
    else:
        out = model
    with pytest.raises(UserError, match=match):
        Run(out, {}, keys=(), resume=False, outputs=["results.json"], inputs={"the base model": model})


def test_run_overwrite_starts_anew(tmp_path):
    run = Run(tmp_path / "run", {"lr": 1}, keys=(), resume=False)
    run.log({"step": 1})
    run.save({}, 1)
    again = Run(tmp_path / "run", {"lr": 2}, keys=(), resume=False, overwrite=True)  # other settings: fine
    assert again.checkpoint is None and not again.checkpoint_path.exists()
    assert (tmp_path / "run" / "log.jsonl").read_text() == ""


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: the second process names the cause (CUDA mocked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"cuda:1: this machine has 1 GPU\(s\); start at most that many processes"):
        setup_distributed(None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert setup_distributed(None)[3] == torch.device("cuda", 0)  # WORLD_SIZE 1: no process group
    assert setup_distributed(torch.device("cpu"))[3] == torch.device("cpu")  # --device cpu: whatever the machine
