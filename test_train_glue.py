"""Tests for train_glue.py (pytest): the GLUE readers and metrics against their references, and the pipeline on
the demo's files (adapter, merge, resume, Ctrl-C, --stop-after, --compile, torchrun), on the CPU (--device cpu);
a few CUDA tests skip without a GPU. The model and its reader: test_encoder.py."""
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

import encoder as enc
import glue_data as gd
import train_glue as tg
from test_encoder import TOL, _batch, tokenizers_pinned
from conftest import user_error
from gift import add_gift, gift_state_dict, load_gift_state_dict
from fileio import read_safetensors, read_safetensors_metadata, write_safetensors

def test_paper_parameter_counts():
    """GIFT_QV r=32: 98,304 trainable numbers on RoBERTa-Base, 131,072 on Large (the paper's counts)."""
    for hidden, layers, heads, expected in ((768, 12, 12, 98_304), (1024, 24, 16, 131_072)):
        cfg = enc.EncoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=4 * hidden)
        with torch.device("meta"):
            model = enc.SequenceClassifier(cfg)
            add_gift(model, ["query", "value"], 32, "type")
            model.classifier.requires_grad_(True)
        assert sum(p.numel() for p in model.gift.parameters()) == expected
        assert enc.paper_size(cfg) == ("RoBERTa-Base" if hidden == 768 else "RoBERTa-Large")
        assert len([n for n, p in model.named_parameters() if p.requires_grad]) == 4 + 4  # 2 Thetas, 2 head layers



# ----------------------------------------------------------------------------------------------- GLUE files
GLUE_SAMPLES = {  # the official layouts (the GLUE download's train.tsv / dev.tsv), two rows each
    "cola": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
            "gj04\t0\t*\tThey drank the pub.\n",
    "sst2": "sentence\tlabel\nhide new secretions from the parental units \t0\nthat loves its characters \t1\n",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused his brother .\t"
            "Referring to him as only \" the witness \" .\n0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa "
            "bought Dominick 's .\n",
    "qnli": "index\tquestion\tsentence\tlabel\n0\tWhen did it start?\tIt started in 1990.\tentailment\n"
            "1\tWho?\tNobody knows.\tnot_entailment\n",
    "rte": "index\tsentence1\tsentence2\tlabel\n0\tNo weapons were found.\tWeapons were found.\tnot_entailment\n"
           "1\tA cat sat.\tA cat sat down.\tentailment\n",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking "
            "off.\t5.000\n1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man is "
            "playing a flute.\t3.800\n",
}
GLUE_EXPECTED = {
    "cola": [("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
             ("They drank the pub.", None, 0)],
    "sst2": [("hide new secretions from the parental units ", None, 0), ("that loves its characters ", None, 1)],
    "mrpc": [("Amrozi accused his brother .", 'Referring to him as only " the witness " .', 1),
             ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", 0)],
    "qnli": [("When did it start?", "It started in 1990.", 0), ("Who?", "Nobody knows.", 1)],
    "rte": [("No weapons were found.", "Weapons were found.", 1), ("A cat sat.", "A cat sat down.", 0)],
    "stsb": [("A plane is taking off.", "An air plane is taking off.", 5.0),
             ("A man plays a flute.", "A man is playing a flute.", 3.8)],
}


@pytest.mark.parametrize("task", list(gd.TASKS))
def test_read_tsv_official_layouts(tmp_path, task):
    path = tmp_path / "train.tsv"
    path.write_text(GLUE_SAMPLES[task], encoding="utf-8")
    assert gd.read_tsv(path, gd.TASKS[task]) == GLUE_EXPECTED[task]


def test_read_tsv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: label 'maybe'"):
        gd.read_tsv(path, gd.TASKS["rte"])
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\textra\tentailment\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: 5 tab-separated fields, expected 4"):
        gd.read_tsv(path, gd.TASKS["rte"])
    with pytest.raises(ValueError, match=r"columns .* expected"):  # an RTE file given as QNLI
        gd.read_tsv(path, gd.TASKS["qnli"])
    path.write_text(GLUE_SAMPLES["stsb"].replace("3.800", "n/a"))
    with pytest.raises(ValueError, match=r"dev.tsv:3: score 'n/a'"):
        gd.read_tsv(path, gd.TASKS["stsb"])


def test_metrics_against_references():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    # Matthews' coefficient of two binary vectors is their Pearson correlation (the phi coefficient)
    assert gd.score("mcc", p.tolist(), y.tolist()) == pytest.approx(100 * np.corrcoef(p, y)[0, 1], abs=1e-9)
    assert gd.score("mcc", [1] * 10, [0, 1] * 5) == 0.0  # a constant prediction scores 0, as sklearn
    assert gd.score("accuracy", p.tolist(), y.tolist()) == 100 * np.mean(p == y)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert gd.score("pearson", a.tolist(), (a + b).tolist()) == pytest.approx(100 * np.corrcoef(a, a + b)[0, 1],
                                                                            abs=1e-9)


def test_lr_schedule_is_hf_linear():
    assert [tg.lr_factor(s, 2, 10) for s in range(11)] == [0, 0.5] + [k / 8 for k in range(8, -1, -1)]
    assert tg.lr_factor(0, 0, 4) == 1.0


# ----------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo's random RoBERTa folder (HF format) and generated SST-2-style data."""
    return gd.make_demo(tmp_path_factory.mktemp("glue_demo"))


def _train_args(demo_files, out, *extra):
    model_dir, data = demo_files
    return ["--model", str(model_dir), "--task", "sst2", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--batch-size", "32", "--lr", "3e-3", "--save-every", "7", "--device", "cpu", *map(str, extra)]


def _train(demo_files, out, *extra):
    return tg.main(_train_args(demo_files, out, *extra))


@pytest.fixture(scope="module")
def gift_run(demo_files, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("gift_run")
    history = _train(demo_files, out)
    return out, history


def test_demo_tokenization_matches_tokenizers(demo_files):
    tokenizers = tokenizers_pinned()
    model_dir, data = demo_files
    tok, cls, sep = enc.load_text_tokenizer(model_dir, enc.read_config(model_dir))
    ref = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = gd.read_tsv(data / "dev.tsv", gd.TASKS["sst2"])
    for max_len in (512, 9):
        ref.enable_truncation(max_len)
        for (a, _, _), (b, _, _) in zip(rows[:40], rows[40:80]):
            assert enc.encode_example(tok, cls, sep, "roberta", a, None, max_len)[0] == ref.encode(a).ids
            assert enc.encode_example(tok, cls, sep, "roberta", a, b, max_len)[0] == ref.encode(a, b).ids


def test_training_learns_and_writes_its_files(gift_run):
    out, history = gift_run
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "adapter.safetensors", "best.safetensors",
                                                      "checkpoint.pt", "log.jsonl", "results.json"]
    assert [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] == history
    result = json.loads((out / "results.json").read_text())
    best = max(history, key=lambda h: h["dev_accuracy"])
    assert (result["best"], result["best_epoch"]) == (best["dev_accuracy"], best["epoch"])
    assert result["trainable_without_head"] == 2 * 2 * 32 * 64  # two Thetas, 2 r d_in each


def test_adapter_loads_with_gift_and_scores_as_logged(gift_run, demo_files, capsys):
    out, history = gift_run
    model_dir, data = demo_files
    run, state = tg.read_adapter_config(out / "adapter.safetensors"), read_safetensors(out / "adapter.safetensors")
    assert (run["method"], run["targets"], run["rank"], run["encoder"]["num_labels"]) == ("gift", ["query", "value"],
                                                                                           32, 2)
    model = enc.load_model(model_dir, num_labels=2)
    add_gift(model, run["targets"], run["rank"], run["share"])
    load_gift_state_dict(model, read_safetensors(out / "adapter.safetensors"))  # gift.py's own loader takes it
    assert set(state) == set(gift_state_dict(model, ["classifier"]))
    capsys.readouterr()
    argv = ["--adapter", str(out / "adapter.safetensors"), "--data", str(data), "--eval-only", "--device", "cpu"]
    assert tg.main(argv) == history[-1]["dev_accuracy"]
    assert f"(gift r=32 adapter {out / 'adapter.safetensors'} on the base model " in capsys.readouterr().out


def test_merged_folder_equals_adapter_and_loads_in_transformers(gift_run, demo_files, tmp_path, capsys):
    out, _ = gift_run
    _, data = demo_files
    merged = tg.main(["--adapter", str(out / "best.safetensors"), "--merge", str(tmp_path / "merged")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary sibling left
    _, unmerged = tg.model_with_adapter(out / "best.safetensors")
    ours = enc.load_model(merged)
    assert list(ours.state_dict()) == [k for k in unmerged.state_dict() if not k.startswith("gift.")]
    ids, types, mask = _batch(ours.config.vocab_size, 1, [12, 5, 30])
    with torch.no_grad():
        expected = unmerged.eval()(ids, types * 0, mask)
        torch.testing.assert_close(ours.eval()(ids, types * 0, mask), expected, atol=TOL, rtol=0)
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, expected, atol=TOL, rtol=0)
    best = max(json.loads(line)["dev_accuracy"] for line in (out / "log.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert tg.main(["--model", str(merged), "--data", str(data), "--eval-only", "--device", "cpu"]) == \
        pytest.approx(best, abs=1.0)
    assert "(the merged model " in capsys.readouterr().out  # issue 18.6: says what it scored


def test_lora_trains_and_merges(demo_files, tmp_path, one_thread):
    history = _train(demo_files, tmp_path, "--method", "lora", "--epochs", "1")
    run = tg.read_adapter_config(tmp_path / "adapter.safetensors")
    state = read_safetensors(tmp_path / "adapter.safetensors")
    assert run["rank"] == 8 and len([k for k in state if "lora_" in k]) == 2 * 2 * 2  # A, B x q, v x 2 layers
    merged = tg.main(["--adapter", str(tmp_path / "adapter.safetensors"), "--merge", str(tmp_path / "merged")])
    _, unmerged = tg.model_with_adapter(tmp_path / "adapter.safetensors")
    ids, types, mask = _batch(unmerged.config.vocab_size, 1, [7, 19])
    with torch.no_grad():
        torch.testing.assert_close(enc.load_model(merged).eval()(ids, types * 0, mask),
                                   unmerged.eval()(ids, types * 0, mask), atol=TOL, rtol=0)
    assert history[0]["epoch"] == 1


def test_resume_repeats_the_uninterrupted_run(demo_files, gift_run, tmp_path, monkeypatch, capsys, one_thread):
    full, history = gift_run
    real = tg.lr_factor

    def interrupt(step, warmup, total):  # dies before step 17: checkpoints at 7 and 14 exist, epoch 1 is logged
        if step == 17:
            raise KeyboardInterrupt
        return real(step, warmup, total)

    monkeypatch.setattr(tg, "lr_factor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(demo_files, tmp_path)
    monkeypatch.setattr(tg, "lr_factor", real)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 14
    assert "checkpoint.pt exists: add --resume" in _user_error(capsys, _train_args(demo_files, tmp_path))
    assert "other settings or inputs (head_lr 0.003 -> 0.001; lr 0.003 -> 0.001)" in _user_error(
        capsys, _train_args(demo_files, tmp_path, "--resume", "--lr", "1e-3"))
    resumed = _train(demo_files, tmp_path, "--resume")
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(resumed) == drop(history)
    a, b = read_safetensors(full / "adapter.safetensors"), read_safetensors(tmp_path / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same code path on the same machine: bit for bit
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_bert_pipeline(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    model_dir, data = tmp_path / "bert", tmp_path / "RTE"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text(GLUE_SAMPLES["rte"] + "".join(
            f"{i}\tThe {w} is here.\tA {w} is{' not' * (i % 2)} here.\t{'not_entailment' if i % 2 else 'entailment'}\n"
            for i, w in enumerate(["cat", "dog", "car", "tree", "boat", "lamp"] * 4, 2)))
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([(data / "train.tsv").read_text()], tokenizers.trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForPreTraining(cfg).save_pretrained(model_dir)  # with the MLM and NSP heads (cls.*)
    tok.save(str(model_dir / "tokenizer.json"))
    tg.main(["--model", str(model_dir), "--task", "rte", "--data", str(data), "--out", str(tmp_path / "run"),
             "--epochs", "2", "--batch-size", "8", "--device", "cpu"])
    merged = tg.main(["--adapter", str(tmp_path / "run" / "adapter.safetensors"), "--merge", str(tmp_path / "merged")])
    _, unmerged = tg.model_with_adapter(tmp_path / "run" / "adapter.safetensors")
    ids, types, mask = _batch(200, 0, [9, 14])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits,
                                   unmerged.eval()(ids, types, mask), atol=TOL, rtol=0)


def _user_error(capsys, argv):
    return user_error(capsys, tg.main, argv)


def _copy_with(src, dst, change):
    """A copy of the folder src with change(dst) applied."""
    shutil.copytree(src, dst)
    change(dst)
    return dst


def _edit_config(**fields):  # None: the field removed
    def change(folder):
        hf = json.loads((folder / "config.json").read_text())
        hf.update(fields)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    return change


def _small_embedding(folder):  # a model of 100 embedding rows: the demo's tokenizer has more ids
    _edit_config(vocab_size=100)(folder)
    state = read_safetensors(folder / "model.safetensors")
    state["roberta.embeddings.word_embeddings.weight"] = state["roberta.embeddings.word_embeddings.weight"][:100]
    write_safetensors(folder / "model.safetensors", state)


def _narrow(folder):  # another model that takes the same tokenizer: 32 wide, its own weights
    _edit_config(hidden_size=32, intermediate_size=64)(folder)
    model = enc.SequenceClassifier(enc.read_config(folder))
    write_safetensors(folder / "model.safetensors", {k: v for k, v in model.state_dict().items()
                                                     if not k.startswith("classifier.")})


def _weights(change):  # a folder change: model.safetensors' tensors edited by change(state)
    def edit(folder):
        state = dict(read_safetensors(folder / "model.safetensors"))
        change(state)
        write_safetensors(folder / "model.safetensors", state)
    return edit


def _adapter_copy(src, dst, config=None, tensors=None, meta=None):
    """A copy of the adapter file src with its run config's fields updated (config), tensors changed, or the whole
    metadata replaced (meta)."""
    run = json.loads(read_safetensors_metadata(src)["config"])
    state = dict(read_safetensors(src))
    (tensors or (lambda st: None))(state)
    write_safetensors(dst, state, meta or {"config": json.dumps({**run, **(config or {})})})
    return str(dst)


def _nan_weight(folder, key="roberta.encoder.layer.1.output.dense.weight"):  # one NaN in a base weight
    state = read_safetensors(folder / "model.safetensors")
    state[key] = state[key].clone()
    state[key][3, 5] = float("nan")
    write_safetensors(folder / "model.safetensors", state)


def _fault(kind, demo_files, tmp_path, request, monkeypatch):
    """The command line of one mistake, on its own copies of what it changes."""
    model_dir, data = demo_files
    out = tmp_path / "out"
    train = lambda *extra, model=model_dir, data=data: _train_args((model, data), out, *extra)  # noqa: E731
    adapter = lambda: str(request.getfixturevalue("gift_run")[0] / "adapter.safetensors")  # noqa: E731

    def used_out():  # a finished run's --out
        return shutil.copytree(request.getfixturevalue("gift_run")[0], out)

    def other_adapter(script):
        write_safetensors(tmp_path / "adapter.safetensors", {"x": torch.zeros(1)},
                          {"config": json.dumps({"script": script, "targets": ["q"], "rank": 1})})
        return ["--adapter", str(tmp_path / "adapter.safetensors"), "--data", str(data), "--eval-only"]

    def bad_tsv(text):
        return train(data=_copy_with(data, tmp_path / "data", lambda p: (p / "train.tsv").write_bytes(text)))

    q = "roberta.encoder.layer.0.attention.self.query.weight"

    def scores(text):  # an STS-B folder whose train.tsv is text
        folder = tmp_path / "STS-B"
        folder.mkdir()
        for split in ("train", "dev"):
            (folder / f"{split}.tsv").write_text(GLUE_SAMPLES["stsb"])
        (folder / "train.tsv").write_text(text)
        return [*train(data=folder), "--task", "stsb"]

    def merged():
        return str(tg.main(["--adapter", adapter(), "--merge", str(tmp_path / "merged")]))

    def theta(change):  # the GIFT run's adapter with its query phi changed
        return ["--adapter", _adapter_copy(adapter(), tmp_path / "adapter.safetensors", tensors=lambda st: st.update(
            {"gift.query.phi.weight": change(st["gift.query.phi.weight"])})), "--data", str(data), "--eval-only"]
    evaluate = lambda path: ["--adapter", path, "--data", str(data), "--eval-only"]  # noqa: E731
    meta = lambda **kw: evaluate(_adapter_copy(adapter(), tmp_path / "adapter.safetensors", **kw))  # noqa: E731
    config = lambda **kw: train(model=_copy_with(model_dir, tmp_path / "m", _edit_config(**kw)))  # noqa: E731
    if kind == "nan_at_step_25":  # a diverging run: the loss of step 25 (epoch 2) is NaN
        loss_fn, calls = tg.loss_fn, []

        def nan_at_25(*a):
            calls.append(1)
            return loss_fn(*a) * (float("nan") if len(calls) == 25 else 1.0)
        monkeypatch.setattr(tg, "loss_fn", nan_at_25)
    return {
        "no_flags": lambda: ["--task", "rte"],
        "merge_without_adapter": lambda: ["--merge", str(tmp_path / "merged")],
        "adapter_without_mode": lambda: ["--adapter", adapter(), "--data", str(data)],
        "adapter_missing": lambda: ["--adapter", str(tmp_path / "no.safetensors"), "--data", str(data), "--eval-only"],
        "adapter_of_vit": lambda: other_adapter("train_vit.py"),
        "adapter_of_llama": lambda: other_adapter("train_llama.py"),
        "adapter_pt": lambda: (torch.save({}, tmp_path / "adapter.pt"),
                               ["--adapter", str(tmp_path / "adapter.pt"), "--merge", str(tmp_path / "m")])[1],
        "rank_0": lambda: train("--rank", "0"),
        "max_len_too_long": lambda: train("--max-len", "100"),
        "model_folder_empty": lambda: train(model=tmp_path),
        "no_train_tsv": lambda: train(data=tmp_path),
        "config_not_json": lambda: train(model=_copy_with(model_dir, tmp_path / "m", lambda p: (
            p / "config.json").write_text('{"model_type": "roberta",'))),
        "config_no_field": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _edit_config(hidden_size=None))),
        "config_bad_field": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _edit_config(hidden_size="64"))),
        "tokenizer_too_large": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _small_embedding)),
        "config_vocab_not_the_files": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _edit_config(
            vocab_size=100))),
        "tsv_not_utf8": lambda: bad_tsv(b"sentence\tlabel\ncaf\xe9\t1\n"),
        "tsv_bad_label": lambda: bad_tsv(b"sentence\tlabel\ngood\t1\nbad\tmaybe\n"),
        "out_used": lambda: (used_out(), train())[1],
        "out_locked": lambda: train(),  # the lock is taken by the test
        "resume_truncated": lambda: (out.mkdir(), (out / "checkpoint.pt").write_bytes(b"PK\x03\x04"),
                                     train("--resume"))[2],
        "resume_other_seed": lambda: (used_out(), train("--resume", "--seed", "7"))[1],
        "resume_other_data": lambda: (used_out(), train("--resume", data=_copy_with(data, tmp_path / "data", lambda p: (
            p / "dev.tsv").write_text((p / "dev.tsv").read_text().replace("\t1\n", "\t0\n", 1)))))[1],
        "resume_other_model": lambda: (used_out(), train("--resume", model=_copy_with(
            model_dir, tmp_path / "m", _edit_config(layer_norm_eps=1e-6))))[1],
        "merge_over_model": lambda: ["--adapter", adapter(), "--merge", str(model_dir)],
        "merge_over_run": lambda: ["--adapter", adapter(), "--merge", str(used_out())],
        "merge_over_adapter": lambda: ["--adapter", adapter(), "--merge", adapter()],
        "eval_base_model": lambda: ["--model", str(model_dir), "--data", str(data), "--eval-only"],
        "eval_other_task": lambda: ["--adapter", adapter(), "--data", str(data), "--eval-only", "--task", "rte"],
        "targets_typo": lambda: train("--targets", "query", "qeury"),
        "targets_hf_name": lambda: train("--targets", "q_proj"),
        "targets_widths": lambda: train("--targets", "output.dense"),  # attention.output.dense (64) and 128 wide
        "lora_rank_too_big": lambda: train("--method", "lora", "--rank", "65"),
        "epochs_0": lambda: train("--epochs", "0"),
        "batch_size_0": lambda: train("--batch-size", "0"),
        "max_len_0": lambda: train("--max-len", "0"),
        "eval_batch_size_0": lambda: train("--eval-batch-size", "0"),
        "stop_after_0": lambda: train("--stop-after", "0"),
        "lr_0": lambda: train("--lr", "0"),
        "head_lr_negative": lambda: train("--head-lr=-1e-3"),
        "lora_alpha_0": lambda: train("--method", "lora", "--lora-alpha", "0"),
        "weight_decay_negative": lambda: train("--weight-decay", "-0.1"),
        "warmup_over_1": lambda: train("--warmup", "1.5"),
        "adapter_other_widths": lambda: ["--adapter", adapter(), "--data", str(data), "--eval-only", "--model", str(
            _copy_with(model_dir, tmp_path / "m", _narrow))],
        "out_is_file": lambda: ((tmp_path / "out").write_text("notes\n"), train())[1],
        "no_data_folder": lambda: train(data=tmp_path / "SST2"),
        "stop_after_reached": lambda: (used_out(), train("--resume", "--stop-after", "5"))[1],
        "nan_in_weight": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _nan_weight)),
        "nan_at_step_25": lambda: train(),
        "weight_i32": lambda: train(model=_copy_with(model_dir, tmp_path / "m", _weights(
            lambda st: st.update({q: st[q].view(torch.int32)})))),  # the same bytes, read as integers
        "adapter_on_its_merged_model": lambda: [*evaluate(adapter()), "--model", merged()],
        "adapter_other_weights": lambda: [*evaluate(adapter()), "--model", str(_copy_with(
            model_dir, tmp_path / "m", _weights(lambda st: st.update({q: st[q] * 1.5}))))],
        "merge_onto_other_weights": lambda: ["--adapter", adapter(), "--merge", str(tmp_path / "merged"), "--model",
                                             str(_copy_with(model_dir, tmp_path / "m", _weights(
                                                 lambda st: st.update({q: st[q] * 1.5}))))],
        "config_vocab_float": lambda: config(vocab_size=430.0),
        "config_layers_fraction": lambda: config(num_hidden_layers=2.5),
        "config_dropout_5": lambda: config(hidden_dropout_prob=5),
        "config_id2label_int": lambda: config(id2label=3),
        "config_heads_negative": lambda: config(num_attention_heads=-4),
        "config_eps_string": lambda: config(layer_norm_eps="1e-5"),
        "config_pad_outside": lambda: config(pad_token_id=430),
        "config_act_unknown": lambda: config(hidden_act="swish"),
        "tokenizer_special_id": lambda: train(model=_copy_with(model_dir, tmp_path / "m", lambda p: (
            p / "tokenizer.json").write_text((p / "tokenizer.json").read_text().replace(
                '"id": 2, "content": "</s>"', '"id": "2", "content": "</s>"')))),
        "adapter_meta_list": lambda: meta(meta={"config": "[1, 2]"}),
        "adapter_rank_string": lambda: meta(config={"rank": "32"}),
        "adapter_method_unknown": lambda: meta(config={"method": "dora"}),
        "config_vocab_1e12": lambda: config(vocab_size=10 ** 12),
        "config_layers_1e6": lambda: config(num_hidden_layers=10 ** 6),
        "adapter_tensor_shape": lambda: theta(lambda t: t[:16]),
        "adapter_tensor_i32": lambda: theta(lambda t: t.view(torch.int32)),
        "stsb_nan_score": lambda: scores(GLUE_SAMPLES["stsb"].replace("3.800", "nan")),
        "stsb_inf_score": lambda: scores(GLUE_SAMPLES["stsb"].replace("5.000", "inf")),
        "out_finished_run": lambda: ((used_out() / "checkpoint.pt").unlink(), train())[1],
        "out_is_the_model": lambda: [*train(), "--out", str(model_dir)],
        "seeds_repeated": lambda: train("--seeds", "1", "1"),
    }[kind]()


# The faults of issue 10 tried on train_glue.py, and the one line the user sees (exit status 2). All but the
# last two are found before the model's weights are loaded.
FAULTS = [
    ("no_flags", r"give --model, --task and --data \(or --demo"),
    ("merge_without_adapter", r"--merge OUT needs --adapter FILE"),
    ("adapter_without_mode", r"--adapter FILE goes with --eval-only \(score it\) or --merge OUT"),
    ("adapter_missing", r"--adapter .*no.safetensors: no such file"),
    ("adapter_of_vit", r"adapter.safetensors is an adapter of train_vit.py, not of train_glue.py"),
    ("adapter_of_llama", r"adapter.safetensors is an adapter of train_llama.py, not of train_glue.py"),
    ("adapter_pt", r"adapter.pt: not an adapter.safetensors"),
    ("rank_0", r"--rank 0: must be at least 1"),
    ("max_len_too_long", r"--max-len 100: .* takes at most 64 tokens"),
    ("model_folder_empty", r"no config.json or tokenizer.json or model.safetensors \(an HF model folder"),
    ("no_train_tsv", r"--data .*: no train.tsv \(give a task's folder of the GLUE download"),
    ("config_not_json", r"m.config.json: not valid JSON \(Expecting"),
    ("config_no_field", r"m.config.json: no field 'hidden_size'"),
    ("config_bad_field", r"m.config.json: field 'hidden_size' is '64' \(str\), expected an integer >= 1"),
    ("tokenizer_too_large", r"the tokenizer .*tokenizer.json \(\d+ ids\) does not fit the model .*m \(100 "),
    ("config_vocab_not_the_files", r"model.safetensors: 'roberta.embeddings.word_embeddings.weight' has shape "
                                   r"\(\d+, 64\); config.json's vocab_size 100 and hidden_size 64 need \(100, 64\)"),
    ("tsv_not_utf8", r"train.tsv: not UTF-8 text \(invalid continuation byte at byte 18\)"),
    ("tsv_bad_label", r"train.tsv:3: label 'maybe' is not one of \('0', '1'\)"),
    ("out_used", r"out.checkpoint.pt exists: add --resume to continue that run, or choose another --out"),
    ("out_locked", r"out is in use by pid 12345 on elsewhere: wait for that run to end"),
    ("resume_truncated", r"checkpoint.pt: cannot read it \(.*\); truncated\?"),
    ("resume_other_seed", r"checkpoint.pt was written by a run with other settings or inputs \(seed 42 -> 7\)"),
    ("resume_other_data", r"other settings or inputs \(dev '[0-9a-f]+' -> '[0-9a-f]+'\)"),
    ("resume_other_model", r"other settings or inputs \(model '[0-9a-f]+' -> '[0-9a-f]+'\)"),
    ("merge_over_model", r"--merge .*model is the --model folder: writing there would destroy it"),
    ("merge_over_run", r"--merge .*out holds a checkpoint \(.lock, adapter.safetensors, best.safetensors"),
    ("merge_over_adapter", r"--merge .*adapter.safetensors is the adapter: writing there would destroy it"),
    ("eval_base_model", r"config.json: no GLUE task \(finetuning_task None\), not a merged model: score a base"),
    ("eval_other_task", r"--task rte: .*adapter.safetensors was trained on sst2"),
    # issue 18: targets before loading (1), zero and negative numbers (3), an adapter of another model (4), --out a
    # file (5), a mistyped data folder (8), --stop-after already reached (7)
    ("targets_typo", r"--targets qeury: matches no Linear layer of this roberta backbone .*valid names .*: "
                     r"attention.output.dense, attention.self.key, attention.self.query, .*, query, value$"),
    ("targets_hf_name", r"--targets q_proj: matches no Linear layer"),
    ("targets_widths", r"--targets output.dense --rank 32: layers sharing one Theta need the same in_features"),
    ("lora_rank_too_big", r"--targets query value --rank 65: LoRA rank must be in \[1, min\(d_in, d_out\)\]"),
    ("epochs_0", r"--epochs 0: must be at least 1"),
    ("batch_size_0", r"--batch-size 0: must be at least 1"),
    ("max_len_0", r"--max-len 0: must be at least 5"),
    ("eval_batch_size_0", r"--eval-batch-size 0: must be at least 1"),
    ("stop_after_0", r"--stop-after 0: must be at least 1"),
    ("lr_0", r"--lr 0.0: must be greater than 0"),
    ("head_lr_negative", r"--head-lr -0.001: must be greater than 0"),
    ("lora_alpha_0", r"--lora-alpha 0.0: must be greater than 0"),
    ("weight_decay_negative", r"--weight-decay -0.1: must be at least 0"),
    ("warmup_over_1", r"--warmup 1.5: a fraction of the steps, at most 1"),
    ("adapter_other_widths", r"--adapter .*adapter.safetensors was trained on .*model \(model_type roberta, "
                             r"hidden_size 64, .*\); the model .*m is another \(model_type roberta, hidden_size 32"),
    ("out_is_file", r"--out .*out is a file: give a folder"),
    ("no_data_folder", r"--data .*SST2: no such folder \(give a task's folder of the GLUE download"),
    ("stop_after_reached", r"--stop-after 5: .*checkpoint.pt is at step 60 already$"),
    ("nan_in_weight", r"step 1: loss nan, gradient norm nan; training stopped, nothing was saved"),
    ("nan_at_step_25", r"step 25: loss nan, gradient norm nan; training stopped, .*checkpoint.pt \(step 21\) is kept"),
    # issue 22, class 1 (silently wrong): integer weights, an adapter on another base (its own merged model, other
    # weights) -- the base is compared by its weights, so these two load the model first
    ("weight_i32", r"model.safetensors: tensor 'roberta.encoder.layer.0.attention.self.query.weight' is stored as "
                   r"torch.int32, but a model weight is floating point"),
    ("adapter_on_its_merged_model", r"adapter.safetensors was trained on .*model \(identity [0-9a-f]{16}\), not on "
                                    r".*merged \(identity [0-9a-f]{16}\): a merged model, .*add --any-base"),
    ("adapter_other_weights", r"adapter.safetensors was trained on .*model \(identity .*\), not on .*m \(identity"),
    ("merge_onto_other_weights", r"adapter.safetensors was trained on .*model \(identity .*\), not on .*m "),
    # class 2 (types and ranges: file, field, value, what was expected)
    ("config_vocab_float", r"config.json: field 'vocab_size' is 430.0 \(float\), expected an integer >= 1$"),
    ("config_layers_fraction", r"config.json: field 'num_hidden_layers' is 2.5 \(float\), expected an integer >= 1"),
    ("config_dropout_5", r"config.json: field 'hidden_dropout_prob' is 5 \(int\), expected a number >= 0 < 1"),
    ("config_id2label_int", r"config.json: field 'id2label' is 3 \(int\), expected a JSON object"),
    ("config_heads_negative", r"config.json: field 'num_attention_heads' is -4 \(int\), expected an integer >= 1"),
    ("config_eps_string", r"config.json: field 'layer_norm_eps' is '1e-5' \(str\), expected a number > 0"),
    ("config_pad_outside", r"config.json: field 'pad_token_id' is 430 \(int\), expected an integer >= 0 < 430"),
    ("config_act_unknown", r"config.json: field 'hidden_act' is 'swish' \(str\), expected one of \['gelu', "),
    ("tokenizer_special_id", r'tokenizer.json: added_tokens\[2\].id is "2"; expected a token id'),  # tokenizer.py: the field
    ("adapter_meta_list", r"adapter.safetensors: its metadata config is not a JSON object"),
    ("adapter_rank_string", r"adapter.safetensors \(its run config\): field 'rank' is '32' \(str\), expected an "
                            r"integer >= 1"),
    ("adapter_method_unknown", r"\(its run config\): field 'method' is 'dora' \(str\), expected one of \['gift', "
                               r"'lora'\]"),
    # class 3 (sizes against the files before building) and 4 (the adapter's tensors before the base's weights)
    ("config_vocab_1e12", r"model.safetensors: 'roberta.embeddings.word_embeddings.weight' has shape \(\d+, 64\); "
                          r"config.json's vocab_size 1000000000000 "),
    ("config_layers_1e6", r"model.safetensors: holds layers 0..1; config.json's num_hidden_layers 1000000 needs "
                          r"0..999999"),
    ("adapter_tensor_shape", r"adapter.safetensors: tensor 'gift.query.phi.weight' is \(16, 64\); its run config "
                             r"\(gift r=32 on query value\) on .*model needs \(32, 64\)"),
    ("adapter_tensor_i32", r"adapter.safetensors: tensor 'gift.query.phi.weight' is stored as torch.int32"),
    # class 5 (non-finite labels, file:line) and 6 (a finished run's folder, the model's folder)
    ("stsb_nan_score", r"train.tsv:3: score 'nan' is not a finite number"),
    ("stsb_inf_score", r"train.tsv:2: score 'inf' is not a finite number"),
    ("out_finished_run", r"--out .*out holds a run \(log.jsonl, adapter.safetensors, results.json, best.safetensors\): "
                         r"add --resume to continue it, --overwrite to replace it"),
    ("out_is_the_model", r"--out .*model is the base model: the run's files would mix with it"),
    ("seeds_repeated", r"--seeds 1 1: distinct seeds, for training runs"),
]
LOADS = {"nan_in_weight", "nan_at_step_25", "adapter_on_its_merged_model", "adapter_other_weights",
         "merge_onto_other_weights"}  # the faults found only once weights are read (identity; a NaN in training)


@pytest.mark.parametrize("kind,match", FAULTS, ids=[k for k, _ in FAULTS])
def test_faults_are_one_line_errors(kind, match, demo_files, tmp_path, request, monkeypatch, capsys, one_thread):
    argv = _fault(kind, demo_files, tmp_path, request, monkeypatch)
    lock = None
    if kind == "out_locked":  # another process holds --out's lock (POSIX record locks are per process)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ".lock").write_text("pid 12345 on elsewhere\n")
        lock = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                                 "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                                 str(tmp_path / "out" / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert lock.stdout.readline() == "locked\n"
    model_files = {p.name: p.read_bytes() for p in demo_files[0].iterdir()}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            tg.main(argv)
    finally:
        if lock:
            lock.communicate("")
    printed = capsys.readouterr()
    assert e.value.code == 2 and printed.err.startswith("error: ") and printed.err.count("\n") == 1, printed.err
    assert re.search(match, printed.err), printed.err
    assert ("loaded " in printed.out) == (kind in LOADS), printed.out  # the others: before loading weights
    assert {p.name: p.read_bytes() for p in demo_files[0].iterdir()} == model_files  # never touched
    out = tmp_path / "out"
    if kind.startswith("nan"):  # the log stays strict JSON with the finished epochs; no Theta after the NaN saved
        assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == \
            ([] if kind == "nan_in_weight" else [1])
        assert not (out / "adapter.safetensors").exists()
        if kind == "nan_at_step_25":
            ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
            assert ckpt["step"] == 21 and all(t.isfinite().all() for t in ckpt["adapter"].values())


def _results(folder, task, best, seed, rank=32, method="gift", backbone="RoBERTa-Base"):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"task": task, "method": method, "backbone": backbone,
                                                     "model": "m", "best": best, "seed": seed, "rank": rank}))
    return folder


def test_table_mean_and_std_over_seeds(tmp_path):
    """Issue 19: each cell the mean +- sample std over the seeds (and their number), the average beside the paper's;
    rows split by rank, a run counted twice is refused."""
    for task, value in zip(gd.TASKS, [90.0, 88.0, 60.0, 92.0, 75.0, 90.0]):
        for seed, delta in ((42, 0.0), (43, 1.0), (44, -2.0)):  # mean value - 1/3, sample std sqrt(7/3) = 1.53
            _results(tmp_path / f"{task}-{seed}", task, value + delta, seed)
    _results(tmp_path / "r16", "rte", 70.0, 42, rank=16)
    text = gd.table(sorted(tmp_path.iterdir()))
    assert ("| RoBERTa-Base | gift | 32 | 89.7 ± 1.5 (n=3) | 87.7 ± 1.5 (n=3) | 59.7 ± 1.5 (n=3) | 91.7 ± 1.5 (n=3) | "
            "74.7 ± 1.5 (n=3) | 89.7 ± 1.5 (n=3) | 82.2 | 85.1 |") in text
    assert "| RoBERTa-Base | gift | 16 | - | - | - | - | 70.0 ± 0.0 (n=1) | - | - | - |" in text  # not the paper's r
    assert "SST-2 (%)" in text and "| avg (%) | paper avg (%) |" in text
    _results(tmp_path / "again", "sst2", 91.0, 42)
    with pytest.raises(ValueError, match=r"again.results.json and .*sst2-42.results.json are both sst2 seed 42"):
        gd.table(sorted(tmp_path.iterdir()))


def test_torchrun_two_processes_equal_one(demo_files, tmp_path, one_thread, torchrun):
    """Without dropout nothing is random after the seeded init: 2 processes x 16 examples = 1 process x 32."""
    model_dir, data = demo_files
    quiet = tmp_path / "model"
    shutil.copytree(model_dir, quiet)
    hf = json.loads((quiet / "config.json").read_text())
    hf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (quiet / "config.json").write_text(json.dumps(hf))
    args = ["--model", str(quiet), "--task", "sst2", "--data", str(data), "--epochs", "1", "--batch-size", "32",
            "--lr", "3e-3", "--device", "cpu"]  # gloo on the CPU, whatever the machine has
    tg.main(args + ["--out", str(tmp_path / "one")])
    torchrun("train_glue.py", *args, "--out", tmp_path / "two")
    one, two = (read_safetensors(tmp_path / d / "adapter.safetensors") for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    log1, log2 = ([json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                  for d in ("one", "two"))
    assert log2[0]["dev_accuracy"] == log1[0]["dev_accuracy"]          # both processes' dev shares counted
    assert abs(log2[0]["train_loss"] - log1[0]["train_loss"]) < 1e-5  # both processes' losses summed


def test_ctrl_c_and_stop_after_then_resume_repeat_the_uninterrupted_run(demo_files, gift_run, tmp_path, one_thread):
    """Ctrl-C in a real process after its first epoch's line: the step ends, is saved, one line says how to resume,
    exit 0. Then --stop-after 40 (an epoch's last step: saved before its evaluation, which the resume then runs),
    then --resume to the end: the same epochs and adapter as the uninterrupted run, bit for bit (same code path,
    same machine, one thread each)."""
    full, history = gift_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import torch, train_glue; torch.set_num_threads(1); train_glue.main()",
           *_train_args(demo_files, tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith('{"epoch": 1,'):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGINT: finishing this step" in err and re.search(r"stopped by SIGINT after (\d+) of 60 steps: .*checkpoint"
                                                               r".pt holds it; to continue, run the same command with "
                                                               r"--resume", out), out
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 20 < stopped < 40 and not (tmp_path / "adapter.safetensors").exists()
    tg.main(_train_args(demo_files, tmp_path, "--resume", "--stop-after", "40"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 40 and len(ckpt["history"]) == 1  # epoch 2 trained, not yet evaluated
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1 and not (tmp_path / "results.json").exists()
    resumed = tg.main(_train_args(demo_files, tmp_path, "--resume"))
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(resumed) == drop(history)
    a, b = read_safetensors(full / "adapter.safetensors"), read_safetensors(tmp_path / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_compile_gives_the_eager_losses(demo_files, tmp_path, monkeypatch, one_thread):
    """--compile (dynamo + AOT autograd; the aot_eager backend keeps this test fast) against eager: 5 steps."""
    monkeypatch.setenv("GIFT_COMPILE_BACKEND", "aot_eager")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        tg.main(_train_args(demo_files, tmp_path / name, "--stop-after", "5", *extra))
    eager, compiled = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("eager", "compiled"))
    assert compiled["loss_sum"][0] == pytest.approx(eager["loss_sum"][0], rel=1e-5)
    for k in eager["adapter"]:
        torch.testing.assert_close(compiled["adapter"][k], eager["adapter"][k], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_demo(tmp_path):
    proc = subprocess.run([sys.executable, "train_glue.py", "--demo", "--device", "cuda", "--out", str(tmp_path / "d")],
                          cwd=Path(tg.__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "demo done in" in proc.stdout, proc.stderr[-3000:]


@cuda
def test_cuda_bf16_gift_step_0_is_the_base_model(demo_files):
    """psi = 0: x + (x psi^T) phi^T adds an exact 0, so under bf16 autocast the logits are the base model's."""
    model_dir, data = demo_files
    base = enc.load_model(model_dir, num_labels=2).cuda().eval()
    ids, types, mask = (t.cuda() for t in _batch(base.config.vocab_size, 1, [12, 5, 30]))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        expected = base(ids, types * 0, mask)
        add_gift(base, ["query", "value"], 32, "type")
        got = base(ids, types * 0, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@cuda
def test_cuda_bf16_merged_equals_unmerged(gift_run, tmp_path):
    """bf16 keeps 8 significant bits (relative rounding 2^-9): logits O(1) after two layers agree to 5e-2."""
    out, _ = gift_run
    merged = tg.main(["--adapter", str(out / "best.safetensors"), "--merge", str(tmp_path / "merged")])
    _, unmerged = tg.model_with_adapter(out / "best.safetensors")
    ours, unmerged = enc.load_model(merged).cuda().eval(), unmerged.cuda().eval()
    ids, types, mask = (t.cuda() for t in _batch(ours.config.vocab_size, 1, [12, 5, 30]))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        torch.testing.assert_close(ours(ids, types * 0, mask), unmerged(ids, types * 0, mask), rtol=0, atol=5e-2)


@cuda
def test_cuda_compile_gives_the_eager_losses(demo_files, tmp_path):
    """--compile with inductor on the GPU against eager on the GPU: 5 steps, fp32 (TF32 off by default)."""
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        tg.main(_train_args(demo_files, tmp_path / name, "--stop-after", "5", *extra, "--device", "cuda"))  # last wins
    eager, compiled = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("eager", "compiled"))
    assert compiled["loss_sum"][0] == pytest.approx(eager["loss_sum"][0], rel=1e-4)
    for k in eager["adapter"]:
        torch.testing.assert_close(compiled["adapter"][k].cpu(), eager["adapter"][k].cpu(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- issues 19 and 22
def test_any_base_applies_an_adapter_to_its_merged_model(gift_run, demo_files, tmp_path, capsys):
    """Issue 22.1: refused without the flag (the fault table); with it the edit is applied twice and scored."""
    out, _ = gift_run
    _, data = demo_files
    merged = tg.main(["--adapter", str(out / "adapter.safetensors"), "--merge", str(tmp_path / "merged")])
    value = tg.main(["--adapter", str(out / "adapter.safetensors"), "--model", str(merged), "--data", str(data),
                     "--eval-only", "--any-base", "--device", "cpu"])
    assert 0 <= value <= 100 and "dev accuracy" in capsys.readouterr().out


def test_evaluation_crash_keeps_the_epoch_and_resume_repeats_the_run(demo_files, gift_run, tmp_path, monkeypatch,
                                                                       one_thread):
    """Issue 22.5: a crash in the evaluation of epoch 2 finds epoch 2's training on disk; --resume evaluates it
    and ends as the uninterrupted run."""
    full, history = gift_run
    real, calls = tg.evaluate, []

    def crash_at_2(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation crashed")
        return real(*a)
    monkeypatch.setattr(tg, "evaluate", crash_at_2)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        _train(demo_files, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 40 and len(ckpt["history"]) == 1  # trained through epoch 2, evaluated through epoch 1
    monkeypatch.setattr(tg, "evaluate", real)
    resumed = _train(demo_files, tmp_path, "--resume")
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(resumed) == drop(history)
    a, b = read_safetensors(full / "adapter.safetensors"), read_safetensors(tmp_path / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_replaces_a_finished_run(demo_files, gift_run, tmp_path, one_thread):
    out = shutil.copytree(gift_run[0], tmp_path / "out")
    (out / "checkpoint.pt").unlink()
    history = _train(demo_files, out, "--overwrite", "--epochs", "1")
    assert len(history) == 1 and json.loads((out / "results.json").read_text())["epochs"] == 1


def test_seeds_run_each_seed_then_write_the_table(demo_files, tmp_path, capsys, one_thread):
    """Issue 19: --seeds runs the recipe once per seed (OUT/seed-N), then the mean +- std table of them."""
    runs = _train(demo_files, tmp_path, "--seeds", "1", "2", "--epochs", "1")
    assert runs == [str(tmp_path / "seed-1"), str(tmp_path / "seed-2")]
    assert [json.loads((tmp_path / f"seed-{s}" / "results.json").read_text())["seed"] for s in (1, 2)] == [1, 2]
    table = (tmp_path / "table.md").read_text()
    assert re.search(r"\| gift \| 32 \| \d+\.\d ± \d+\.\d \(n=2\) \| - \|", table), table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("hidden,layers,expected", [
    (768, 12, ("RoBERTa-Base", {"sst2": 60, "mrpc": 30, "cola": 80, "qnli": 25, "rte": 80, "stsb": 40}, 64, 512)),
    (1024, 24, ("RoBERTa-Large", {"sst2": 10, "mrpc": 20, "cola": 20, "qnli": 10, "rte": 20, "stsb": 10}, 128, 128))])
def test_size_presets(hidden, layers, expected):
    """Issue 19: Large has its own epochs (the LoRA paper's roberta-large runs), batch 128, length 128."""
    cfg = enc.EncoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            intermediate_size=4 * hidden)
    name, epochs, batch, max_len = expected
    for task, n in epochs.items():
        assert gd.preset(cfg, gd.TASKS[task])[:4] == (name, n, batch, max_len)
    assert "Hu et al. 2021" in gd.preset(cfg, gd.TASKS["rte"])[4]


def test_preset_is_printed_and_given_flags_win(demo_files, tmp_path):
    args = tg.parse_args(_train_args(demo_files, tmp_path / "out", "--max-len", "20"))  # --epochs 3, batch 32 given
    tg.check_args(args)
    assert (args.epochs, args.batch_size, args.max_len) == (3, 32, 20)
    assert args.preset.startswith("preset RoBERTa-Base (hidden size 64): 60 epochs, batch 64, max length 64 (epochs: "
                                  "the LoRA paper") and args.preset.endswith(
        "; given, and used instead: --epochs 3, --batch-size 32, --max-len 20")


def test_adapter_help_says_training_starts_anew(capsys):
    with pytest.raises(SystemExit):
        tg.parse_args(["--help"])
    assert "training always starts a new adapter and head" in " ".join(capsys.readouterr().out.split())
