"""Tests for train_llama.py (and commonsense.py, its data): training (resume, Ctrl-C, torchrun, FSDP, --compile),
merging, the evaluation and its parsing, the demo, and every user mistake as one line. Tiny models; the CPU
(--device cpu) unless a test says CUDA."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import commonsense as cs
import llama
import train_llama as tl
from conftest import user_error
from fileio import UserError, read_safetensors, read_safetensors_metadata, write_safetensors
from gift import add_gift, gift_state_dict
from test_llama import _hub_model, _llama_args, _llama_model, _llama_tokens, _llama_write_shards
from tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def _llama_demo(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("demo")
    model_dir, data = cs.write_demo(root, pretrain_steps=0)
    return model_dir, data


def _llama_train_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--rank", "8", "--lr", "1e-2", "--precision", "fp64", "--no-eval", "--device", "cpu",
            *extra]


def _llama_adapter(out):
    """(run config, Theta) of the adapter.safetensors a run wrote to out."""
    path = out / "adapter.safetensors"
    return json.loads(read_safetensors_metadata(path)["config"]), read_safetensors(path)


def _llama_user_error(capsys, argv, match):
    err = user_error(capsys, tl.main, argv)
    assert re.search(match, err), err


def test_llama_resume_equals_uninterrupted(tmp_path, _llama_demo, capsys, monkeypatch):
    model_dir, data = _llama_demo
    tl.main(_llama_train_args(model_dir, data, tmp_path / "a", "--micro-batch-size", "8", "--save-every", "4"))
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro-batch-size", "8", "--save-every", "4",
                              "--stop-after", "10"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 10
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro-batch-size", "8", "--save-every", "4",
                              "--resume"))
    (config_a, a), (config_b, b) = _llama_adapter(tmp_path / "a"), _llama_adapter(tmp_path / "b")
    assert config_a == config_b == {"script": "train_llama.py", "method": "gift", "rank": 8, "share": "type",
                                    "targets": ["attention.wq", "attention.wv"], "model": str(model_dir),
                                    "base": config_a["base"], "lr": 1e-2, "seed": 42} and \
        re.fullmatch("[0-9a-f]{16}", config_a["base"])
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["gift.attention_wq.psi.weight"].abs().max() > 0
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert len(log_a) == len(log_b) == 30
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    forward, calls = llama.Transformer.forward, []

    def interrupted_in_step_7(*a, **kw):  # 2 micro-batches per step; the checkpoint holds step 4
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return forward(*a, **kw)
    monkeypatch.setattr(llama.Transformer, "forward", interrupted_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        tl.main(_llama_train_args(model_dir, data, tmp_path / "c", "--micro-batch-size", "8", "--save-every", "4"))
    monkeypatch.undo()
    assert len((tmp_path / "c" / "log.jsonl").read_text().splitlines()) == 6
    tl.main(_llama_train_args(model_dir, data, tmp_path / "c", "--micro-batch-size", "8", "--save-every", "4",
                              "--resume"))
    log_c = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_c] == list(range(1, 31))  # steps 5 and 6 once, not twice
    assert [r["loss"] for r in log_c] == [r["loss"] for r in log_a]
    _llama_user_error(capsys, _llama_train_args(model_dir, data, tmp_path / "b", "--resume", "--lr", "2e-2"),
                      r"b.checkpoint.pt was written by a run with other settings or inputs \(lr 0.01 -> 0.02\)")


def _llama_first_records(data, dst, n=48):
    """A copy of the data folder whose training file holds its first n records (48: 3 steps of 16): a run that
    evaluates after training (--stop-after would not) in a few steps."""
    shutil.copytree(data, dst)
    records = json.loads((data / "commonsense_170k.json").read_text())[:n]
    (dst / "commonsense_170k.json").write_text(json.dumps(records))
    return dst


def test_llama_torchrun_two_processes_equal_one(tmp_path, _llama_demo, torchrun):
    model_dir, data = _llama_demo[0], _llama_first_records(_llama_demo[1], tmp_path / "data")
    extra = ["--eval-limit", "5", "--tasks", "boolq", "ARC-Easy"]
    one = _llama_train_args(model_dir, data, tmp_path / "one", "--micro-batch-size", "16", *extra)
    tl.main([a for a in one if a != "--no-eval"])
    two = _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", *extra)
    torchrun("train_llama.py", *[a for a in two if a != "--no-eval"])
    a, b = _llama_adapter(tmp_path / "one")[1], _llama_adapter(tmp_path / "two")[1]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    ev_a = json.loads((tmp_path / "one" / "eval.json").read_text())
    ev_b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert ev_a["accuracy"] == ev_b["accuracy"]
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


def test_llama_merged_export_equals_gift_model(tmp_path):
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    base = _llama_write_shards(model, tmp_path / "base", 1, llama3=True)
    gift_model = llama.load_llama(base, max_seq_len=128)
    torch.manual_seed(0)
    add_gift(gift_model, ["attention.wq", "attention.wv"], 8)
    with torch.no_grad():
        for theta in gift_model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    config = {"targets": ["attention.wq", "attention.wv"], "rank": 8, "share": "type"}
    write_safetensors(tmp_path / "adapter.safetensors", gift_state_dict(gift_model), {"config": json.dumps(config)})
    tl.main(["--model", str(base), "--adapter", str(tmp_path / "adapter.safetensors"), "--merge",
             str(tmp_path / "merged")])
    merged = llama.load_llama(tmp_path / "merged", max_seq_len=128)
    assert sorted(os.listdir(tmp_path / "merged")) == ["consolidated.00.pth", "params.json"]
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "base", "merged"]  # no temporary sibling left
    assert set(json.loads((tmp_path / "merged" / "params.json").read_text())) <= {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
        "rope_theta", "use_scaled_rope", "rope_scaling"}
    tokens = _llama_tokens()
    with torch.no_grad():
        out, ref, plain = merged(tokens), gift_model(tokens), model(tokens)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0) and not torch.allclose(out, plain, atol=1e-3)


def test_llama_lora_end_to_end(tmp_path, _llama_demo):
    model_dir, data = _llama_demo
    out = tmp_path / "lora"
    tl.main(_llama_train_args(model_dir, data, out, "--micro-batch-size", "16", "--stop-after", "3",
                              "--method", "lora", "--rank", "4"))
    config, state = _llama_adapter(out)
    targets = ["attention.wq", "attention.wk", "attention.wv", "feed_forward.w3", "feed_forward.w2"]
    assert config == {"script": "train_llama.py", "method": "lora", "targets": targets, "rank": 4, "lora_alpha": 8.0,
                      "model": str(model_dir), "base": config["base"], "lr": 1e-2, "seed": 42}
    assert sorted(state) == sorted(f"layers.{i}.{t}.lora_{m}" for i in range(2) for t in targets for m in "AB")
    assert state["layers.1.feed_forward.w2.lora_B"].abs().max() > 0  # trained from B = 0
    adapter = str(out / "adapter.safetensors")
    ev = ["--model", str(model_dir), "--data", str(data), "--adapter", adapter, "--eval-only", "--precision", "fp64",
          "--device", "cpu",
          "--eval-limit", "4", "--tasks", "boolq", "--out", str(tmp_path / "ev")]
    tl.main(ev)
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # dim 64, 2 KV heads of 16, FFN 192 (2/3 of 4 x 64, rounded up to 32): r (d_in + d_out) per layer
    n = 2 * 4 * sum(d_in + d_out for d_in, d_out in [(64, 64), (64, 32), (64, 32), (64, 192), (192, 64)])
    assert result["adapter"]["method"] == "lora" and result["trainable_params"] == n
    assert f"| LoRA q,k,v,up,down r=4 alpha 8, {n:,} params: accuracy |" in (tmp_path / "ev" / "eval.md").read_text()
    # merged: plain Meta keys (W + (alpha/r) B A), the same logits as the unmerged model, on a float64 copy
    base = llama.load_llama(model_dir, dtype=torch.float64)
    llama.save_meta(base, tmp_path / "base64")
    tl.main(["--model", str(tmp_path / "base64"), "--adapter", adapter, "--merge", str(tmp_path / "merged")])
    merged = llama.load_llama(tmp_path / "merged")
    assert list(merged.state_dict()) == list(base.state_dict()) and merged.output.weight.dtype == torch.float64
    unmerged = tl.load_model(tl.parse_args(ev[:1] + [str(tmp_path / "base64")] + ev[2:]))[0].eval()
    tokens = _llama_tokens(vocab=base.args.vocab_size)
    with torch.no_grad():
        want = unmerged(tokens)
        assert torch.allclose(merged(tokens), want, atol=1e-10, rtol=0)
        assert not torch.allclose(base(tokens), want, atol=1e-6)


def test_llama_lora_step0_and_adapter_precision(_llama_demo):
    model_dir, data = _llama_demo
    base = llama.load_llama(model_dir, dtype=torch.float64)
    tokens = _llama_tokens(vocab=base.args.vocab_size)
    args = ["--model", str(model_dir), "--data", str(data), "--precision", "fp64"]
    lora = tl.load_model(tl.parse_args(args + ["--method", "lora"]), torch.float64)[0]
    with torch.no_grad():
        assert torch.equal(lora(tokens), base(tokens))  # B = 0
    assert {p.shape for p in lora.parameters() if p.requires_grad} >= {(32, 64), (64, 32), (192, 32)}  # r = 32
    assert lora.layers[0].attention.wq.scale == 2.0  # alpha = 2r
    official = tl.load_model(tl.parse_args(args + ["--adapter-precision", "bf16"]), torch.float32)[0]
    assert {p.dtype for p in official.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in official.parameters() if not p.requires_grad} == {torch.float32}
    ours = tl.load_model(tl.parse_args(args), torch.bfloat16)[0]
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}  # fp32 master weights


def test_llama_find_tokenizer(tmp_path, capsys):
    """An HF folder's tokenizer.json first (what transformers loads; EOS from the JSON beside it), then
    tokenizer.model, then original/tokenizer.model; --tokenizer (a file or a folder) wins; none, or one without
    EOS, is the user's error, reported before the model is loaded."""
    from tokenizer import HFTokenizer, TiktokenTokenizer, train_tiny_tokenizer
    d = tmp_path / "model"
    (d / "original").mkdir(parents=True)
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "added_tokens": [{"id": 3, "content": "</s>", "special": True, "normalized": False}]}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for path in (d / "tokenizer.model", d / "original" / "tokenizer.model", tmp_path / "other.model"):
        train_tiny_tokenizer(["aaab aab"], 258, str(path))
    tok = llama.find_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 3 and tok.encode("abab</s>", False, False) == [2, 2, 3]
    assert llama.find_tokenizer(d, tmp_path / "other.model").path == str(tmp_path / "other.model")
    assert llama.find_tokenizer(tmp_path / "elsewhere", d).path == str(d / "tokenizer.json")  # --tokenizer FOLDER
    (d / "tokenizer.json").unlink()
    assert llama.find_tokenizer(d).path == str(d / "tokenizer.model")
    (d / "tokenizer.model").unlink()
    tok = llama.find_tokenizer(d)
    assert isinstance(tok, TiktokenTokenizer) and tok.path == str(d / "original" / "tokenizer.model")
    (d / "original" / "tokenizer.model").unlink()
    with pytest.raises(UserError, match=r"no tokenizer.json or tokenizer.model in .*model \(or its original"):
        llama.find_tokenizer(d)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer.json: no end-of-text token declared: add eos_token"):
        llama.find_tokenizer(d)
    (d / "params.json").write_text("{}")  # a checkpoint folder, as far as the first look goes
    with pytest.raises(SystemExit) as e:  # the tokenizer is looked at before the model is loaded
        tl.main(["--model", str(d), "--generate", "Hi"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {d / 'tokenizer.json'}: no end-of-text")


def test_llama_bad_data_record_raises(tmp_path, _llama_demo, capsys):
    model_dir, data = _llama_demo
    bad = tmp_path / "data"
    (bad / "dataset" / "boolq").mkdir(parents=True)
    records = json.loads((data / "commonsense_170k.json").read_text())
    del records[3]["answer"]
    (bad / "commonsense_170k.json").write_text(json.dumps(records))
    _llama_user_error(capsys, _llama_train_args(model_dir, bad, tmp_path / "out"),
                      r"commonsense_170k.json: record 3 has no field 'answer'")
    (bad / "dataset" / "boolq" / "test.json").write_text(json.dumps([{"instruction": "x", "answer": "true"}, {}]))
    _llama_user_error(capsys, ["--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                               "--eval-only", "--tasks", "boolq"],
                      r"boolq.test.json: record 1 has no field 'instruction'")


def test_llama_own_tasks_evaluate_by_their_answer_form(tmp_path, capsys, _llama_demo):
    """A task folder that is not one of the paper's eight: its answers' form (answerK, optionK, solutionK,
    endingK, true/false) gives the answer words; any other form is refused before anything is loaded."""
    model_dir, data = _llama_demo
    own = tmp_path / "data"
    shutil.copytree(data, own)
    forms = {"intents": ["answer7", "answer12", "answer1"], "pairs": ["option2", "option1"], "yesno": ["true", "false"],
             "labels": ["answer1", "play_music"], "mixed": ["answer1", "option2"]}
    for task, answers in forms.items():
        (own / "dataset" / task).mkdir()
        (own / "dataset" / task / "test.json").write_text(json.dumps(
            [{"instruction": f"Pick one of {'/'.join(answers)}", "answer": a} for a in answers]))
    assert cs.read_test_set(own, "intents")[1] == "answer[1-9][0-9]*"
    assert cs.extract("so answer12, not answer1", "first_match", "answer[1-9][0-9]*") == "answer12"
    assert cs.read_test_set(own, "yesno")[1] == "true|false" and cs.read_test_set(own, "boolq")[1] == "true|false"
    acc = tl.main(["--model", str(model_dir), "--data", str(own), "--out", str(tmp_path / "o"), "--eval-only",
                   "--device", "cpu",
                   "--tasks", "intents", "pairs", "yesno", "--extract", "first_match", "--max-new-tokens", "4"])
    assert set(acc) == {"intents", "pairs", "yesno", "avg"}
    gens = [json.loads(line) for line in (tmp_path / "o" / "eval_generations.jsonl").read_text().splitlines()]
    assert [g["answer"] for g in gens] == forms["intents"] + forms["pairs"] + forms["yesno"]
    # the held-out loss is the mean cross-entropy per target token (as in training): computed here from full logits
    tok, model = llama.find_tokenizer(model_dir), llama.load_llama(model_dir)
    nll = []
    for a in forms["intents"]:
        ids, n = cs.example_ids(tok, {"instruction": f"Pick one of {'/'.join(forms['intents'])}", "answer": a},
                                "paper", 512)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        nll += [-logp[t - 1, ids[t]].item() for t in range(n, len(ids))]
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert ev["n"] == {"intents": 3, "pairs": 2, "yesno": 2}
    assert abs(ev["loss"]["intents"] - sum(nll) / len(nll)) < 1e-5
    assert ev["interval95"]["pairs"] == cs.wilson_interval(ev["accuracy"]["pairs"], 2)
    for task, odd in [("labels", "'play_music'"), ("mixed", "'answer1', 'option2'"), ("nothere", "there is no")]:
        with pytest.raises(SystemExit):
            tl.main(["--model", str(model_dir), "--data", str(own), "--eval-only", "--tasks", "pairs", task])
        err = capsys.readouterr().err
        assert err.startswith("error: ") and odd in err and err.count("\n") == 1, err
        assert task == "nothere" or "answerK, optionK, solutionK, endingK, true/false" in err


def test_llama_wilson_interval():
    assert cs.wilson_interval(50.0, 100) == [40.4, 59.6]
    assert str(cs.wilson_interval(0.0, 10)) == "[0.0, 27.8]" and cs.wilson_interval(100.0, 10) == [72.2, 100.0]
    assert cs.wilson_interval(100 * 125 / 138, 138) == [84.5, 94.4]


def test_llama_prompts_targets_and_extraction():
    r = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
         "answer": "true"}
    paper = cs.prompt_of(r, "paper") + cs.target_of(r, "paper")
    assert paper == "Is it? Answer format: true/false\nthe correct answer is true"
    assert cs.prompt_of(r, "alpaca").endswith("### Instruction:\nIs it? Answer format: true/false\n\n### Response:\n")
    assert cs.extract("the correct answer is  true ", "paper", "true|false") == "true"
    assert cs.extract("true, the correct answer is false", "paper", "true|false") == "false"
    assert cs.extract("I think true", "paper", "true|false") == ""
    assert cs.extract("false or true", "first_match", "true|false") == "false"
    assert cs.extract("answer3 then answer1", "first_match", "answer1|answer2|answer3|answer4|answer5") == "answer3"
    x, y = cs.collate([(torch.tensor([1, 5, 6, 7, 2]), 3), (torch.tensor([1, 8, 2]), 2)], "cpu")
    assert x.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert y.tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]


def test_llama_fsdp_two_processes_equal_one(tmp_path, _llama_demo, torchrun, capsys):
    """--fsdp (FSDP2 over 2 gloo processes, 2 micro-batches each), stopped after step 2 and resumed to the end (3) with
    activation checkpointing, gives one process's Theta, full tensors in adapter and checkpoint, and its
    generations (every rank runs every batch in lockstep)."""
    model_dir, data = _llama_demo[0], _llama_first_records(_llama_demo[1], tmp_path / "data")
    extra = ["--eval-limit", "5", "--tasks", "boolq", "ARC-Easy"]
    tl.main([a for a in _llama_train_args(model_dir, data, tmp_path / "one", "--micro-batch-size", "16", *extra)
             if a != "--no-eval"])
    _llama_user_error(capsys, _llama_train_args(model_dir, data, tmp_path / "x", "--fsdp"),  # nothing to shard over
                      "--fsdp shards the model over processes")
    first = _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", "--fsdp",
                              "--stop-after", "2")
    resumed = [a for a in _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", "--fsdp",
                                            "--resume", "--grad-checkpointing", *extra)
               if a != "--no-eval"]
    for args in (first, resumed):
        torchrun("train_llama.py", *args)
    for a, b in ([_llama_adapter(tmp_path / d)[1] for d in ("one", "two")],
                 [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["theta"] for d in ("one", "two")]):
        assert a.keys() == b.keys() and len(a) == 4
        for key in a:
            assert type(b[key]) is torch.Tensor and b[key].dtype == torch.float64, key
            assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    assert a["gift.attention_wq.psi.weight"].abs().max() > 0
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


# -----------------------------------------------------------------------------
# Faults: a run stops with one clear line, never in silent garbage, never over a user's files


@pytest.fixture(scope="module")
def _llama_stopped(_llama_demo, tmp_path_factory):
    """A run of the demo setup stopped after step 2: its --out holds checkpoint.pt."""
    model_dir, data = _llama_demo
    out = tmp_path_factory.mktemp("stopped")
    tl.main(_llama_train_args(model_dir, data, out, "--stop-after", "2"))
    return out


def _llama_copy_with(src, dst, change):
    """A copy of the folder src with change(dst) applied."""
    shutil.copytree(src, dst)
    change(dst)
    return dst


def _llama_edit_weight(path, key="layers.1.feed_forward.w2.weight", value=float("nan")):
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state[key][3, 5] = value
    torch.save(state, path / "consolidated.00.pth")


@pytest.mark.parametrize("change,match", [
    (["--clip", "0.5"], r"\(clip 1.0 -> 0.5\)"),
    (["--precision", "fp32"], r"\(dtype 'torch.float64' -> 'torch.float32'\)"),
    ("model", r"\(model '[0-9a-f]+' -> '[0-9a-f]+'\)"),
    ("data", r"\(data '[0-9a-f]+' -> '[0-9a-f]+'\)")])
def test_llama_resume_refuses_another_run(_llama_demo, _llama_stopped, tmp_path, capsys, change, match):
    model_dir, data = _llama_demo
    if change == "model":  # the same folder name and sizes, one weight changed
        model_dir = _llama_copy_with(model_dir, tmp_path / "model", lambda p: _llama_edit_weight(p, value=0.5))
    elif change == "data":
        def edit(p):
            records = json.loads((p / "commonsense_170k.json").read_text())
            records[0]["answer"] = "false" if records[0]["answer"] == "true" else "true"
            (p / "commonsense_170k.json").write_text(json.dumps(records))
        data = _llama_copy_with(data, tmp_path / "data", edit)
    extra = change if isinstance(change, list) else []
    _llama_user_error(capsys, _llama_train_args(model_dir, data, _llama_stopped, "--resume", *extra),
                      r"checkpoint.pt was written by a run with other settings or inputs " + match)


def test_llama_resume_accepts_moved_inputs(_llama_demo, _llama_stopped, tmp_path, capsys):
    model_dir, data = _llama_demo
    out = shutil.copytree(_llama_stopped, tmp_path / "out")
    moved = shutil.copytree(model_dir, tmp_path / "elsewhere")
    tl.main(_llama_train_args(moved, data, out, "--resume", "--stop-after", "3"))
    assert "stopped by --stop-after after 3 of 30 steps" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("when,match", [
    ("weight", r"step 1: loss nan, gradient norm nan; training stopped, nothing was saved"),
    ("step 6", r"step 6: loss nan, gradient norm nan; training stopped, .*checkpoint.pt \(step 4\) is kept")])
def test_llama_nonfinite_loss_stops(_llama_demo, tmp_path, capsys, monkeypatch, when, match):
    model_dir, data = _llama_demo
    if when == "weight":  # one NaN in a base weight
        model_dir = _llama_copy_with(model_dir, tmp_path / "model", _llama_edit_weight)
    else:
        forward, calls = llama.Transformer.forward, []

        def nan_in_step_6(*a, **kw):
            calls.append(1)
            return forward(*a, **kw) * (float("nan") if len(calls) == 6 else 1.0)
        monkeypatch.setattr(llama.Transformer, "forward", nan_in_step_6)
    out = tmp_path / "out"
    _llama_user_error(capsys, _llama_train_args(model_dir, data, out, "--micro-batch-size", "16", "--save-every", "4"),
                      match)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in log] == ([] if when == "weight" else [1, 2, 3, 4, 5])
    assert not (out / "adapter.safetensors").exists()
    if when != "weight":
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 4 and all(t.isfinite().all() for t in ckpt["theta"].values())


def _llama_hf_folder(path, index=None, **config):
    """A minimal HF folder: config.json (fields overridden or, when None, left out) and maybe an index."""
    path.mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2,
           "vocab_size": 96, **config}
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return path


def _llama_setup(kind, model_dir, data, tmp_path):
    """(model, data, extra arguments) of a command line with one mistake of the given kind."""
    if kind == "no_train_file":
        return model_dir, tmp_path, []
    if kind == "no_data_folder":
        return model_dir, tmp_path / "dta", []
    if kind == "out_is_file":
        (tmp_path / "run.txt").write_text("")
        return model_dir, data, ["--out", str(tmp_path / "run.txt")]
    if kind == "other_width_adapter":  # GIFT on a LLaMA of width 32 (this one's is 64)
        other = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=8, multiple_of=32))
        add_gift(other, ["attention.wq", "attention.wv"], 8)
        config = {"script": "train_llama.py", "method": "gift", "targets": ["attention.wq", "attention.wv"],
                  "rank": 8, "share": "type", "model": "tiny-32"}
        write_safetensors(tmp_path / "adapter.safetensors", gift_state_dict(other), {"config": json.dumps(config)})
        return model_dir, data, ["--eval-only", "--adapter", str(tmp_path / "adapter.safetensors")]
    if kind in ("empty_task", "latin1_task"):
        bad = shutil.copytree(data, tmp_path / "data")
        (bad / "dataset" / "piqa" / "test.json").write_bytes(b"[]" if kind == "empty_task" else
                                                             b'[{"instruction": "caf\xe9", "answer": "x"}]')
        return model_dir, bad, []
    if kind == "latin1_train":
        bad = shutil.copytree(data, tmp_path / "data")
        (bad / "commonsense_170k.json").write_bytes(b'[{"instruction": "caf\xe9", "answer": "x"}]')
        return model_dir, bad, []
    if kind.startswith("params"):
        text = {"params_not_json": '{"dim": 64,', "params_no_field": '{"dim": 64, "n_heads": 4}'}[kind]
        return _llama_copy_with(model_dir, tmp_path / "model", lambda p: (p / "params.json").write_text(text)), data, []
    tokenizer = ["--tokenizer", str(model_dir / "tokenizer.model")]
    if kind == "config_no_field":
        return _llama_hf_folder(tmp_path / "hf", hidden_size=None), data, tokenizer
    if kind == "index_outside":
        index = {"model.embed_tokens.weight": "../../etc.safetensors"}
        return _llama_hf_folder(tmp_path / "hf", index=index), data, tokenizer
    if kind == "small_tokenizer":
        records = json.loads((data / "commonsense_170k.json").read_text())
        tok = train_tiny_tokenizer([r["instruction"] for r in records], 300, tmp_path / "small.model")
        return model_dir, data, ["--tokenizer", str(tok)]
    if kind == "vit_adapter":
        write_safetensors(tmp_path / "adapter.safetensors", {"x": torch.zeros(1)},
                          {"config": json.dumps({"script": "train_vit.py", "targets": ["attn.proj"], "rank": 16})})
        return model_dir, data, ["--eval-only", "--adapter", str(tmp_path / "adapter.safetensors")]
    if kind == "adapter_pt":
        torch.save({}, tmp_path / "adapter.pt")
        return model_dir, data, ["--eval-only", "--adapter", str(tmp_path / "adapter.pt")]
    return model_dir, data, {"unknown_task": ["--eval-only", "--tasks", "boolq", "nope"],
                             "eval_limit": ["--eval-limit", "0"]}[kind]


@pytest.mark.parametrize("kind,match", [
    ("no_train_file", r"--data .*: no commonsense_170k.json in it \(the LLM-Adapters layout"),
    ("unknown_task", r"--tasks nope: there is no .*nope.test.json \(the tasks in .*: ARC-Challenge, ARC-Easy, boolq"),
    ("empty_task", r"piqa.test.json: no records; leave piqa out of --tasks"),
    ("latin1_task", r"piqa.test.json: not UTF-8 text \(invalid continuation byte at byte 21\)"),
    ("latin1_train", r"commonsense_170k.json: not UTF-8 text"),
    ("params_not_json", r"params.json: not valid JSON \(Expecting"),
    ("params_no_field", r"params.json: no field 'n_layers'"),
    ("config_no_field", r"config.json: no field 'hidden_size'"),
    ("index_outside", r"model.safetensors.index.json: names '../../etc.safetensors', outside the model folder"),
    ("small_tokenizer", r"the tokenizer .*small.model \(\d+ ids\) does not fit the model .* \(\d+ embedding rows\)"),
    ("vit_adapter", r"adapter.safetensors is an adapter of train_vit.py, not of train_llama.py"),
    ("adapter_pt", r"adapter.pt: not an adapter.safetensors"),
    ("eval_limit", r"--eval-limit 0: must be at least 1"),
    ("no_data_folder", r"--data .*dta: no commonsense_170k.json in it \(the LLM-Adapters layout"),
    ("out_is_file", r"--out .*run.txt is a file: give a folder for the run"),
    ("other_width_adapter", r"--adapter .*adapter.safetensors was trained on tiny-32 and does not fit --model .*model "
                            r"\(gift.attention_wq.phi.weight: \(\d+, 32\) in the adapter, \(\d+, 64\) in this "
                            r"model\)")])
def test_llama_user_errors_are_one_line(_llama_demo, tmp_path, capsys, kind, match):
    model_dir, data, extra = _llama_setup(kind, *_llama_demo, tmp_path)
    argv = _llama_train_args(model_dir, data, tmp_path / "out", *extra)
    _llama_user_error(capsys, [a for a in argv if a != "--no-eval" or "task" not in kind], match)


def test_llama_used_out_and_merge_targets_are_refused(_llama_demo, _llama_stopped, tmp_path, capsys):
    model_dir, data = _llama_demo
    _llama_user_error(capsys, _llama_train_args(model_dir, data, _llama_stopped), "checkpoint.pt exists: add --resume")
    adapter = str(_llama_stopped / "adapter.safetensors")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for target, match in [(model_dir, "is the --model folder: writing there would destroy it"),
                          (_llama_stopped, r"holds a checkpoint \(.lock, adapter.safetensors, cache, checkpoint.pt, "
                                           r"...\): writing there would replace them")]:
        _llama_user_error(capsys, ["--model", str(model_dir), "--adapter", adapter, "--merge", str(target)], match)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    (tmp_path / "mine.txt").write_text("")
    _llama_user_error(capsys, ["--demo", "--out", str(tmp_path)], r"--out .* holds files \(mine.txt\)")


def test_llama_max_len_beyond_mistral_sliding_window_is_refused(tmp_path, capsys):
    _, path = _hub_model(tmp_path, "mistral", sliding_window=48)
    _llama_user_error(capsys, ["--model", str(path), "--data", str(tmp_path), "--max-len", "49"],
                      "--max-len 49 > the sliding window")


def test_llama_missing_rope_theta_is_said(_llama_demo, tmp_path, capsys):
    def drop(p):
        params = json.loads((p / "params.json").read_text())
        del params["rope_theta"], params["norm_eps"]
        (p / "params.json").write_text(json.dumps(params))
    model = llama.load_llama(_llama_copy_with(_llama_demo[0], tmp_path / "model", drop))
    assert model.args.rope_theta == 10000.0
    assert "params.json does not say: assuming norm_eps 1e-05, rope_theta 10000.0" in capsys.readouterr().out


def test_llama_command_line_error_is_one_line_before_loading(_llama_demo, tmp_path):
    model_dir, data = _llama_demo
    proc = subprocess.run([sys.executable, str(Path(tl.__file__)), "--model", str(model_dir), "--data", str(data),
                           "--out", str(tmp_path / "out"), "--eval-only", "--tasks", "bolq"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # nothing loaded, nothing printed before
    assert re.fullmatch(r"error: --tasks bolq: there is no .*bolq.test.json \(the tasks in .*\)\n", proc.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,match", [
    (["--targets", "q_porj"], r"--targets q_porj: LLaMA has no layer of that name; valid: attention.wq, .*HF's q_proj"),
    (["--targets", "wq", "mlp.w9"], r"--targets mlp.w9: LLaMA has no layer of that name"),
    (["--rank", "0"], r"--rank 0: must be at least 1"),
    (["--rank", "-4"], r"--rank -4: must be at least 1"),
    (["--epochs", "0"], r"--epochs 0: must be at least 1"),
    (["--batch-size", "0"], r"--batch-size 0: must be at least 1"),
    (["--micro-batch-size", "0"], r"--micro-batch-size 0: must be at least 1"),
    (["--save-every", "0"], r"--save-every 0: must be at least 1"),
    (["--stop-after", "0"], r"--stop-after 0: must be at least 1"),
    (["--eval-batch-size", "0"], r"--eval-batch-size 0: must be at least 1"),
    (["--max-len", "1"], r"--max-len 1: must be at least 2"),
    (["--max-new-tokens", "-1"], r"--max-new-tokens -1: must be at least 0"),
    (["--lr", "0"], r"--lr 0.0: must be greater than 0"),
    (["--method", "lora", "--lora-alpha", "0"], r"--lora-alpha 0.0: must be greater than 0"),
    (["--weight-decay", "-0.1"], r"--weight-decay -0.1: must be at least 0"),
    (["--warmup", "1.5"], r"--warmup 1.5: a fraction of the steps, at most 1"),
    (["--clip", "-1"], r"--clip -1.0: must be at least 0"),
    (["--precision", "fp16"], None)])
def test_llama_flag_mistakes_are_one_line_before_loading(tmp_path, capsys, extra, match):
    """Issue 18 rows 1 and 3: checked before anything is read (the --model folder does not even exist)."""
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out", str(tmp_path / "o"), *extra]
    if match is None:  # argparse's own error: its usage and one line, exit status 2
        with pytest.raises(SystemExit) as e:
            tl.main(argv)
        assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    else:
        _llama_user_error(capsys, argv, match)
    assert not (tmp_path / "o").exists()


def test_llama_hf_target_names_train_the_same_layers(tmp_path, _llama_demo):
    model_dir, data = _llama_demo
    tl.main(_llama_train_args(model_dir, data, tmp_path / "hf", "--stop-after", "2", "--targets", "q_proj", "v_proj"))
    tl.main(_llama_train_args(model_dir, data, tmp_path / "meta", "--stop-after", "2", "--targets", "wq", "wv"))
    (config, theta), (config_meta, theta_meta) = _llama_adapter(tmp_path / "hf"), _llama_adapter(tmp_path / "meta")
    assert config["targets"] == config_meta["targets"] == ["attention.wq", "attention.wv"]
    assert theta.keys() == theta_meta.keys() and all(torch.equal(theta[k], theta_meta[k]) for k in theta)
    start = str(tmp_path / "hf" / "adapter.safetensors")  # --adapter without --eval-only: training goes on from it
    tl.main(_llama_train_args(model_dir, data, tmp_path / "on", "--stop-after", "1", "--adapter", start,
                              "--targets", "wk", "--rank", "4"))
    config_on, theta_on = _llama_adapter(tmp_path / "on")
    assert config_on == config and theta["gift.attention_wq.psi.weight"].abs().max() > 0
    assert theta_on.keys() == theta.keys() and all(torch.equal(theta_on[k], theta[k]) for k in theta)  # step 1: lr 0


def test_llama_base_model_is_labelled_zero_shot_and_stop_after_does_not_evaluate(tmp_path, _llama_demo, capsys):
    """Issue 18 rows 6 and 7."""
    model_dir, data = _llama_demo
    tl.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "base"), "--eval-only",
             "--tasks", "boolq", "--eval-limit", "4", "--device", "cpu"])
    ev = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert ev["model"] == "base model (zero-shot)" and ev["adapter"] is None and ev["trainable_params"] == 0
    table = (tmp_path / "base" / "eval.md").read_text()
    assert table.startswith("| task | base model (zero-shot): accuracy |") and "GIFT" not in table
    out = tmp_path / "stopped"
    capsys.readouterr()
    tl.main([a for a in _llama_train_args(model_dir, data, out, "--stop-after", "2", "--tasks", "boolq")
             if a != "--no-eval"])
    printed = capsys.readouterr().out
    assert f"stopped by --stop-after after 2 of 30 steps: {out / 'checkpoint.pt'} holds it" in printed
    assert (out / "adapter.safetensors").is_file() and not (out / "eval.json").exists() and "boolq:" not in printed


def test_llama_ctrl_c_saves_the_step_and_resume_equals_uninterrupted(tmp_path, _llama_demo):
    """SIGINT to a training process after its first logged step: the step in progress finishes, checkpoint.pt holds
    it, one line says how to resume, exit status 0; --resume then ends with the uninterrupted run's Theta."""
    model_dir, data = _llama_demo
    argv = lambda out: _llama_train_args(model_dir, data, out, "--micro-batch-size", "16", "--device", "cpu")  # noqa
    tl.main(argv(tmp_path / "a"))
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(Path(tl.__file__)), *argv(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 30 and "SIGINT: finishing this step" in stderr and "Traceback" not in stderr
    assert f"stopped by SIGINT after {step} of 30 steps: {out / 'checkpoint.pt'} holds it; to continue, run the " \
           f"same command with --resume" in stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == step
    tl.main(argv(out) + ["--resume"])
    (_, a), (_, b) = _llama_adapter(tmp_path / "a"), _llama_adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # float64, the same code path
    log = lambda d: [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "a") == log(out)


def test_llama_compile_gives_the_eager_losses(tmp_path, _llama_demo, monkeypatch):
    """--compile, through dynamo and AOTAutograd (GIFT_COMPILE_BACKEND=aot_eager: no C++ compiler needed), in
    float64: the same losses as eager within 1e-9 (a compiled graph may reorder sums)."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python / platform")
    monkeypatch.setenv("GIFT_COMPILE_BACKEND", "aot_eager")
    model_dir, data = _llama_demo
    losses = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        tl.main(_llama_train_args(model_dir, data, tmp_path / name, "--micro-batch-size", "16", "--stop-after", "2",
                                  "--device", "cpu", *extra))
        losses.append([json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-9, rel=0)


# -----------------------------------------------------------------------------
# On a GPU (skipped without one): the defaults there (cuda, bf16), GIFT's step 0, merging, --compile

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_llama_demo_on_the_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(tl.__file__)), "--demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo on cuda" in proc.stdout and "demo finished" in proc.stdout
    assert json.loads((tmp_path / "demo" / "run" / "eval.json").read_text())["adapter"]["method"] == "gift"
    ckpt = torch.load(tmp_path / "demo" / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["run"]["dtype"] == "torch.bfloat16"  # the GPU's default --precision


@cuda
def test_llama_gift_step0_is_the_base_model_in_bf16(_llama_demo):
    model_dir, data = _llama_demo
    base = llama.load_llama(model_dir, dtype=torch.bfloat16).cuda().eval()
    gift, _ = tl.load_model(tl.parse_args(["--model", str(model_dir), "--data", str(data)]), torch.bfloat16)
    tokens = _llama_tokens(vocab=base.args.vocab_size).cuda()
    with torch.no_grad():
        assert torch.equal(gift.cuda().eval()(tokens), base(tokens))  # psi = 0: x + x phi psi is x exactly


@cuda
def test_llama_merged_equals_unmerged_in_bf16(_llama_demo):
    """bf16 keeps 8 bits of mantissa: the merged W (I + phi psi) is rounded once more than W applied to
    x (I + phi psi); the logits agree within 5% of their largest magnitude."""
    model_dir, data = _llama_demo
    model, _ = tl.load_model(tl.parse_args(["--model", str(model_dir), "--data", str(data)]), torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for theta in model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    model = model.cuda().eval()
    tokens = _llama_tokens(vocab=model.args.vocab_size).cuda()
    with torch.no_grad():
        unmerged = model(tokens)
        merged = tl.merge_adapter(model)(tokens)
        base = llama.load_llama(model_dir, dtype=torch.bfloat16).cuda()(tokens)
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 0.05 * scale < (base - unmerged).abs().max()  # psi moved the logits


@cuda
def test_llama_compile_on_the_gpu_gives_the_eager_losses(tmp_path, _llama_demo):
    """--compile with inductor on the GPU, fp32: the eager losses within 1e-4 (fused kernels reorder sums)."""
    model_dir, data = _llama_demo
    losses = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        tl.main([a for a in _llama_train_args(model_dir, data, tmp_path / name, "--micro-batch-size", "16",
                                              "--stop-after", "3", "--device", "cuda", *extra, "--precision", "fp32")])
        losses.append([json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-4, rel=0)


# -----------------------------------------------------------------------------
# Issue 22: adapters, run folders and evaluations that must not be silently wrong or lost

@pytest.mark.parametrize("config,match", [
    ([1, 2], r"its run config is '\[1, 2\]', expected a JSON object"),
    ({"rank": "8"}, r"config: rank is '8' \(str\), expected a whole number at least 1"),
    ({"rank": 0}, r"config: rank is 0 \(int\), expected a whole number at least 1"),
    ({"method": "dora"}, r"config: method is 'dora' \(str\), expected a string among 'gift', 'lora'"),
    ({"targets": "wq"}, r"config: targets is 'wq', expected a list of layer names"),
    ({"targets": ["attention.wx"]}, r"config: --targets attention.wx: LLaMA has no layer of that name"),
    ({"share": 1}, r"config: share is 1 \(int\), expected a string among 'type', 'all'"),
    ({"method": "lora", "lora_alpha": "64"}, r"config: lora_alpha is '64' \(str\), expected a number greater than 0"),
    ({"base": 5}, r"config: base is 5 \(int\), expected a string")])
def test_llama_adapter_metadata_is_checked(_llama_demo, _llama_stopped, tmp_path, capsys, config, match):
    """Issue 22 class 2: an adapter's run config with a wrong type or value is one line naming the file and the
    field, before the model is loaded (no ValueError, KeyError or AttributeError traceback)."""
    model_dir, data = _llama_demo
    meta = json.loads(read_safetensors_metadata(_llama_stopped / "adapter.safetensors")["config"])
    state = {k: v.clone() for k, v in read_safetensors(_llama_stopped / "adapter.safetensors").items()}
    path = tmp_path / "adapter.safetensors"
    write_safetensors(path, state, {"config": json.dumps(config if isinstance(config, list) else meta | config)})
    _llama_user_error(capsys, ["--model", str(model_dir), "--data", str(data), "--adapter", str(path), "--eval-only",
                               "--out", str(tmp_path / "ev"), "--device", "cpu"], match)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("base", ["merged", "other_weights"])
def test_llama_adapter_on_another_base_is_refused(_llama_demo, tmp_path, capsys, base):
    """Issue 22 class 1: an adapter evaluated on its own merged model (the edit applied twice) or on other weights
    is refused naming both models; --any-base applies it anyway."""
    model_dir, data = _llama_demo
    tl.main(_llama_train_args(model_dir, data, tmp_path / "run", "--stop-after", "2", "--lr", "1"))
    adapter = str(tmp_path / "run" / "adapter.safetensors")
    if base == "merged":
        tl.main(["--model", str(model_dir), "--adapter", adapter, "--merge", str(tmp_path / "other")])
    else:  # another checkpoint of the same architecture (the identity samples 64 values of each tensor)
        def other(path):
            state = torch.load(path / "consolidated.00.pth", weights_only=True)
            torch.save(state | {"norm.weight": state["norm.weight"] * 1.5}, path / "consolidated.00.pth")
        _llama_copy_with(model_dir, tmp_path / "other", other)
    argv = ["--model", str(tmp_path / "other"), "--data", str(data), "--adapter", adapter, "--eval-only",
            "--tasks", "boolq", "--eval-limit", "2", "--device", "cpu", "--out", str(tmp_path / "ev"),
            "--tokenizer", str(model_dir / "tokenizer.model")]
    _llama_user_error(capsys, argv, rf"{re.escape(adapter)} was trained on {re.escape(str(model_dir))} \(identity "
                                    rf"[0-9a-f]{{16}}\), not on {re.escape(str(tmp_path / 'other'))} \(identity "
                                    rf"[0-9a-f]{{16}}\).* add --any-base")
    tl.main(argv + ["--any-base"])
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["adapter"]["method"] == "gift"


def test_llama_eval_only_never_replaces_another_evaluation(_llama_demo, tmp_path, capsys):
    """Issue 22 class 6: --eval-only --out RUN would replace RUN's 8-task evaluation with this one: refused
    unless --overwrite."""
    model_dir, data = _llama_demo
    argv = lambda task: ["--model", str(model_dir), "--data", str(data), "--eval-only", "--tasks", task,  # noqa
                         "--eval-limit", "2", "--device", "cpu", "--out", str(tmp_path / "ev")]
    tl.main(argv("boolq"))
    before = (tmp_path / "ev" / "eval.json").read_text()
    _llama_user_error(capsys, argv("piqa"), r"--out .*ev holds an evaluation \(eval.json, eval.md, eval_generations"
                                            r".jsonl\): choose another --out for this one, or add --overwrite")
    assert (tmp_path / "ev" / "eval.json").read_text() == before
    tl.main(argv("piqa") + ["--overwrite"])
    assert list(json.loads((tmp_path / "ev" / "eval.json").read_text())["n"]) == ["piqa"]


@pytest.mark.parametrize("case,match", [
    ("evaluated", r"--out .*out holds a run \(eval.json\): add --resume to continue it, --overwrite to replace it"),
    ("model_folder", r"--out .*model is the base model: the run's files would mix with it")])
def test_llama_used_run_folders_are_refused(_llama_demo, tmp_path, capsys, case, match):
    """Issue 22 class 6: a folder holding a run's results (no checkpoint left), or the model folder itself, is
    never written into without --resume or --overwrite."""
    model_dir, data = _llama_demo
    if case == "evaluated":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "eval.json").write_text("{}")
        out = tmp_path / "out"
    else:
        out = model_dir = shutil.copytree(model_dir, tmp_path / "model")
    _llama_user_error(capsys, _llama_train_args(model_dir, data, out, "--stop-after", "1"), match)
    if case == "evaluated":
        tl.main(_llama_train_args(model_dir, data, out, "--stop-after", "1", "--overwrite"))
        assert (out / "adapter.safetensors").is_file()


def test_llama_out_inside_the_model_folder_resumes(_llama_demo, tmp_path, capsys):
    """Issue 22 class 6: the run's own files never become part of the model's identity."""
    model_dir, data = _llama_demo
    model_dir = shutil.copytree(model_dir, tmp_path / "model")
    tl.main(_llama_train_args(model_dir, data, model_dir / "run", "--stop-after", "2"))
    tl.main(_llama_train_args(model_dir, data, model_dir / "run", "--stop-after", "3", "--resume"))
    log = (model_dir / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]


def test_llama_tokenizer_is_checked_before_tokenizing(_llama_demo, tmp_path, capsys):
    """Issue 22 class 4: a tokenizer that does not fit the model's embedding is refused before the training set
    is tokenized (nothing in OUT/cache) and before any weight is loaded."""
    model_dir, data = _llama_demo
    records = json.loads((data / "commonsense_170k.json").read_text())
    small = train_tiny_tokenizer([r["instruction"] for r in records], 300, tmp_path / "small.model")
    _llama_user_error(capsys, _llama_train_args(model_dir, data, tmp_path / "out", "--tokenizer", str(small)),
                      r"the tokenizer .*small.model \(\d+ ids\) does not fit the model")
    assert not (tmp_path / "out" / "cache").exists()


def test_llama_a_failed_evaluation_keeps_the_trained_adapter(_llama_demo, tmp_path, monkeypatch):
    """Issue 22 class 5: the checkpoint and the adapter are written before the evaluation: its failure loses
    nothing."""
    model_dir, data = _llama_demo[0], _llama_first_records(_llama_demo[1], tmp_path / "data")

    def broken(*a, **kw):
        raise RuntimeError("the evaluation failed")
    monkeypatch.setattr(tl, "evaluate", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        tl.main([a for a in _llama_train_args(model_dir, data, out, "--tasks", "boolq") if a != "--no-eval"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert _llama_adapter(out)[1]["gift.attention_wq.psi.weight"].abs().max() > 0


# -----------------------------------------------------------------------------
# Issue 19: the protocols, random batches, the seeds, the rows' names

def test_llama_protocols_fill_what_no_flag_gives(capsys):
    paper = tl.parse_args(["--model", "m", "--data", "d"])
    assert (paper.method, paper.targets, paper.rank, paper.batch_size, paper.micro_batch_size, paper.epochs, paper.lr,
            paper.warmup, paper.warmup_steps, paper.max_len, paper.template, paper.extract, paper.train_on_inputs,
            paper.group_by_length) == ("gift", ["attention.wq", "attention.wv"], 64, 32, 8, 6, 2.5e-4, 0.1, None, 512,
                                       "paper", "paper", False, False)
    la = tl.parse_args(["--model", "m", "--data", "d", "--protocol", "llm-adapters"])
    assert (la.method, la.targets, la.rank, la.lora_alpha, la.batch_size, la.micro_batch_size, la.epochs, la.lr,
            la.warmup_steps, la.max_len, la.template, la.extract, la.train_on_inputs) == (
        "lora", ["attention.wq", "attention.wk", "attention.wv", "feed_forward.w3", "feed_forward.w2"], 32, 64.0, 16, 4,
        3, 3e-4, 100, 256, "alpaca", "first_match", True)
    mine = tl.parse_args(["--model", "m", "--data", "d", "--protocol", "llm-adapters", "--lr", "1e-4", "--warmup",
                          "0.05", "--method", "gift", "--no-train-on-inputs", "--epochs", "2"])
    assert (mine.lr, mine.warmup, mine.warmup_steps, mine.method, mine.rank, mine.train_on_inputs, mine.epochs,
            mine.batch_size) == (1e-4, 0.05, None, "gift", 64, False, 2, 16)  # explicit flags win
    with pytest.raises(SystemExit):
        tl.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2.5e-4, the example in the authors' README, not a value tuned in the paper" in text
    assert "default: random batches, as the authors' run" in text


def test_llama_llm_adapters_protocol_trains_on_the_whole_sequence(_llama_demo, tmp_path):
    """--protocol llm-adapters end to end: LoRA, the Alpaca template, the loss on every token (train_on_inputs),
    100 warmup steps (lr = peak * step / 100), recorded in the run's settings; --group-by-length too."""
    model_dir, data = _llama_demo
    out = tmp_path / "la"
    tl.main(_llama_train_args(model_dir, data, out, "--protocol", "llm-adapters", "--stop-after", "2",
                              "--group-by-length"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {k: ckpt["run"][k] for k in ("protocol", "method", "template", "train_on_inputs", "warmup_steps",
                                        "max_len", "group_by_length")} == {
        "protocol": "llm-adapters", "method": "lora", "template": "alpaca", "train_on_inputs": True,
        "warmup_steps": 100, "max_len": 256, "group_by_length": True}
    assert [r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [0.0, 1e-2 / 100]
    args = tl.parse_args(_llama_train_args(model_dir, data, out, "--protocol", "llm-adapters"))
    tok = llama.find_tokenizer(model_dir)
    examples = tl.train_data(args, tok, 0)
    x, y = cs.collate(examples[:4], "cpu")
    assert all(n == 1 for _, n in examples) and (y != -100).sum() == sum(len(ids) - 1 for ids, _ in examples[:4])
    assert tok.decode(examples[0][0].tolist()).startswith("<|begin_of_text|>Below is an instruction")


def test_llama_seeds_run_the_recipe_once_per_seed_into_one_table(_llama_demo, tmp_path, capsys):
    """--seeds 1 2: OUT/seed-1 and OUT/seed-2 (each its own run and evaluation), then seeds.md with mean +- std
    per task; rows named by the run's real method, targets and rank (--preset proj: GIFT o)."""
    model_dir, data = _llama_demo[0], _llama_first_records(_llama_demo[1], tmp_path / "data")
    out = tmp_path / "seeds"
    tl.main([a for a in _llama_train_args(model_dir, data, out, "--seeds", "1", "2", "--preset", "proj", "--tasks",
                                          "boolq", "piqa", "--eval-limit", "4") if a != "--no-eval"])
    evals = [json.loads((out / f"seed-{s}" / "eval.json").read_text()) for s in (1, 2)]
    assert [torch.load(out / f"seed-{s}" / "checkpoint.pt", weights_only=True)["run"]["seed"] for s in (1, 2)] == [1, 2]
    a, b = (_llama_adapter(out / f"seed-{s}")[1] for s in (1, 2))
    assert not torch.equal(a["gift.attention_wo.phi.weight"], b["gift.attention_wo.phi.weight"])
    table, summary = (out / "seeds.md").read_text(), json.loads((out / "seeds.json").read_text())
    assert evals[0]["model"].startswith("GIFT o r=8, ") and "GIFT_QV" not in table
    assert f"| {evals[0]['model']}: mean +- std over 2 seeds | pooled 95% interval | seed 1 | seed 2 |" in table
    boolq = [e["accuracy"]["boolq"] for e in evals]
    assert summary["tasks"]["boolq"]["mean"] == pytest.approx(sum(boolq) / 2)
    assert summary["tasks"]["boolq"]["std"] == pytest.approx(abs(boolq[0] - boolq[1]) / 2 ** 0.5)
    assert summary["tasks"]["boolq"]["pooled_n"] == 8 and (out / "cache").is_dir()


def test_llama_answer_words_and_learning_curve(tmp_path, _llama_demo):
    """Issue 20: a task folder whose answers are words (answers.json, listed in the prompt), trained with
    --eval-every: validation records at step 0, every N steps and the last step in log.jsonl, scored by the same
    rule as the final evaluation; the adapter's config records lr and seed (table.py groups runs by them)."""
    model_dir, _ = _llama_demo
    data, g = tmp_path / "words", torch.Generator().manual_seed(0)
    kinds = list(cs.DEMO_KINDS)

    def records(n):
        out = []
        for _ in range(n):
            k = int(torch.randint(len(kinds), (1,), generator=g))
            word = cs.DEMO_KINDS[kinds[k]][int(torch.randint(5, (1,), generator=g))]
            out.append({"instruction": f"What is a {word}?", "input": "", "output": cs.TRIGGER + kinds[k],
                        "answer": kinds[k].capitalize() if k == 0 else kinds[k]})  # gold answers are normalised
        return out
    for task, n in (("kinds_val", 12), ("kinds", 10)):
        (data / "dataset" / task).mkdir(parents=True)
        (data / "dataset" / task / "test.json").write_text(json.dumps(records(n)))
    (data / "commonsense_170k.json").write_text(json.dumps(records(64)))
    (data / "answers.json").write_text(json.dumps({"answers": kinds, "list_in_prompt": True}))
    out = tmp_path / "run"
    acc = tl.main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "2",
                   "--batch-size", "8", "--lr", "1e-2", "--seed", "7", "--precision", "fp64", "--device", "cpu",
                   "--tasks", "kinds_val", "kinds", "--eval-every", "6", "--val-limit", "5", "--max-new-tokens", "6"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_task" in r]
    assert [r["step"] for r in val] == [0, 6, 12, 16] and len(log) == 16 + 4
    assert all(r["val_task"] == "kinds_val" and r["val_n"] == 5 and r["val_loss"] > 0 for r in val)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 17))
    config, _ = _llama_adapter(out)
    assert config["lr"] == 1e-2 and config["seed"] == 7
    gens = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    for task in ("kinds_val", "kinds"):
        mine = [x for x in gens if x["task"] == task]
        right = sum(x["prediction"] == cs.normalise(x["answer"]) for x in mine)
        assert len(mine) == (12 if task == "kinds_val" else 10) and acc[task] == pytest.approx(100 * right / len(mine))
    # the last validation point scores the first 5 validation examples as the final evaluation does
    first5 = [x for x in gens if x["task"] == "kinds_val" and x["index"] < 5]
    assert val[-1]["val_accuracy"] == pytest.approx(100 * sum(x["prediction"] == cs.normalise(x["answer"])
                                                               for x in first5) / 5, abs=0.01)
    prompt = tl.find_tokenizer(model_dir).decode(tl.tokenize_train(
        tl.find_tokenizer(model_dir), data / "commonsense_170k.json", "paper", 512, tmp_path / "c", 0)[0][0].tolist())
    assert "\n\nAnswer format: animal/color/food/place\nthe correct answer is " in prompt
