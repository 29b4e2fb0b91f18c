"""Tests for train_vit.py: the ViT against raw kernels and transformers, the checkpoint readers, the data
readers, training (resume, torchrun), merging and the cluster maps. Tiny models, CPU."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import images
import train_vit
import vit
from conftest import user_error
from gift import add_gift
from fileio import UserError, read_safetensors, write_safetensors
from images import read_split
from vit import ViT, ViTConfig, load_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def make_demo(root):
    """The demo's files: its random ViT (Google .npz) and images of 4 classes. (checkpoint, train dir, test dir)"""
    return vit.random_google_npz(os.path.join(root, "ViT-demo.npz")), *images.demo_images(root, np.random.default_rng(0))


@pytest.fixture(scope="module")
def _vit_demo(tmp_path_factory, one_thread):
    """The demo's synthetic npz checkpoint and image folders, and one 2-epoch run with cluster maps."""
    root = tmp_path_factory.mktemp("vit_demo")
    ckpt, train_dir, test_dir = make_demo(str(root))
    args = ["--model", ckpt, "--train", train_dir, "--test", test_dir, "--epochs", "2", "--warmup", "0",
            "--batch-size", "16", "--lr", "3e-3", "--workers", "0", "--device", "cpu"]
    model = train_vit.train(train_vit.parse_args(args + ["--out", str(root / "run"), "--visualize", "1"]))
    return dict(root=root, ckpt=ckpt, train=train_dir, test=test_dir, args=args, model=model)


def test_vit_training_changes_only_theta_and_head(_vit_demo):
    trained = _vit_demo["model"].state_dict()
    with torch.random.fork_rng():
        torch.manual_seed(42)  # what train() draws (--seed's default, the paper's): the new head, then phi
        start = load_vit(_vit_demo["ckpt"], num_classes=4)
        add_gift(start, ["attn.proj"], 16)
    start = start.state_dict()
    assert sorted(trained) == sorted(start)
    changed = sorted(k for k in start if not torch.equal(start[k], trained[k]))
    assert changed == ["gift.attn_proj.phi.weight", "gift.attn_proj.psi.weight", "head.bias", "head.weight"]
    log = [json.loads(line) for line in open(_vit_demo["root"] / "run" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    # per epoch, no warmup: 3e-3 at t=0, then 1e-6 + (3e-3 - 1e-6)(1 + cos(pi / 2)) / 2
    assert [r["lr"] for r in log] == [3e-3, 1e-6 + (3e-3 - 1e-6) / 2]
    assert {(r["method"], r["adapter_params"]) for r in log} == {("gift", 2 * 16 * 64)}


def test_vit_cluster_map_png_written(_vit_demo):
    from PIL import Image
    pngs = sorted((_vit_demo["root"] / "run" / "cluster_maps").glob("*.png"))
    assert len(pngs) == 1
    T, L = images.TITLE, images.LABEL
    with Image.open(pngs[0]) as im:  # title; 4 layers x (image, all clusters, 16 maps) in 128 px tiles; colour key
        assert im.size == (18 * 128, T + 4 * (128 + L) + images.LEGEND)
        px = np.asarray(im.convert("RGB"), dtype=np.int64)
    image = px[T + L:T + L + 128, :128]
    zero = 0.4 * image + 0.6 * np.array([0, 0, 127.5])  # a map value zeroed under 0.5: jet(0) = dark blue
    for k in range(16):
        tile = px[T + L:T + L + 128, 128 * (k + 2):128 * (k + 3)]
        cold = (np.abs(tile - zero) <= 1).all(-1).mean()
        assert 0.02 < cold < 1  # thresholded at 0.5 after min-max: a part is zero, never all of it
        swatch = px[T + 4:T + 10, 128 * (k + 2) + 4:128 * (k + 2) + 10]  # the cluster's colour beside its name
        assert (swatch == swatch[0, 0]).all() and not (swatch[0, 0] == 0).all()
    blend = px[T + L:T + L + 128, 128:256]  # all clusters: the image, or 0.4 image + 0.6 a swatch's colour
    swatches = px[T + 6, [128 * (k + 2) + 6 for k in range(16)]]
    options = np.concatenate([image[None], 0.4 * image[None] + 0.6 * swatches[:, None, None]])  # (17, 128, 128, 3)
    assert (np.abs(options - blend[None]).max(-1) <= 1).any(0).mean() > 0.99
    assert len({tuple(c) for c in swatches}) == 16  # r distinct colours


def test_vit_merge_equals_unmerged(_vit_demo, tmp_path):
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    out = train_vit.merge(train_vit.parse_args(["--adapter", adapter, "--merge", str(tmp_path / "m" / "m.st")]))
    assert os.listdir(tmp_path / "m") == ["m.st"]  # written into a temporary sibling, then renamed
    merged = load_vit(out, ViTConfig(image_size=64, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=128)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), _vit_demo["model"].eval()(x), rtol=0, atol=1e-5)
    assert "gift.attn_proj.phi.weight" in read_safetensors(adapter) and len(read_safetensors(adapter)) == 4


def test_vit_resume_equals_uninterrupted(_vit_demo, tmp_path, monkeypatch):
    args = _vit_demo["args"] + ["--epochs", "3"]
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "a")]))
    evaluate, calls = train_vit.evaluate, []

    def crash_in_epoch_2(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a)
    monkeypatch.setattr(train_vit, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    monkeypatch.setattr(train_vit, "evaluate", evaluate)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)  # epoch 2's training, saved before its
    assert (ckpt["step"], ckpt["epoch"], ckpt["in_epoch"]) == (12, 1, 6)       # evaluation failed (issue 22.5)
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b"), "--resume"]))
    a, b = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    assert [(r["train_loss"], r["test_top1"]) for r in logs[0]] == [(r["train_loss"], r["test_top1"]) for r in logs[1]]
    with pytest.raises(UserError, match="checkpoint.pt exists: add --resume"):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b")]))
    with pytest.raises(UserError, match=r"other settings or inputs \(lr 0.003 -> 0.001\)"):
        train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "b"), "--resume", "--lr", "1e-3"]))


def test_vit_torchrun_two_processes_match_one(_vit_demo, tmp_path, torchrun):
    # vtab preset and no drop_path: no randomness, so 2 ranks x 4 images = 1 process x 8 images, step by step
    args = _vit_demo["args"] + ["--epochs", "1", "--batch-size", "8", "--preset", "vtab", "--drop-path", "0"]
    train_vit.train(train_vit.parse_args(args + ["--out", str(tmp_path / "one")]))
    torchrun("train_vit.py", *args, "--out", tmp_path / "two")
    one, two = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    assert not torch.equal(one["gift.attn_proj.psi.weight"], torch.zeros_like(one["gift.attn_proj.psi.weight"]))
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    ref = json.loads((tmp_path / "one" / "log.jsonl").read_text())
    # both ranks' test shares counted; float32 sums in another order may flip a near tie: one of 48 images
    assert len(log) == 1 and abs(log[0]["test_top1"] - ref["test_top1"]) <= 100 / 48 + 1e-9
    assert abs(log[0]["train_loss"] - ref["train_loss"]) < 1e-5       # both ranks' losses averaged


# -----------------------------------------------------------------------------
# Faults: a run stops with one clear line, never in silent garbage, never over a user's files

def _vit_user_error(capsys, argv, match):
    err = user_error(capsys, train_vit.main, argv)
    assert re.search(match, err), err


def test_vit_nonfinite_loss_stops_and_keeps_the_last_checkpoint(_vit_demo, tmp_path, monkeypatch, capsys):
    ce, calls = F.cross_entropy, []

    def nan_at_epoch_2_step_2(logits, y):  # 96 images in batches of 16: 6 steps per epoch
        calls.append(1)
        return ce(logits, y) * (float("nan") if len(calls) == 8 else 1.0)
    monkeypatch.setattr(F, "cross_entropy", nan_at_epoch_2_step_2)
    out = tmp_path / "run"
    _vit_user_error(capsys, _vit_demo["args"] + ["--out", str(out)],
                    r"epoch 2, step 2: loss nan, gradient norm nan; training stopped, .*checkpoint.pt \(step 6\) is kept")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["in_epoch"]) == (6, 1, 0) and all(t.isfinite().all() for t in ckpt["adapter"].values())
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1]  # strict JSON, epoch 1 only
    assert not (out / "adapter.safetensors").exists()


def test_vit_resume_compares_inputs_by_content(_vit_demo, tmp_path, capsys):
    shutil.copytree(_vit_demo["root"] / "run", tmp_path / "run")
    moved = shutil.copy(_vit_demo["ckpt"], str(tmp_path / "moved.npz"))  # the same checkpoint elsewhere: the same run
    args = _vit_demo["args"] + ["--out", str(tmp_path / "run"), "--resume"]
    train_vit.train(train_vit.parse_args(args + ["--model", moved]))
    assert "resumed from" in capsys.readouterr().out
    w = dict(np.load(moved))
    w["embedding/bias"][0] += 1  # other weights under the same name
    np.savez(moved, **w)
    _vit_user_error(capsys, args + ["--model", moved], r"written by a run with other settings or inputs "
                    r"\(model '[0-9a-f]+' -> '[0-9a-f]+'\)")
    shutil.copytree(_vit_demo["train"], tmp_path / "train")
    os.remove(tmp_path / "train" / "red" / "000.png")
    _vit_user_error(capsys, args + ["--train", str(tmp_path / "train")], r"\(train '[0-9a-f]+' -> '[0-9a-f]+'\)")
    _vit_user_error(capsys, _vit_demo["args"] + ["--out", str(tmp_path / "run")], "checkpoint.pt exists: add --resume")
    train_vit.main(_vit_demo["args"] + ["--out", str(tmp_path / "new"), "--resume", "--epochs", "1"])
    assert f"--resume: no {tmp_path / 'new' / 'checkpoint.pt'} yet, starting a new run" in capsys.readouterr().out


def test_vit_augmentation_does_not_depend_on_workers(_vit_demo):
    samples, _ = read_split(_vit_demo["train"])
    data = images.ImageDataset([(p, y) for p, y, _ in samples[:12]], 32, "train", seed=0)

    def batches(workers, epoch):
        data.epoch = epoch
        return [x for x, _ in torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers)]
    one = batches(0, 3)
    assert all(torch.equal(a, b) for a, b in zip(one, batches(2, 3)))  # crops and flips: from (seed, epoch, index)
    assert not all(torch.equal(a, b) for a, b in zip(one, batches(0, 4)))


def test_vit_image_error_in_a_worker_is_one_line(_vit_demo, tmp_path, capsys):
    from PIL import Image
    shutil.copytree(_vit_demo["train"], tmp_path / "train")
    Image.new("RGB", (1, 20000)).save(tmp_path / "train" / "red" / "strip.png")  # 157 bytes, 256 x 5M once resized
    _vit_user_error(capsys, _vit_demo["args"] + ["--train", str(tmp_path / "train"), "--workers", "2", "--out",
                                                 str(tmp_path / "run")],  # raised in a worker, unwrapped by @cli
                    r"^error: image .*strip.png: 1 x 20000 pixels is over the limit .*\n$")


@pytest.mark.parametrize("layout,match", [
    ("flat", r"flat: no images in class folders \(its images lie directly in it\); a split is a folder with one"),
    ("empty_class", r"empty_class: the class folder\(s\) ant hold no images"),
    ("one_class", r"--train .*one_class: every image has the same label; a classifier needs two classes or more"),
    ("latin1.txt", r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 18\); save it as UTF-8"),
    ("empty.txt", r"empty.txt: no images; a split is a folder")])
def test_vit_bad_training_splits(_vit_demo, tmp_path, capsys, layout, match):
    src = Path(_vit_demo["train"])
    spec = tmp_path / layout
    if layout == "flat":
        spec.mkdir()
        for f in sorted((src / "red").iterdir())[:3]:
            shutil.copy(f, spec)
    elif layout in ("empty_class", "one_class"):
        shutil.copytree(src / "red", spec / "red")
        if layout == "empty_class":
            shutil.copytree(src / "blue", spec / "blue")
            (spec / "ant").mkdir()
    else:
        spec.write_bytes(b"" if layout == "empty.txt" else b"red/0.png 0\nrouge/\xe9t\xe9.png 1\n")
    _vit_user_error(capsys, _vit_demo["args"] + ["--train", str(spec), "--test", str(spec), "--root", str(src),
                                                 "--out", str(tmp_path / "run")] + (["--num-classes", "4"] if
                                                                                    "one" in layout else []), match)


@pytest.mark.parametrize("out,match", [
    ("base", "is the base checkpoint: writing there would destroy it"),
    ("adapter", "is the adapter: writing there would destroy it"),
    ("folder", r"is a folder: give the file to write, e.g. .*merged.safetensors"),
    ("taken", r"taken.safetensors exists: choose a new path"),
    ("llama_adapter", "is an adapter of train_llama.py, not of train_vit.py"),
    ("adapter.pt", r"adapter.pt: no 'state_dict' in it \(found \[\]\); not a GIFT authors' checkpoint")])
def test_vit_merge_refuses(_vit_demo, tmp_path, capsys, out, match):
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    write_safetensors(tmp_path / "llama.safetensors", {"x": torch.zeros(1)},
                      {"config": json.dumps({"script": "train_llama.py", "targets": ["attention.wq"]})})
    torch.save({}, tmp_path / "adapter.pt")
    given = {"llama_adapter": str(tmp_path / "llama.safetensors"), "adapter.pt": str(tmp_path / "adapter.pt")}
    path = {"base": _vit_demo["ckpt"], "adapter": adapter, "folder": str(tmp_path),
            "taken": str(tmp_path / "taken.safetensors")}.get(out, str(tmp_path / "new.safetensors"))
    base = ["--model", _vit_demo["ckpt"]] if out == "adapter.pt" else []  # a torch file names no base
    _vit_user_error(capsys, ["--adapter", given.get(out, adapter), "--merge", path, *base], match)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me" and not (tmp_path / "new.safetensors").exists()


def test_vit_demo_refuses_a_used_out(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    _vit_user_error(capsys, ["--demo", "--out", str(tmp_path)], r"--out .* holds files \(notes.txt\)")
def test_vit_lr_schedule_is_timms():
    # timm's CosineLRScheduler(t_initial=100, warmup_t=10, warmup_lr_init=1e-7, lr_min=1e-6), per epoch, by hand
    lr = [train_vit.cosine_lr(t, 1e-4, 100, 10, 1e-7, 1e-6) for t in range(100)]
    assert lr[0] == 1e-7 and abs(lr[5] - 5.005e-5) < 1e-18 and abs(lr[9] - 9.001e-5) < 1e-18
    # from epoch 10 the cosine runs on t itself (warmup_prefix=False): cos(pi/10) = 0.95106, cos(0.99 pi) = -0.99951
    assert abs(lr[10] - 9.757729755661e-05) < 1e-15 and abs(lr[99] - 1.0244252621e-06) < 1e-15
    assert max(lr) == lr[10] and all(a > b for a, b in zip(lr[10:], lr[11:]))
    # --schedule step: the same function in steps (timm's t_in_epochs=False), 7 steps an epoch
    assert train_vit.cosine_lr(3, 1e-4, 700, 70, 1e-7, 1e-6) == 1e-7 + 3 * (1e-4 - 1e-7) / 70
    args = train_vit.parse_args(["--demo"])
    assert (args.precision, args.schedule, args.seed, args.drop_path, args.warmup, args.warmup_lr, args.min_lr,
            args.epochs, args.batch_size, args.rank, args.method) == ("fp32", "epoch", 42, 0.1, 10, 1e-7, 1e-6, 100,
                                                                       32, 16, "gift")


def test_vit_adapter_evaluated_with_its_stored_top1(_vit_demo, capsys):
    run = _vit_demo["root"] / "run"
    logged = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["test_top1"]
    top1 = train_vit.eval_only(train_vit.parse_args(["--eval-only", "--adapter", str(run / "adapter.safetensors"), "--test",
                                                _vit_demo["test"], "--batch-size", "16", "--workers", "0", "--device", "cpu"]))
    assert round(top1, 4) == logged  # the same weights, data and batches as the run's last evaluation
    assert f"stored in the adapter: {logged:.2f}%" in capsys.readouterr().out


def test_vit_lora_end_to_end(_vit_demo, tmp_path):
    out = tmp_path / "lora"
    model = train_vit.train(train_vit.parse_args(_vit_demo["args"] + ["--epochs", "1", "--out", str(out),
                                                                      "--method", "lora"]))
    adapter = read_safetensors(str(out / "adapter.safetensors"))
    assert sorted(adapter) == sorted([f"blocks.{i}.attn.proj.lora_{m}" for i in range(4) for m in "AB"]
                                     + ["head.bias", "head.weight"])
    assert adapter["blocks.0.attn.proj.lora_A"].shape == (8, 64)  # r = 8, the paper's LoRA
    assert adapter["blocks.3.attn.proj.lora_B"].abs().max() > 0
    log = json.loads((out / "log.jsonl").read_text())
    assert (log["method"], log["adapter_params"]) == ("lora", 4 * 8 * (64 + 64))
    merged_path = train_vit.merge(train_vit.parse_args(["--adapter", str(out / "adapter.safetensors"), "--merge",
                                                        str(tmp_path / "merged.safetensors")]))
    merged = read_safetensors(merged_path)
    assert sorted(merged) == sorted(load_vit(_vit_demo["ckpt"], num_classes=4).state_dict())  # plain ViT keys
    plain = load_vit(merged_path, ViTConfig(image_size=64, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=128))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=1e-5)
    top1 = train_vit.eval_only(train_vit.parse_args(["--eval-only", "--adapter", str(out / "adapter.safetensors"), "--test",
                                                _vit_demo["test"], "--batch-size", "16", "--workers", "0", "--device", "cpu"]))
    assert round(top1, 4) == log["test_top1"]


AUTHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "assets", "authors_gift_adapters",
                       "CUB_last.pth.tar")


@pytest.mark.skipif(not os.path.isfile(AUTHORS), reason="../shared/assets/authors_gift_adapters is absent")
def test_vit_authors_adapter_converts_to_the_same_logits(tmp_path, capsys):
    state, run, metric = vit.read_authors_adapter(AUTHORS)  # CUDA-saved tensors, Namespace allow-listed
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "gift.attn_proj.phi.weight": (16, 768), "gift.attn_proj.psi.weight": (768, 16),
        "head.weight": (200, 768), "head.bias": (200,)}
    assert (run["method"], run["targets"], run["rank"], run["arch"]) == ("gift", ["attn.proj"], 16,
                                                                        "vit_base_patch16_224.augreg_in21k")
    assert abs(metric - 89.7135) < 1e-4
    # the authors' formula straight from the file: W' = out(in(W)) + W for every block's attn.proj, fp64
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(AUTHORS, map_location="cpu", weights_only=True)["state_dict"]
    phi, psi = sd["in_projections.attn:proj.weight"].double(), sd["out_projections.attn:proj.weight"].double()
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=16, dim=768, depth=2, heads=12, mlp_dim=256, num_classes=200)
    base = ViT(cfg)
    write_safetensors(tmp_path / "base.safetensors", base.state_dict())
    ref = ViT(cfg).double()
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        for block in ref.blocks:
            w = block.attn.proj.weight
            w += F.linear(F.linear(w, phi), psi)            # (768,768) -> (768,16) -> (768,768)
        ref.head.weight.copy_(sd["backbone.head.weight"])
        ref.head.bias.copy_(sd["backbone.head.bias"])
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    args = ["--adapter", AUTHORS, "--model", str(tmp_path / "base.safetensors")]
    ours, _, stored = train_vit.adapter_model(train_vit.parse_args(args + ["--eval-only", "--test", str(tmp_path)]))
    assert stored == metric and ours.config == cfg
    with torch.no_grad():
        want = ref.eval()(x)
        torch.testing.assert_close(ours.double().eval()(x), want, rtol=0, atol=1e-10)  # activation form
        train_vit.main(args + ["--merge", str(tmp_path / "merged.safetensors")])
        merged = load_vit(str(tmp_path / "merged.safetensors")).double().eval()
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-6)  # W (I + phi psi) summed and stored in fp32
    # the start of a fine-tuning run: its Theta (the demo's 4 classes need a new head); 0 epochs writes the start
    ckpt, train_dir, test_dir = make_demo(str(tmp_path / "demo"))
    train_vit.main(args + ["--train", train_dir, "--test", test_dir, "--epochs", "0", "--workers", "0", "--device", "cpu", "--out",
                           str(tmp_path / "ft")])
    start = read_safetensors(str(tmp_path / "ft" / "adapter.safetensors"))
    assert torch.equal(start["gift.attn_proj.psi.weight"], state["gift.attn_proj.psi.weight"])
    assert start["head.weight"].shape == (4, 768)
    # evaluation and cluster maps: top-1 printed beside the file's 89.71
    images = sorted(Path(test_dir).rglob("*.png"))[:3]
    (tmp_path / "test.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(images)))
    train_vit.main(args + ["--eval-only", "--test", str(tmp_path / "test.txt"), "--root", "/", "--visualize", "1",
                           "--workers", "0", "--device", "cpu",
                           "--out", str(tmp_path / "eval")])
    assert "of 3 images; stored in the adapter: 89.71%" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Interruption, --stop-after, the issue-18 rows, --compile, CUDA

def test_vit_sigint_mid_epoch_then_resume_equals_uninterrupted(_vit_demo, tmp_path, monkeypatch, capsys):
    ce, calls = F.cross_entropy, []

    def signal_at_step_8(logits, y):  # epoch 2, step 2 of 6: the handler only flags it, the step finishes
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return ce(logits, y)
    monkeypatch.setattr(F, "cross_entropy", signal_at_step_8)
    out, argv = tmp_path / "b", _vit_demo["args"] + ["--out", str(tmp_path / "b")]
    train_vit.main(argv)
    assert re.search(r"stopped by SIGINT after 8 of 12 steps: .*checkpoint.pt holds it; to continue, run the same "
                     r"command with --resume\n", capsys.readouterr().out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["in_epoch"]) == (8, 1, 2) and not (out / "adapter.safetensors").exists()
    monkeypatch.setattr(F, "cross_entropy", ce)
    train_vit.main(argv + ["--resume"])
    a, b = (read_safetensors(str(d / "adapter.safetensors")) for d in (_vit_demo["root"] / "run", out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same code path, seeds and batches: bit for bit
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (_vit_demo["root"] / "run", out)]
    assert [(r["step"], r["train_loss"], r["test_top1"]) for r in logs[0]] == [
        (r["step"], r["train_loss"], r["test_top1"]) for r in logs[1]]


def test_vit_sigterm_to_a_process_saves_and_resumes(_vit_demo, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(Path(train_vit.__file__)), *_vit_demo["args"], "--epochs", "40", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # printed once the signal handlers are in place
        if line.startswith("training: "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 240 and f"stopped by SIGTERM after {step} of 240 steps" in rest
    assert "SIGTERM: finishing this step, then saving" in err and not (out / "adapter.safetensors").exists()
    train_vit.main(_vit_demo["args"] + ["--epochs", "40", "--out", str(out), "--resume", "--stop-after", str(step + 1)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 1


def test_vit_stop_after_saves_without_evaluating(_vit_demo, tmp_path, capsys, monkeypatch):
    out, argv = tmp_path / "run", _vit_demo["args"] + ["--out", str(tmp_path / "run")]
    monkeypatch.setattr(train_vit, "evaluate", None)  # would fail if called
    train_vit.main(argv + ["--stop-after", "6"])  # the end of epoch 1: still no evaluation
    assert "stopped by --stop-after after 6 of 12 steps" in capsys.readouterr().out
    assert not (out / "log.jsonl").read_text() and not (out / "adapter.safetensors").exists()
    _vit_user_error(capsys, argv + ["--resume", "--stop-after", "6"], r"already holds 6 steps; give a later one")
    monkeypatch.undo()
    train_vit.main(argv + ["--resume"])  # epoch 1's evaluation first, then epoch 2: as if never stopped
    a, b = (read_safetensors(str(d / "adapter.safetensors")) for d in (_vit_demo["root"] / "run", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [6, 12]


@pytest.mark.parametrize("extra,match", [
    (["--targets", "attn.prj"], r"--targets attn.prj: no layer of the ViT is named so; valid: attn.qkv, attn.proj, "
                                r"mlp.fc1, mlp.fc2"),                                                     # row 1
    (["--rank", "0"], r"--rank 0: must be at least 1"), (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--epochs", "-1"], "--epochs -1: must be at least 0"), (["--stop-after", "0"], "--stop-after 0: must be at"),
    (["--lr", "0"], r"--lr 0.0: must be > 0"), (["--num-classes", "1"], "--num-classes 1: must be at least 2"),
    (["--drop-path", "1"], r"--drop-path 1.0: must be < 1"), (["--workers", "-1"], "--workers -1: must be at least"),
    (["--image-size", "0"], "--image-size 0: must be at least 1"), (["--lora-alpha", "0"], "--lora-alpha 0.0: must"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be at least 0"),                               # row 3
    (["--out", "FILE"], r"--out .*FILE is a file: give a folder"),                                        # row 5
    (["--train", "MISSING"], r"--train .*typo does not exist \(expected a folder of class folders, a VPT"),
    (["--test", "MISSING"], r"--test .*typo does not exist"), (["--root", "MISSING"], "--root .*typo does not "
                                                                                         r"exist \(expected a folder"),
    (["--model", "MISSING"], "--model .*typo does not exist"),                                         # row 8
    (["--adapter", "ADAPTER"], r"--adapter with --test alone: add --eval-only to evaluate it, or --train"),
])
def test_vit_user_mistakes_are_one_line(_vit_demo, tmp_path, capsys, extra, match):
    (tmp_path / "FILE").write_text("mine")
    paths = {"FILE": str(tmp_path / "FILE"), "MISSING": str(tmp_path / "typo"),
             "ADAPTER": str(_vit_demo["root"] / "run" / "adapter.safetensors")}
    argv = list(_vit_demo["args"])
    if "ADAPTER" in extra:  # --test without --train
        del argv[argv.index("--train"):argv.index("--train") + 2]
    out = ["--out", str(tmp_path / "run")] if "--out" not in extra else []
    _vit_user_error(capsys, argv + [paths.get(a, a) for a in extra] + out, match)


def test_vit_adapter_of_another_model_is_one_line(_vit_demo, tmp_path, capsys):  # row 4
    other = vit.random_google_npz(str(tmp_path / "wide.npz"), dim=96, depth=4, heads=4)
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    _vit_user_error(capsys, ["--adapter", adapter, "--model", other, "--eval-only", "--test", _vit_demo["test"],
                             "--device", "cpu"], r"adapter.safetensors was trained on .*ViT-demo.npz, dim 64, depth 4 "
                    r"and does not fit .*wide.npz: .*wide.npz holds a ViT of dim 96, .*the config given says dim 64")


def test_vit_eval_only_base_model_is_labelled_zero_shot(_vit_demo, tmp_path, capsys):  # row 6
    merged = train_vit.merge(train_vit.parse_args(["--adapter", str(_vit_demo["root"] / "run" / "adapter.safetensors"),
                                                   "--merge", str(tmp_path / "merged.safetensors")]))
    argv = ["--eval-only", "--test", _vit_demo["test"], "--workers", "0", "--device", "cpu"]
    capsys.readouterr()
    train_vit.main(["--model", merged, *argv])  # its ViTConfig from the metadata, its head the adapter's
    out = capsys.readouterr().out
    assert "the base model" in out and "zero-shot (its own head)" in out and "gift" not in out.lower().split("top-1")[0]
    _vit_user_error(capsys, ["--model", _vit_demo["ckpt"], *argv], r"ViT-demo.npz has no usable classifier head "
                    r"\(missing or all zeros, .*\), so it cannot be evaluated zero-shot: .* or give an adapter")


def test_vit_compiled_run_matches_eager(_vit_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("GIFT_COMPILE_BACKEND", "aot_eager")  # the compile path without inductor's C++ build
    argv = _vit_demo["args"] + ["--epochs", "1", "--preset", "vtab", "--drop-path", "0"]
    eager = train_vit.train(train_vit.parse_args(argv + ["--out", str(tmp_path / "eager")]))
    compiled = train_vit.train(train_vit.parse_args(argv + ["--out", str(tmp_path / "compiled"), "--compile"]))
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)  # fused kernels round differently


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_vit_demo_on_cuda(tmp_path, capsys):
    train_vit.main(["--demo", "--out", str(tmp_path / "demo"), "--device", "cuda"])
    assert (tmp_path / "demo" / "run" / "adapter.safetensors").exists() and "demo done" in capsys.readouterr().out


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_vit_cuda_compile_and_cuda_graphs_match_eager(_vit_demo, tmp_path, mode):
    """--compile MODE on the GPU (inductor; reduce-overhead replays one CUDA graph per shape, 2 here: the full
    batches and the last, partial one) against eager on the GPU: the same Theta after 1 epoch, fp32."""
    argv = [a if a != "cpu" else "cuda" for a in _vit_demo["args"]] + ["--epochs", "1", "--drop-path", "0",
                                                                       "--precision", "fp32"]
    eager = train_vit.train(train_vit.parse_args(argv + ["--out", str(tmp_path / "eager")]))
    compiled = train_vit.train(train_vit.parse_args(argv + ["--out", str(tmp_path / mode), "--compile", mode]))
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)


@cuda
def test_vit_gift_step0_is_the_base_model_and_merge_matches_in_bf16(_vit_demo):
    base = load_vit(_vit_demo["ckpt"], num_classes=4).cuda().eval()
    model = load_vit(_vit_demo["ckpt"], num_classes=4).cuda().eval()
    model.load_state_dict(base.state_dict())
    add_gift(model, ["attn.proj"], 16)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(x), base(x))  # psi = 0: the edit adds exact zeros
        trained = _vit_demo["model"].cuda().eval()
        merged = load_vit(train_vit.merge(train_vit.parse_args([
            "--adapter", str(_vit_demo["root"] / "run" / "adapter.safetensors"), "--merge",
            str(_vit_demo["root"] / "cuda_merged.safetensors")]))).cuda().eval()
        # bf16 matmuls of W x and of W (I + phi psi) x round differently: a few bf16 ulps of logits of size ~1
        torch.testing.assert_close(merged(x).float(), trained(x).float(), rtol=0, atol=0.1)
    _vit_demo["model"].cpu()


# -----------------------------------------------------------------------------
# Issue 22 (classes 1, 4, 6) and issue 19 (the VTAB preset, the table, seeds)

def test_vit_adapter_on_another_base_is_refused(_vit_demo, tmp_path, capsys):  # class 1: never silently wrong
    adapter = str(_vit_demo["root"] / "run" / "adapter.safetensors")
    merged = train_vit.merge(train_vit.parse_args(["--adapter", adapter, "--merge", str(tmp_path / "m.safetensors")]))
    argv = ["--adapter", adapter, "--eval-only", "--test", _vit_demo["test"], "--workers", "0", "--device", "cpu"]
    _vit_user_error(capsys, argv + ["--model", merged], r"adapter.safetensors was trained on .*ViT-demo.npz \(identity "
                    r"[0-9a-f]{16}\), not on .*m.safetensors \(identity [0-9a-f]{16}\).*add --any-base")
    other = vit.random_google_npz(str(tmp_path / "other.npz"), seed=1)  # the same shapes, other weights
    _vit_user_error(capsys, argv + ["--model", other], r"not on .*other.npz .*--any-base")
    _vit_user_error(capsys, ["--adapter", adapter, "--model", other, "--merge", str(tmp_path / "x.safetensors")],
                    r"not on .*other.npz")
    assert train_vit.main(argv + ["--model", other, "--any-base"]) is None  # the user knows: applied


def test_vit_adapter_shapes_checked_before_the_base_loads(_vit_demo, tmp_path, capsys, monkeypatch):  # class 4
    path = str(tmp_path / "wide.safetensors")
    write_safetensors(path, {"gift.attn_proj.phi.weight": torch.zeros(16, 96), "gift.attn_proj.psi.weight":
                             torch.zeros(96, 16), "head.weight": torch.zeros(4, 96), "head.bias": torch.zeros(4)},
                      {"config": json.dumps({"targets": ["attn.proj"], "rank": 16, "model": "wide.npz"})})
    monkeypatch.setattr(train_vit, "build_vit", None)  # loading the base's weights would fail the test
    argv = ["--adapter", path, "--model", _vit_demo["ckpt"], "--device", "cpu", "--workers", "0"]
    for mode in (["--eval-only", "--test", _vit_demo["test"]], ["--train", _vit_demo["train"], "--test",
                                                                  _vit_demo["test"], "--out", str(tmp_path / "r")]):
        _vit_user_error(capsys, argv + mode, r"wide.safetensors was trained on wide.npz and does not fit .*ViT-demo.npz "
                        r"\(dim 64, depth 4\): gift.attn_proj.phi.weight is \(16, 96\) there, \(16, 64\) here")


def test_vit_finished_runs_and_evaluations_are_never_replaced(_vit_demo, tmp_path, capsys):  # class 6
    shutil.copytree(_vit_demo["root"] / "run", tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").unlink()
    _vit_user_error(capsys, _vit_demo["args"] + ["--out", str(tmp_path / "run")], r"holds a run \(log.jsonl, "
                    r"adapter.safetensors, cluster_maps\): add --resume to continue it, --overwrite to replace it")
    argv = ["--adapter", str(tmp_path / "run" / "adapter.safetensors"), "--eval-only", "--test", _vit_demo["test"],
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    train_vit.main(argv)
    result = json.loads((tmp_path / "run" / "eval_run-adapter_on_vit_demo0-test.json").read_text())
    assert result["images"] == 48 and result["test_top1"] == pytest.approx(result["stored"], abs=1e-3)
    _vit_user_error(capsys, argv, r"eval_run-adapter_on_vit_demo0-test.json holds this evaluation already: add "
                    r"--overwrite")
    train_vit.main(argv + ["--overwrite"])
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "adapter.safetensors", "cluster_maps",
                                                    "eval_run-adapter_on_vit_demo0-test.json", "log.jsonl"]


def test_vit_presets_set_the_protocol():  # issue 19: VTAB-1k's data handling and weight decay 0
    base = ["--model", "m", "--train", "t", "--test", "t"]
    fgvc, vtab = (train_vit.parse_args(["--demo", "--preset", p]) for p in ("fgvc", "vtab"))
    assert (fgvc.weight_decay, vtab.weight_decay) == (1e-4, 0.0)
    assert train_vit.parse_args(["--demo", "--preset", "vtab", "--weight-decay", "0.01"]).weight_decay == 0.01
    assert (vtab.lr, vtab.epochs, vtab.warmup, vtab.batch_size, vtab.drop_path, vtab.precision) == (
        1e-4, 100, 10, 32, 0.1, "fp32")
    with pytest.raises(UserError, match="does not exist"):
        train_vit.parse_args(base)


def _fake_run(folder, train, seed, top1):
    os.makedirs(folder)
    write_safetensors(os.path.join(folder, "adapter.safetensors"), {"head.bias": torch.zeros(2)}, {"config": json.dumps(
        {"script": "train_vit.py", "targets": ["attn.proj"], "rank": 16, "train": train, "seed": seed,
         "test_top1": top1})})
    return str(folder)


def test_vit_table_of_vtab_runs(tmp_path, capsys):  # issue 19: per task, per group, the mean of 19, over seeds
    runs = [_fake_run(tmp_path / f"{task}-{seed}", f"/data/vtab-1k/{task}/train800val200.txt", seed, top1)
            for task, seed, top1 in (("cifar", 42, 70.0), ("cifar", 43, 72.0), ("clevr_count", 42, 80.0),
                                     ("Camelyon", 42, 85.0))]
    train_vit.main(["--table", *runs])
    out = capsys.readouterr().out
    assert "| natural | cifar100 | 71.00 ± 1.41% | 2 |" in out and "| structured | clevr_count | 80.00% | 1 |" in out
    assert "| specialized | patch_camelyon | 85.00% | 1 |" in out and "mean of 3 of 19 tasks** | 78.67% |" in out
    assert "missing: caltech101," in out and "GIFT 74.09%, LoRA 73.95%" in out
    _vit_user_error(capsys, ["--table", runs[0], runs[0]], r"a second run of cifar100 with seed 42")
    _vit_user_error(capsys, ["--table", str(tmp_path)], r"adapter .*adapter.safetensors does not exist")


def test_vit_seeds_run_once_each_and_write_one_table(_vit_demo, tmp_path, capsys):  # issue 19
    out = tmp_path / "runs"
    train_vit.main(_vit_demo["args"] + ["--epochs", "1", "--out", str(out), "--seeds", "42", "43"])
    logs = {s: json.loads((out / f"seed-{s}" / "log.jsonl").read_text()) for s in (42, 43)}
    assert logs[42]["train_loss"] != logs[43]["train_loss"]  # another seed: another head, order, crops
    table = (out / "table.md").read_text()
    top1 = [logs[s]["test_top1"] for s in (42, 43)]
    assert f"| other | vit_demo0 | {np.mean(top1):.2f} ± {np.std(top1, ddof=1):.2f}% | 2 |" in table
    assert table in capsys.readouterr().out
