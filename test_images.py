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


