"""Learning curves of train_llama.py runs as a PNG (Pillow only; no matplotlib):

    python docs/small_experiment/curves.py runs/study/snips_words/* --out curves.png [--loss]

Top panel: validation accuracy (%) against training steps, from the validation records that --eval-every writes
into each run's log.jsonl, one line per run. With --loss, a second panel: the training loss per target token
(a moving mean of --smooth steps, so that batch-to-batch noise does not hide the trend). Colour per recipe
(method, targets, rank, lr: from adapter.safetensors' metadata), marker and line style per seed; the legend
names both. A run folder's log.jsonl holds two kinds of records (table.py reads the same ones):

    {"step": 12, "epoch": 0, "loss": 0.41, "lr": 0.001, "tokens_per_s": 480, "seconds": 2.0}    a training step
    {"step": 20, "val_task": "snips_words_val", "val_accuracy": 61.9, "val_loss": 0.23,
     "val_n": 139, "val_seconds": 31.0}     validation after step 20 (val_n and val_seconds may be absent)
"""
import argparse
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import read_log, run_info  # noqa: E402  (the folder of this script is not a package)

# Colours a reader can tell apart (Okabe-Ito), then markers and dash patterns per seed
COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (0, 0, 0), (240, 228, 66)]
MARKERS = ["circle", "square", "triangle", "diamond"]
DASHES = [None, (10, 6), (3, 4), (14, 4, 3, 4)]  # on/off lengths in pixels; None: solid
PANEL = (1000, 420)  # width, height of one panel in pixels
MARGIN = {"left": 80, "right": 270, "top": 40, "bottom": 60}  # the legend sits in the right margin
LEGEND_X, LEGEND_TEXT = PANEL[0] - MARGIN["right"] + 20, 46  # where its entries start; their labels, past the line


def nice_ticks(hi, n=6):
    """Round tick values 0, d, 2d, ... covering 0..hi, about n of them (d = 1, 2 or 5 times a power of ten)."""
    raw = max(hi, 1e-9) / n
    d = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda x: abs(x - raw))
    return [round(i * d, 10) for i in range(math.ceil(hi / d - 1e-9) + 1)]


def dashed(draw, points, colour, width, dash):
    """A polyline, solid (dash None) or with the on/off pattern dash, continued across its vertices."""
    if dash is None:
        draw.line(points, fill=colour, width=width, joint="curve")
        return
    pattern, k, left, on = list(dash), 0, dash[0], True
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length, pos = math.hypot(x1 - x0, y1 - y0), 0.0
        while pos < length:
            step = min(left, length - pos)
            if on:
                a, b = pos / length, (pos + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=colour, width=width)
            pos, left = pos + step, left - step
            if left <= 0:
                k, on = (k + 1) % len(pattern), not on
                left = pattern[k]


def marker(draw, x, y, kind, colour, r=5):
    box = [x - r, y - r, x + r, y + r]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)


def panel(draw, top, series, x_max, y_max, y_label, font, small, markers):
    """One plot in the rows top..top+PANEL[1]: axes, ticks, grid, labels and the series
    [(points [(step, value)], colour, seed index)]."""
    x0, x1 = MARGIN["left"], PANEL[0] - MARGIN["right"]
    y0, y1 = top + MARGIN["top"], top + PANEL[1] - MARGIN["bottom"]
    xs, ys = nice_ticks(x_max), nice_ticks(y_max, 5)
    px = lambda s: x0 + (x1 - x0) * s / xs[-1]  # noqa: E731
    py = lambda v: y1 - (y1 - y0) * min(v, ys[-1]) / ys[-1]  # noqa: E731
    for t in xs:
        draw.line([(px(t), y0), (px(t), y1)], fill=(230, 230, 230))
        draw.text((px(t), y1 + 8), f"{t:g}", fill="black", font=small, anchor="mt")
    for t in ys:
        draw.line([(x0, py(t)), (x1, py(t))], fill=(230, 230, 230))
        draw.text((x0 - 8, py(t)), f"{t:g}", fill="black", font=small, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, y1 + 32), "training step", fill="black", font=font, anchor="mt")
    draw.text((x0, y0 - 10), y_label, fill="black", font=font, anchor="ls")
    for points, colour, seed in series:
        xy = [(px(s), py(v)) for s, v in points]
        if len(xy) > 1:
            dashed(draw, xy, colour, 2, DASHES[seed % len(DASHES)])
        if markers or len(xy) == 1:
            for x, y in xy:
                marker(draw, x, y, MARKERS[seed % len(MARKERS)], colour)


def legend(draw, entries, top, font):
    """[(label, colour, seed index)] in the right margin, each with its line style and marker."""
    x = LEGEND_X
    for i, (label, colour, seed) in enumerate(entries):
        y = top + MARGIN["top"] + 10 + 24 * i
        dashed(draw, [(x, y), (x + 36, y)], colour, 2, DASHES[seed % len(DASHES)])
        marker(draw, x + 18, y, MARKERS[seed % len(MARKERS)], colour)
        draw.text((x + LEGEND_TEXT, y), label, fill="black", font=font, anchor="lm")


def moving_mean(points, window):
    return [(s, sum(v for _, v in points[max(0, i + 1 - window):i + 1]) / len(points[max(0, i + 1 - window):i + 1]))
            for i, (s, _) in enumerate(points)]


def draw_curves(runs, out, task=None, loss=False, smooth=10):
    """Writes the PNG out; returns its (width, height)."""
    info = [(run, run_info(run), read_log(run)) for run in runs]
    tasks = sorted({r["val_task"] for _, _, log in info for r in log if "val_task" in r})
    if not tasks or task not in tasks + [None]:
        raise SystemExit(f"error: no validation records{f' for {task}' if task else ''} in the logs: train with "
                         f"--eval-every N")
    if task is None and len(tasks) > 1:
        raise SystemExit(f"error: the logs hold several validation tasks ({', '.join(tasks)}): choose one with --task")
    task = task or tasks[0]
    recipes = sorted({i["recipe"] for _, i, _ in info}, key=str)
    seeds = sorted({i["seed"] for _, i, _ in info}, key=str)
    acc, losses, entries = [], [], []
    for run, i, log in sorted(info, key=lambda x: (str(x[1]["recipe"]), str(x[1]["seed"]))):
        colour, seed = COLOURS[recipes.index(i["recipe"]) % len(COLOURS)], seeds.index(i["seed"])
        acc.append(([(r["step"], r["val_accuracy"]) for r in log if r.get("val_task") == task], colour, seed))
        losses.append((moving_mean([(r["step"], r["loss"]) for r in log if "loss" in r], smooth), colour, seed))
        entries.append((f"{i['label']}, seed {i['seed'] if i['seed'] is not None else '?'}", colour, seed))
    x_max = max(s for points, _, _ in acc + losses for s, _ in points)
    font, small = ImageFont.load_default(size=17), ImageFont.load_default(size=14)
    legend_right = LEGEND_X + LEGEND_TEXT + max(small.getlength(label) for label, _, _ in entries) + 10
    image = Image.new("RGB", (max(PANEL[0], math.ceil(legend_right)), PANEL[1] * (2 if loss else 1)), "white")
    draw = ImageDraw.Draw(image)  # wider than PANEL when a legend label would be cut off
    panel(draw, 0, acc, x_max, 100, f"validation accuracy % ({task})", font, small, markers=True)
    legend(draw, entries, 0, small)
    if loss:
        y_max = max(v for points, _, _ in losses for _, v in points)
        panel(draw, PANEL[1], losses, x_max, y_max, f"training loss per target token (mean of {smooth} steps)",
              font, small, markers=False)
    image.save(out)
    return image.size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="train_llama.py --out folders (each with log.jsonl)")
    p.add_argument("--out", type=Path, default=Path("curves.png"))
    p.add_argument("--task", help="the validation task to draw (needed when the logs hold several)")
    p.add_argument("--loss", action="store_true", help="a second panel with the training loss")
    p.add_argument("--smooth", type=int, default=10, help="steps in the training loss's moving mean")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "log.jsonl").is_file()]
    if not runs:
        p.error("none of the folders has a log.jsonl")
    width, height = draw_curves(runs, args.out, args.task, args.loss, args.smooth)
    print(f"{args.out}: {len(runs)} runs, {width}x{height}")


if __name__ == "__main__":
    main()
