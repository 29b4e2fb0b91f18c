"""Image data for train_vit.py: the paper's preprocessing, the split files of FGVC (VPT .json) and VTAB-1k
(`path label` .txt) or class folders, VTAB-1k's task names, the demo's synthetic images, and the cluster-map figure.
Every reader checks what it reads and names the file and record of a mistake (fileio.UserError).

    samples, classes = read_split("CUB_200_2011/train.json", root="CUB_200_2011/images")  # [(path, label, where)]
    x = load_image(path, 224, "train", np.random.default_rng(0))                            # (3, 224, 224) in [-1, 1]
"""
import colorsys
import hashlib
import json
import os
import re
import signal

import numpy as np
import torch
import torch.nn.functional as F

from fileio import UserError, utf8_text

# What one image may cost before resizing: Resize(256) of a 1 x 20000 strip (138 bytes as a PNG) would make it
# 256 x 5 million pixels. Pillow's own guard counts pixels only, and only refuses past 179 million.
MAX_PIXELS, MAX_ASPECT = 1 << 26, 20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path, size: int, mode: str, rng=None):
    """The paper's preprocessing, in Pillow, to a (3, size, size) tensor in [-1, 1] (mean = std = 0.5).
    mode "train": Resize(256) RandomCrop(224) HFlip, the crop and flip drawn from rng (a numpy Generator);
    "test": Resize(256) CenterCrop(224) (FGVC, 256/224 of size in general); "resize": straight to size x size
    (VTAB-1k). An image over MAX_PIXELS or MAX_ASPECT is refused before it is decoded."""
    from PIL import Image  # imported here: importing this module stays cheap
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
                raise UserError(f"image {path}: {w} x {h} pixels is over the limit of {MAX_PIXELS} pixels and an "
                                f"aspect ratio of {MAX_ASPECT}:1 (what decoding and resizing it may cost); shrink "
                                f"or crop it, or leave it out of the split")
            im = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None
    if mode == "resize":
        im = im.resize((size, size), Image.BILINEAR)
    else:
        short, (w, h) = round(size * 256 / 224), im.size
        w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision's Resize(int)
        im = im.resize((w, h), Image.BILINEAR)
        if mode == "train":
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        else:
            top, left = round((h - size) / 2), round((w - size) / 2)
        im = im.crop((left, top, left + size, top + size))
        if mode == "train" and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # (3, size, size)


def read_split(spec, root=None, classes=None):
    """[(image path, label, where)] and the classes of one split; `where` names the record for errors.

    spec: a directory with one sub-folder per class (classes: the folder names); a VPT .json
    {relative_path: label} (classes: the sorted labels, mapped to 0..C-1 as VPT does, since FGVC ids need not
    start at 0 or be contiguous); or a VTAB-1k text file of `relative/path label` lines, labels already
    0..C-1 (classes: None). A label is an integer: not a bool, a float, NaN or inf. root: where relative paths
    start (default: the split file's folder). classes: the training split's, so that the test split maps alike."""
    if os.path.isdir(spec):
        names = sorted(d for d in os.listdir(spec) if os.path.isdir(os.path.join(spec, d)))
        samples = [(os.path.join(dirpath, f), name, os.path.join(dirpath, f)) for name in names
                   for dirpath, _, files in sorted(os.walk(os.path.join(spec, name)))
                   for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        empty = sorted(set(names) - {label for _, label, _ in samples})
        if empty and classes is None:  # the training split: a folder without images would be a class never seen
            raise UserError(f"{spec}: the class folder(s) {', '.join(empty[:5])} hold no images "
                            f"({' '.join(IMAGE_EXTENSIONS)}): remove them, or add images")
        classes = classes or names
    elif not os.path.isfile(spec):
        raise UserError(f"split {spec} does not exist (give a class-folder directory, .json or .txt)")
    else:
        root, samples, items = root or os.path.dirname(spec), [], []
        with open(spec, encoding="utf-8") as f, utf8_text(spec):
            if spec.endswith(".json"):
                try:
                    items = [(f"{spec}: entry {k!r}", k, v) for k, v in json.load(f).items()]
                except (json.JSONDecodeError, AttributeError) as e:
                    raise UserError(f"{spec}: not a JSON object {{relative_path: label}} ({e})") from None
            for i, line in enumerate([] if items else f, 1):
                if len(parts := line.strip().rsplit(maxsplit=1)) == 1:
                    raise UserError(f"{spec}:{i}: expected `relative/path label`, got {line.strip()!r}")
                items += [(f"{spec}:{i}", *parts)] if parts else []
        for where, rel, label in items:  # JSON's NaN, Infinity, true and 3.0 are no class ids either
            if isinstance(label, bool) or not isinstance(label, (int, str)) or not re.fullmatch(r"[-+]?\d+",
                                                                                             str(label).strip()):
                raise UserError(f"{where}: label {label!r} is not an integer")
            if not os.path.isfile(os.path.join(root, rel)):
                raise UserError(f"{where}: image {os.path.join(root, rel)} does not exist")
            samples.append((os.path.join(root, rel), int(label), where))
        if spec.endswith(".json"):
            classes = classes or sorted({label for _, label, _ in samples})
    if not samples:
        flat = os.path.isdir(spec) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(spec))
        raise UserError(f"{spec}: no images{' in class folders (its images lie directly in it)' if flat else ''}; "
                        f"a split is a folder with one sub-folder of images per class, a VPT .json "
                        f"{{relative_path: label}} or a .txt of `relative/path label` lines")
    index = {c: i for i, c in enumerate(classes or [])}
    for _, label, where in samples if classes else []:
        if label not in index:
            raise UserError(f"{where}: class {label!r} is not among the training split's classes")
    return ([(path, index[label], where) for path, label, where in samples] if classes else samples), classes


def check_labels(samples, num_classes):
    """[(path, label)] of read_split's samples; a label outside [0, num_classes) is an error naming its record."""
    for _, label, where in samples:
        if not 0 <= label < num_classes:
            raise UserError(f"{where}: label {label} outside [0, {num_classes})")
    return [(path, label) for path, label, _ in samples]


def read_splits(train, test, root=None, num_classes=None):
    """(train samples, test samples, classes, num_classes) of two splits of the same form, checked before any
    image is decoded; num_classes None: the class folders, the JSON's labels, or the largest training label + 1."""
    form = lambda spec: "folders" if os.path.isdir(spec) else os.path.splitext(spec)[1]  # noqa: E731
    if form(train) != form(test):
        raise UserError(f"--train {train} and --test {test} must have the same form (labels map alike)")
    train_samples, classes = read_split(train, root)
    test_samples, _ = read_split(test, root, classes)
    num_classes = num_classes or (len(classes) if classes else 1 + max(s[1] for s in train_samples))
    train_samples, test_samples = check_labels(train_samples, num_classes), check_labels(test_samples, num_classes)
    if len({label for _, label in train_samples}) < 2:  # a 1-way head is 100% right whatever it learns
        raise UserError(f"--train {train}: every image has the same label; a classifier needs two classes or more")
    return train_samples, test_samples, classes, num_classes


def split_id(samples):
    """A short hash of a split as a run sees it: its images' paths relative to their common folder, labels."""
    base = os.path.commonpath([path for path, _ in samples])
    listing = [(os.path.relpath(path, base), label) for path, label in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs; the crop and flip of sample i depend on (seed, epoch, i) alone, not on which worker
    or process decodes it: a run resumed with another --workers repeats them exactly."""
    def __init__(self, samples, size, mode, seed=0):
        self.samples, self.size, self.mode, self.seed, self.epoch = samples, size, mode, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return load_image(self.samples[i][0], self.size, self.mode, rng), self.samples[i][1]


def loader(dataset, batch_size, workers, device, sampler=None):
    """A DataLoader in order (or sampler's): pinned memory on CUDA, and workers that leave Ctrl-C to the main
    process (a terminal sends it to every process: a worker that died of it would end the run unsaved)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint if workers
                                       else None)


def _ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# VTAB-1k's 19 tasks in its three groups, under VTAB's names; other spellings seen in the wild (NOAH's and VPT's
# folders, the TFDS names) map to them

VTAB_GROUPS = {"natural": ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
               "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
               "structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                              "smallnorb_azi", "smallnorb_ele"]}
VTAB_ALIASES = {"cifar": "cifar100", "cifar_100": "cifar100", "caltech": "caltech101",
                "flowers102": "oxford_flowers102", "oxford_flowers": "oxford_flowers102",
                "flowers": "oxford_flowers102", "pets": "oxford_iiit_pet",
                "oxford_pet": "oxford_iiit_pet", "oxford_iiit_pets": "oxford_iiit_pet", "sun": "sun397",
                "camelyon": "patch_camelyon", "pcam": "patch_camelyon", "resisc": "resisc45",
                "retinopathy": "diabetic_retinopathy", "diabetic_retinopathy_detection": "diabetic_retinopathy",
                "clevr_count_all": "clevr_count", "clevr_closest_object_distance": "clevr_dist",
                "clevr_distance": "clevr_dist", "kitti_dist": "kitti", "kitti_distance": "kitti",
                "dsprites_location": "dsprites_loc", "dsprites_xpos": "dsprites_loc", "dsprites_orientation":
                "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele"}


def vtab_task(name):
    """VTAB's name of a task from a folder name (`vtab-1k/<task>/train800val200.txt`), or None if it is none."""
    key = re.sub(r"[-\s.]+", "_", str(name).strip().lower())
    key = VTAB_ALIASES.get(key, key)
    return key if any(key in tasks for tasks in VTAB_GROUPS.values()) else None


# -----------------------------------------------------------------------------
# The demo's synthetic images, and the cluster-map figure

def demo_images(root, rng):
    """Generated 80 px pictures of 4 classes (grey noise, one coloured square) in class folders under root/train
    (24 per class) and root/test (12). Returns (train dir, test dir)."""
    from PIL import Image
    colours = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
    for split, count in (("train", 24), ("test", 12)):
        for name, rgb in colours.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for j in range(count):
                img = rng.integers(60, 160, (80, 80, 3)).astype(np.uint8)
                s = rng.integers(20, 36)
                y0, x0 = rng.integers(0, 80 - s, 2)
                img[y0:y0 + s, x0:x0 + s] = rgb
                Image.fromarray(img).save(os.path.join(root, split, name, f"{j:03d}.png"))
    return os.path.join(root, "train"), os.path.join(root, "test")


def jet(v):
    """(...) values in [0, 1] -> (..., 3) RGB in [0, 255], the 'jet' colour map (dark blue at 0, red at 1)."""
    return np.stack([np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)], axis=-1) * 255


TITLE, LABEL, LEGEND = 16, 14, 36  # pixel heights of the title, the labels above each row, the colour key


def cluster_figure(x, rows, title):
    """The paper's cluster maps of one image as a PIL image. x: (3, H, W) in [-1, 1]; rows: [(layer name, maps
    (r, g, g))], each map upsampled bilinearly to the tile, min-max normalised, zeroed under 0.5 and overlaid as
    a heat map (alpha 0.6). A row: the image, 'all clusters' (each pixel in the colour of its strongest cluster,
    where that one is >= 0.5), then each cluster's map with its colour swatch; a title above, a colour key below."""
    from PIL import Image, ImageDraw
    tile, r = max(x.shape[-1], 128), max(len(maps) for _, maps in rows)  # tiles of at least 128 px stay readable
    palette = np.array([colorsys.hsv_to_rgb(k / r, 0.85, 0.95) for k in range(r)]) * 255  # (r, 3): cluster k's
    image = Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    base = np.asarray(image.resize((tile, tile), Image.BILINEAR), dtype=np.float32)  # (tile, tile, 3)
    canvas = Image.new("RGB", ((r + 2) * tile, TITLE + len(rows) * (tile + LABEL) + LEGEND), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black")
    for row, (name, maps) in enumerate(rows):
        maps = F.interpolate(maps[:, None].float(), size=(tile, tile), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
        maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()
        maps[maps < 0.5] = 0
        top = TITLE + row * (tile + LABEL)
        strongest = np.where(maps.max(0, keepdims=True)[..., None] > 0, palette[maps.argmax(0)][None], base)[0]
        tiles = [(f"layer {name}", base), ("all clusters", 0.4 * base + 0.6 * strongest)]
        tiles += [(f"cluster {k}", 0.4 * base + 0.6 * jet(m)) for k, m in enumerate(maps)]
        for col, (text, pixels) in enumerate(tiles):
            canvas.paste(Image.fromarray(pixels.round().astype(np.uint8)), (col * tile, top + LABEL))
            if col > 1:  # the cluster's swatch, as in the 'all clusters' tile
                draw.rectangle([col * tile + 2, top + 2, col * tile + 11, top + 11], fill=tuple(
                    palette[col - 2].astype(int)))
            draw.text((col * tile + (14 if col > 1 else 2), top + 1), text, fill="black")
    key = TITLE + len(rows) * (tile + LABEL) + 4  # the heat maps' scale: jet from 0.5 (blue) to 1 (red)
    draw.text((2, key + 1), "cluster k: its map, 0.5", fill="black")
    canvas.paste(Image.fromarray(jet(np.tile(np.linspace(0.5, 1, 128), (12, 1))).astype(np.uint8)), (150, key))
    draw.text((282, key + 1), "1 (min-max; under 0.5: none)", fill="black")
    draw.text((2, key + 18), "all clusters: each pixel in its strongest cluster's colour", fill="black")
    return canvas


def vtab_table(scores):
    """A markdown table of test top-1 (%) by task ({task: {seed: top-1}}): per task the mean, +- the sample
    standard deviation over seeds where there are several; for VTAB-1k each group's mean and the mean of the 19
    tasks (over the tasks given, the missing ones named), beside the paper's VTAB-1k means. A mean over tasks
    that all have the same seeds is given +- the standard deviation of its per-seed means."""
    def cell(tasks):
        seeds = {frozenset(scores[t]) for t in tasks}
        if len(seeds) == 1 and len(same := sorted(seeds.pop(), key=str)) > 1:
            means = [np.mean([scores[t][s] for t in tasks]) for s in same]
            return f"{np.mean(means):.2f} ± {np.std(means, ddof=1):.2f}%", len(same)
        return f"{np.mean([np.mean(list(scores[t].values())) for t in tasks]):.2f}%", "" if len(tasks) > 1 else 1
    lines = ["| group | task | test top-1 (%) | seeds |", "|---|---|---|---|"]
    vtab = {t for tasks in VTAB_GROUPS.values() for t in tasks}
    for group, tasks in [*VTAB_GROUPS.items(), ("other", sorted(set(scores) - vtab))]:
        lines += [f"| {group} | {t} | {' | '.join(map(str, cell([t])))} |" for t in tasks if t in scores]
        present = [t for t in tasks if t in scores]
        if group != "other" and present:
            lines.append(f"| {group} | **mean of {len(present)} of {len(tasks)}** | {cell(present)[0]} | |")
    present = [t for t in sorted(vtab) if t in scores]
    if present:
        missing = sorted(vtab - set(present))
        lines.append(f"| VTAB-1k | **mean of {len(present)} of 19 tasks** | {cell(present)[0]} | |")
        lines.append("| paper (v3) | VTAB-1k mean: GIFT 74.09%, LoRA 73.95% | | |")
        lines.append(f"\nmissing: {', '.join(missing) if missing else 'none'}")
    return "\n".join(lines) + "\n"
