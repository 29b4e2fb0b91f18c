"""Tests for commonsense.py: the records' checks, the batches (random by default, grouped by length as an
option, and the padding each leaves), the protocols, the rows' names and the seeds' table. No model."""
import json
import math

import pytest
import torch

import commonsense as cs
from fileio import UserError


@pytest.mark.parametrize("records,match", [
    ({"instruction": "x"}, r"expected a JSON list of records, got a JSON object"),
    (["x"], r"record 0 is x \(str\), expected a JSON object"),
    ([{"instruction": "x"}], r"record 0 has no field 'answer'"),
    ([{"instruction": "x", "answer": 1}], r"record 0's answer is 1 \(int\), expected a string"),
    ([{"instruction": "x", "answer": "true"}, {"instruction": ["x"], "answer": "false"}],
     r"record 1's instruction is \['x'\] \(list\), expected a string"),
    ([{"instruction": "x", "answer": "true", "input": 5}], r"record 0's input is 5, expected a string \(or none\)"),
    ([{"instruction": "x", "answer": " "}], r"record 0's answer is ' ', expected a non-empty answer"),
    ([{"instruction": "x", "answer": "True"}], r"record 0's answer is 'True', expected one of boolq's answers "
                                               r"\(true, false\)")])
def test_commonsense_test_records_are_checked(tmp_path, records, match):
    """Issue 22 class 2: a test record with a missing or mistyped field, or an answer the evaluation can never
    match (an empty one would match every unreadable generation; 'True' never matches), is one line naming the
    file and the record."""
    (tmp_path / "dataset" / "boolq").mkdir(parents=True)
    (tmp_path / "dataset" / "boolq" / "test.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=match) as e:
        cs.read_test_set(tmp_path, "boolq")
    assert "test.json" in str(e.value) and "\n" not in str(e.value)


def test_commonsense_batches_random_by_default_grouped_as_an_option():
    """Random batches (the authors' sampler) by default: a new permutation each epoch, every index at most once,
    the last partial batch dropped; --group-by-length: the same sets of examples per megabatch, sorted by length,
    with less padding. Padding measured on a long-tailed length distribution like Commonsense170k's."""
    g = torch.Generator().manual_seed(0)
    lengths = (40 + torch.empty(3200).exponential_(1 / 60, generator=g)).long().tolist()
    random0, random1 = (cs.global_batches(lengths, 32, 42, e) for e in (0, 1))
    assert len(random0) == 100 and all(len(b) == 32 for b in random0) and random0 != random1
    assert sorted(i for b in random0 for i in b) == list(range(3200))
    assert random0 == cs.global_batches(lengths, 32, 42, 0)  # the seed fixes the order
    grouped = cs.global_batches(lengths, 32, 42, 0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(3200))
    pad_random, pad_grouped = cs.padding_fraction(lengths, random0, 8), cs.padding_fraction(lengths, grouped, 8)
    assert pad_grouped < 0.1 < 0.3 < pad_random, (pad_random, pad_grouped)
    assert cs.padding_fraction([3, 5], [[0, 1]], 2) == pytest.approx(1 - 8 / 10)


def test_commonsense_protocols_and_row_names():
    """The two protocols' settings (issue 19), and each row named by its real method, targets and rank."""
    assert cs.PROTOCOLS["paper"] | {} == {"method": "gift", "epochs": 6, "batch_size": 32, "micro_batch_size": 8,
                                         "lr": 2.5e-4, "warmup": 0.1, "warmup_steps": None, "max_len": 512,
                                         "template": "paper", "extract": "paper", "train_on_inputs": False}
    la = cs.PROTOCOLS["llm-adapters"]
    assert (la["method"], la["batch_size"], la["epochs"], la["lr"], la["max_len"], la["warmup_steps"], la["template"],
            la["extract"], la["train_on_inputs"]) == ("lora", 16, 3, 3e-4, 256, 100, "alpaca", "first_match", True)
    label = cs.adapter_label
    assert label(None) == "base model (zero-shot)"
    assert label({"method": "gift", "targets": ["attention.wq", "attention.wv"], "rank": 64}) == \
        "GIFT q,v r=64 (GIFT_QV)"
    assert label({"method": "gift", "targets": ["attention.wo"], "rank": 128, "share": "type"}) == \
        "GIFT o r=128 (GIFT_Proj)"
    assert label({"method": "gift", "targets": ["attention.wq", "attention.wv"], "rank": 16}) == "GIFT q,v r=16"
    assert label({"method": "gift", "targets": ["attention.wq", "attention.wv"], "rank": 64, "share": "all"}) == \
        "GIFT q,v r=64, one Theta for all"
    assert label({"method": "lora", "targets": cs.LORA[0], "rank": 32, "lora_alpha": 64.0}) == \
        "LoRA q,k,v,up,down r=32 alpha 64"
    assert label({"method": "gift", "targets": ["layers.3.attention.wk"], "rank": 8}) == "GIFT layers.3.k r=8"
    assert "LLM-Adapters" in cs.PAPER_SOURCES["LLaMA-1 7B"] and "DoRA" in cs.PAPER_SOURCES["Llama-3 8B"]


def test_commonsense_seed_table(tmp_path):
    """--seeds: mean +- sample std of the seeds' accuracies per task, the Wilson interval of the pooled
    predictions, in % everywhere."""
    evals = [{"model": "GIFT q,v r=64 (GIFT_QV)", "protocol": {"protocol": "paper"},
              "accuracy": {"boolq": 100 * c / 10, "avg": 100 * c / 10}, "n": {"boolq": 10}, "correct": {"boolq": c}}
             for c in (6, 8, 7)]
    rows = cs.seed_table(tmp_path, [1, 2, 3], evals)
    assert rows["boolq"]["mean"] == pytest.approx(70.0) and rows["boolq"]["std"] == pytest.approx(10.0)
    assert rows["boolq"]["pooled_n"] == 30 and rows["boolq"]["pooled_interval95"] == cs.wilson_interval(70.0, 30)
    table = (tmp_path / "seeds.md").read_text()
    assert "| GIFT q,v r=64 (GIFT_QV): mean +- std over 3 seeds |" in table
    assert f"| boolq | 70.0% +- 10.0% | {rows['boolq']['pooled_interval95'][0]}-" in table and "| 60.0% |" in table
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [1, 2, 3]
    assert math.isclose(rows["avg"]["mean"], 70.0)


def _answer_folder(tmp_path, answers, records, list_in_prompt=False):
    (tmp_path / "dataset" / "intents").mkdir(parents=True, exist_ok=True)
    (tmp_path / "dataset" / "intents" / "test.json").write_text(json.dumps(records))
    (tmp_path / "answers.json").write_text(json.dumps({"answers": answers, "list_in_prompt": list_in_prompt}))
    return tmp_path


def test_commonsense_answer_words_are_compared_normalised(tmp_path):
    """Issue 20: a folder with answers.json takes words as answers; the prediction is the first line after the
    trigger (all of the first line without one), compared after normalise() (case, blanks, trailing punctuation),
    nothing else rewritten; list_in_prompt appends the allowed answers to every instruction."""
    recs = [{"instruction": "Wake me up", "answer": "set alarm"}, {"instruction": "Rain?", "answer": "Get Weather"}]
    data = _answer_folder(tmp_path, ["get weather", "set alarm"], recs, list_in_prompt=True)
    records, words = cs.read_test_set(data, "intents")
    assert words == ("get weather", "set alarm")
    assert records[0]["instruction"] == "Wake me up\n\nAnswer format: get weather/set alarm"
    assert cs.extract("the correct answer is Get  weather.\nBecause it rains", "paper", words) == "get weather"
    assert cs.extract("so the correct answer is set alarm!", "paper", words) == "set alarm"
    assert cs.extract("Set alarm", "paper", words) == "set alarm"  # no trigger: the first line
    assert cs.extract("get_weather", "paper", words) == "get_weather"  # underscores stay: wrong, not rewritten
    assert cs.extract("I would say set alarm, or get weather", "first_match", words) == "set alarm"
    assert cs.extract("set alarms", "first_match", words) == ""  # whole words only
    assert cs.is_correct("get weather", records[1]["answer"], words)
    assert not cs.is_correct("get weather", "set alarm", words)
    assert cs.is_correct("answer2", " answer2", "answer[1-9]") and not cs.is_correct("Answer2", "answer2", "answer[1-9]")
    assert cs.normalise("  Play\tMusic ?! ") == "play music" and cs.normalise("3.5") == "3.5"
    _answer_folder(tmp_path, ["get weather", "set alarm"], recs)  # list_in_prompt false: the prompt as written
    assert cs.read_test_set(data, "intents")[0][0]["instruction"] == "Wake me up"


@pytest.mark.parametrize("spec,match", [
    ({"answers": "yes/no"}, r"answers.json: \"answers\" is 'yes/no', expected a list of non-empty strings"),
    ({"answers": ["yes", " "]}, r"expected a list of non-empty strings"),
    ({"answers": ["Yes", "yes."]}, r"two answers are the same after normalisation"),
    ({"answers": ["yes", "no"], "list_in_prompt": "yes"}, r"\"list_in_prompt\" is 'yes', expected true or false"),
    ([1], r"answers.json: \"answers\" is 'None'")])
def test_commonsense_answers_json_is_checked(tmp_path, spec, match):
    _answer_folder(tmp_path, [], [{"instruction": "x", "answer": "yes"}])
    (tmp_path / "answers.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=match):
        cs.read_test_set(tmp_path, "intents")


def test_commonsense_gold_answer_outside_answers_json_is_refused(tmp_path):
    data = _answer_folder(tmp_path, ["get weather"], [{"instruction": "x", "answer": "get weather"},
                                                      {"instruction": "y", "answer": "play music"}])
    with pytest.raises(UserError, match=r"intents.test.json: record 1's answer 'play music' is not one of "
                                         r".*answers.json's answers \(get weather\)"):
        cs.check_tasks(data, ["intents"], "paper")
