"""Tests for images.py: the paper's preprocessing, the split files (FGVC .json, VTAB-1k .txt, class folders) and
their checks, VTAB-1k's task names and table. CPU, no model."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

import images
from fileio import UserError
from images import read_split


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
    with pytest.raises(UserError, match=r"missing.txt:2: image .*gone.png does not exist"):
        read_split(str(tmp_path / "missing.txt"))
    Image.new("RGB", (20, 30)).save(tmp_path / "img" / "c.png")
    (tmp_path / "train.json").write_text(json.dumps({"img/a b.png": 12, "img/c.png": 3}))  # VPT: ids mapped 0..C-1
    samples, classes = read_split(str(tmp_path / "train.json"))
    assert classes == [3, 12] and [y for _, y, _ in samples] == [1, 0]
    (tmp_path / "test.json").write_text(json.dumps({"img/c.png": 12, "img/a b.png": 5}))
    with pytest.raises(ValueError, match=r"test.json: entry 'img/a b.png': class 5 is not among the training"):
        read_split(str(tmp_path / "test.json"), classes=classes)
    with pytest.raises(ValueError, match=r"train.json: entry 'img/a b.png': label 1 outside \[0, 1\)"):
        images.check_labels(samples, 1)
    (tmp_path / "range.txt").write_text("img/a b.png 0\nimg/a b.png -1\n")
    with pytest.raises(ValueError, match=r"range.txt:2: label -1 outside \[0, 3\)"):
        images.check_labels(read_split(str(tmp_path / "range.txt"))[0], 3)
    xs, ys = np.meshgrid(np.arange(18), np.arange(27))  # 18 x 27: Resize(round(16 * 256 / 224) = 18) keeps it
    Image.fromarray(np.stack([xs * 10, ys * 5, xs * 0 + 7], -1).astype(np.uint8)).save(tmp_path / "grid.png")
    x = images.load_image(str(tmp_path / "grid.png"), 16, "test")  # CenterCrop(16): left 1, top round(5.5) = 6
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10.0, 30.0, 7.0]) / 127.5 - 1)
    torch.testing.assert_close(x[:, 15, 15], torch.tensor([160.0, 105.0, 7.0]) / 127.5 - 1)
    x = images.load_image(str(tmp_path / "grid.png"), 9, "resize")  # VTAB: straight to 9 x 9
    assert x.shape == (3, 9, 9)


def _png_header(path, w, h):
    """A PNG whose header says w x h pixels (the data is cut off: the size alone must be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                     chunk(b"IDAT", b""))


@pytest.mark.parametrize("name,make,match", [
    ("strip.png", lambda p: __import__("PIL.Image").Image.new("RGB", (1, 20000)).save(p),
     r"image .*strip.png: 1 x 20000 pixels is over the limit of 67108864 pixels and an aspect ratio of 20:1"),
    ("huge.png", lambda p: _png_header(p, 9000, 9000), r"image .*huge.png: 9000 x 9000 pixels is over the limit"),
    ("cut.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), r"cannot decode image .*cut.png"),
    ("text.jpg", lambda p: p.write_text("not an image"), r"cannot decode image .*text.jpg")])
def test_vit_image_costs_are_capped(tmp_path, name, make, match):
    make(tmp_path / name)
    with pytest.raises(UserError, match=match):
        images.load_image(str(tmp_path / name), 32, "train", np.random.default_rng(0))




@pytest.mark.parametrize("content,match", [  # issue 22 class 5: no label that is not a class id, named by record
    ('{"a.png": NaN}', r"x.json: entry 'a.png': label nan is not an integer"),
    ('{"a.png": Infinity}', r"x.json: entry 'a.png': label inf is not an integer"),
    ('{"a.png": true}', r"x.json: entry 'a.png': label True is not an integer"),
    ('{"a.png": 3.0}', r"x.json: entry 'a.png': label 3.0 is not an integer"),
    ('{"a.png": [1]}', r"x.json: entry 'a.png': label \[1\] is not an integer"),
    ("a.png 1\na.png nan\n", r"x.txt:2: label 'nan' is not an integer"),
    ("a.png inf\n", r"x.txt:1: label 'inf' is not an integer"),
    ("a.png 1e3\n", r"x.txt:1: label '1e3' is not an integer")])
def test_non_finite_or_non_integer_labels_are_refused(tmp_path, content, match):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    spec = tmp_path / ("x.json" if content.startswith("{") else "x.txt")
    spec.write_text(content)
    with pytest.raises(UserError, match=match):
        read_split(str(spec))


def test_vtab_task_names_and_table():
    assert sum(len(t) for t in images.VTAB_GROUPS.values()) == 19
    for folder, task in (("cifar", "cifar100"), ("CIFAR-100", "cifar100"), ("clevr_count", "clevr_count"),
                         ("dsprites_loc", "dsprites_loc"), ("smallnorb_azi", "smallnorb_azi"),
                         ("oxford_iiit_pet", "oxford_iiit_pet"), ("diabetic_retinopathy", "diabetic_retinopathy"),
                         ("Camelyon", "patch_camelyon"), ("clevr_closest_object_distance", "clevr_dist"),
                         ("CUB_200_2011", None)):
        assert images.vtab_task(folder) == task, folder
    text = images.vtab_table({"cifar100": {42: 70.0, 43: 72.0}, "dtd": {42: 60.0, 43: 64.0}, "eurosat": {42: 95.5},
                              "CUB": {42: 89.0}})
    assert "| natural | cifar100 | 71.00 ± 1.41% | 2 |" in text          # sample std over seeds (n - 1)
    assert "| natural | **mean of 2 of 7** | 66.50 ± 2.12% | |" in text  # per-seed means 65, 68
    assert "| specialized | eurosat | 95.50% | 1 |" in text and "| other | CUB | 89.00% | 1 |" in text
    assert "| VTAB-1k | **mean of 3 of 19 tasks** | 76.17% | |" in text  # (71 + 62 + 95.5) / 3; seeds differ: no std
    assert "GIFT 74.09%, LoRA 73.95%" in text and "missing: caltech101, clevr_count," in text
